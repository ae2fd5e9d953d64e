"""In-context concept learning: trainable set, determinism, resume, mechanism of l_att, recipes."""

import json

import pytest
import torch
from conftest import DeviceReads, on_meta, random_image, shared_backbone, square_mask

from clic.concept import applied_concept
from clic.config import learn_config as make_config
from clic.errors import InputError, TrainingError
from clic.learn import learn
from clic.maps import token_attention_maps
from clic.models import load_backbone
from clic_lab.bench.reference import learn_reference


def _run(model_dir, steps=3, out=None, **kw):
    backbone = shared_backbone(model_dir)
    cfg = make_config(**{"steps": steps, "object_class": "chair", **kw})
    return backbone, learn(backbone, [random_image()], [square_mask()], cfg, out_path=out, progress=False)


def test_exactly_the_intended_parameters_train(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    base_unet = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in backbone.text_encoder.state_dict().items()}
    seen = {}

    def on_step(step, record):
        if step == 1:
            seen["unet"] = sorted(n for n, p in backbone.unet.named_parameters() if p.requires_grad)
            seen["text"] = sorted(n for n, p in backbone.text_encoder.named_parameters() if p.requires_grad)
            seen["vae"] = [n for n, p in backbone.vae.named_parameters() if p.requires_grad]

    cfg = make_config(steps=3, object_class="chair", lr=1e-3)
    result = learn(backbone, [random_image()], [square_mask()], cfg, progress=False, callback=on_step)
    # requires_grad: the token row and the 2 x 7 cross-attention K/V copies, nothing else
    assert seen["text"] == ["embeddings.token_embedding.new"]
    assert seen["vae"] == []
    assert len(seen["unet"]) == 14 and all(".attn2.processor.to_" in n for n in seen["unet"])
    assert {n.rsplit(".", 2)[-2] for n in seen["unet"]} == {"to_k", "to_v"}
    # the frozen weights (the whole embedding table included) are bit-identical after training
    for k, v in backbone.text_encoder.state_dict().items():
        if k in base_text:
            assert torch.equal(v, base_text[k]), k
    for k, v in backbone.unet.state_dict().items():
        if k in base_unet:
            assert torch.equal(v, base_unet[k]), k
    # and the trained ones moved
    procs = result.processors
    name = next(iter(procs))
    base_k = base_unet[name.replace(".processor", ".to_k.weight")]
    assert not torch.equal(procs[name].to_k.weight, base_k)
    init = backbone.text_encoder.get_input_embeddings().weight[backbone.tokenizer.convert_tokens_to_ids("pattern")]
    assert not torch.equal(result.concept.embeddings[0], init)


def test_kv_q_out_trains_four_matrices(tiny_model_dir):
    _, result = _run(tiny_model_dir, steps=1, train="kv+q+out")
    subs = {k.rsplit(".", 2)[-2] if not k.endswith("to_out.0.weight") else "to_out" for k in result.concept.attn_weights}
    assert {"to_k", "to_v", "to_q", "0"} <= subs | {"0"}
    assert any(".to_out.0.bias" in k for k in result.concept.attn_weights)


def test_same_seed_same_concept(tiny_model_dir):
    _, a = _run(tiny_model_dir, seed=3)
    _, b = _run(tiny_model_dir, seed=3)
    _, c = _run(tiny_model_dir, seed=4)
    assert torch.equal(a.concept.embeddings, b.concept.embeddings)
    assert all(torch.equal(a.concept.attn_weights[k], b.concept.attn_weights[k]) for k in a.concept.attn_weights)
    assert not torch.equal(a.concept.embeddings, c.concept.embeddings)


def test_resume_after_kill_reproduces_uninterrupted_run(tiny_model_dir, tmp_path):
    kw = dict(steps=6, checkpoint_every=2, lr=1e-3, seed=1)
    _, full = _run(tiny_model_dir, out=tmp_path / "full.safetensors", **kw)

    out = tmp_path / "killed.safetensors"
    backbone = shared_backbone(tiny_model_dir)

    def kill(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn(backbone, [random_image()], [square_mask()], make_config(object_class="chair", **kw), out_path=out,
              log_path=tmp_path / "log.jsonl", progress=False, callback=kill)
    assert not out.exists() and (tmp_path / "killed.safetensors.ckpt").exists()

    backbone = shared_backbone(tiny_model_dir)
    resumed = learn(backbone, [random_image()], [square_mask()], make_config(object_class="chair", **kw), out_path=out,
                    log_path=tmp_path / "log.jsonl", resume=True, progress=False)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(resumed.concept.embeddings, full.concept.embeddings, rtol=0, atol=0)
    for k, v in full.concept.attn_weights.items():
        torch.testing.assert_close(resumed.concept.attn_weights[k], v, rtol=0, atol=0)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert out.exists() and not (tmp_path / "killed.safetensors.ckpt").exists()


def _nan_at_step(monkeypatch, n: int) -> list:
    """l_con becomes NaN at the n-th step; returns the list of calls so far."""
    import clic.learn

    calls = []
    real = clic.learn.context_loss

    def nan_at_step_n(*args, **kw):
        calls.append(1)
        value = real(*args, **kw)
        return value * float("nan") if len(calls) == n else value

    monkeypatch.setattr(clic.learn, "context_loss", nan_at_step_n)
    return calls


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 4)
    out = tmp_path / "c.safetensors"
    with pytest.raises(TrainingError, match="loss became nan at step 4; the last good checkpoint is"):
        _run(tiny_model_dir, steps=10, out=out, checkpoint_every=2)
    assert not out.exists()
    assert (tmp_path / "c.safetensors.ckpt").exists()


def _iou_top(m, mask):
    k = int(mask.sum())
    top = torch.zeros(m.numel())
    top[m.flatten().topk(k).indices] = 1
    return float((top * mask.flatten()).sum() / ((top + mask.flatten()) > 0).sum())


def test_attention_loss_alone_moves_v_star_attention_onto_the_mask(tiny_model_dir):
    """Mechanism of eq. 1: with l_att only, the IoU of CA(v*) with the mask rises well above its start."""
    image, mask = random_image(), square_mask()
    small = (torch.nn.functional.interpolate(mask[None], size=(16, 16), mode="bilinear")[0, 0] > 0.5).float()
    ious = []
    for steps, lr in ((1, 1e-12), (60, 3e-3)):
        backbone = shared_backbone(tiny_model_dir)
        cfg = make_config(steps=steps, lr=lr, use_con=False, use_roi=False, object_class="chair", flip_p=0.0)
        result = learn(backbone, [image], [mask], cfg, progress=False)
        with applied_concept(backbone, result.concept):
            maps = token_attention_maps(backbone, backbone.encode_image(image[None]), cfg.context_prompt(), ["<v*>"])
        ious.append(_iou_top(maps[0], small))
        if steps > 1:
            l_att = [r["l_att"] for r in result.history]
            assert sum(l_att[-10:]) / 10 < 0.8 * sum(l_att[:5]) / 5
    assert ious[1] > ious[0] + 0.3 and ious[1] > 0.5, ious


def test_several_masks_on_one_image_give_one_token_each(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    masks = torch.cat([square_mask(box=(4, 20, 4, 28)), square_mask(box=(36, 60, 30, 60))])
    cfg = make_config(steps=2, object_class="necklace")
    result = learn(backbone, [random_image()], [masks], cfg, progress=False)
    assert result.concept.tokens == ["<v1*>", "<v2*>"]
    assert result.concept.embeddings.shape[0] == 2
    assert result.concept.meta["prompt"] == "a necklace with <v1*> and <v2*> style"


def test_token_warmup_trains_only_the_token_first(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    snapshots = {}

    def on_step(step, record):
        procs = [p for p in backbone.unet.attn_processors.values() if hasattr(p, "trained_linears")]
        snapshots[step] = procs[0].to_k.weight.detach().clone()

    cfg = make_config(steps=4, object_class="chair", token_warmup_steps=2, lr=1e-3)
    learn(backbone, [random_image()], [square_mask()], cfg, progress=False, callback=on_step)
    assert torch.equal(snapshots[1], snapshots[2])          # phase 1: K/V frozen
    assert not torch.equal(snapshots[2], snapshots[3])      # phase 2: K/V train


@pytest.mark.parametrize("recipe", ["official", "custom-diffusion", "break-a-scene"])
def test_recipes_run(tiny_model_dir, recipe):
    extra = {"attn_factor": 2, "token_warmup_steps": 1} if recipe == "break-a-scene" else {}
    _, result = _run(tiny_model_dir, steps=2, recipe=recipe, **extra)
    cfg = result.concept.meta["config"]
    if recipe == "official":
        assert cfg["alpha"] == 0.25 and cfg["train"] == "kv+q+out" and cfg["roi_input"] == "pixels"
    elif recipe == "custom-diffusion":
        assert cfg["alpha"] == 1.0 and not cfg["use_att"] and not cfg["use_roi"]
        assert result.history[-1]["l_att"] == 0.0
    else:
        assert cfg["alpha"] == 0.0 and cfg["attn_norm"] == "max" and cfg["lambda_att"] == 0.01
        assert result.concept.meta["prompt"] == "a photo of <v*>"


def test_sd2_layout_v_prediction(tiny_sd2_model_dir):
    backbone, result = _run(tiny_sd2_model_dir, steps=2)
    assert backbone.prediction_type == "v_prediction"
    assert result.concept.embeddings.shape == (1, 48)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_bad_config_is_refused(tiny_model_dir):
    with pytest.raises(InputError, match="does not contain the placeholder"):
        _run(tiny_model_dir, prompt="a chair with ornaments")
    with pytest.raises(InputError, match="all losses"):
        _run(tiny_model_dir, use_con=False, use_att=False, use_roi=False)
    with pytest.raises(InputError, match="single token"):
        _run(tiny_model_dir, initializer="ktn")
    with pytest.raises(InputError, match="already in the tokenizer"):
        _run(tiny_model_dir, placeholder="chair", prompt="a chair with chair style")


def test_fast_path_matches_the_reference_path(tiny_model_dir):
    """The optimised computation (SDPA, one UNet batch, cached latents/text, only trainable grads) gives the same
    losses and the same learned weights as the official code's way of computing them."""
    _, fast = _run(tiny_model_dir, steps=3, lr=1e-3, seed=2)
    ref = learn_reference(shared_backbone(tiny_model_dir), [random_image()], [square_mask()],
                          make_config(steps=3, lr=1e-3, seed=2, object_class="chair"))
    for a, b in zip(fast.history, ref.history):
        for key in ("l_con", "l_att", "l_roi"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(fast.concept.embeddings, ref.concept.embeddings, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lever", [{"gradient_checkpointing": True}, {"channels_last": True}, {"adam_impl": "fused"},
                                   {"gradient_checkpointing": True, "channels_last": True, "adam_impl": "fused"}],
                         ids=["checkpointing", "channels-last", "fused-adam", "all"])
def test_speed_levers_keep_the_losses_and_weights(tiny_model_dir, lever):
    """Every speed/memory lever computes the same learning run (losses, embedding, K/V) up to float rounding, and
    leaves the UNet as it found it."""
    _, plain = _run(tiny_model_dir, steps=3, lr=1e-3, seed=2)
    backbone, fast = _run(tiny_model_dir, steps=3, lr=1e-3, seed=2, **lever)
    for a, b in zip(plain.history, fast.history):
        for key in ("l_con", "l_att", "l_roi"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Adam divides by sqrt(v): where a gradient is ~0, rounding-level differences change that element's update by up
    # to ~lr per step, so the weights are compared to a tenth of the total possible update (3 steps x lr 1e-3)
    torch.testing.assert_close(fast.concept.embeddings, plain.concept.embeddings, rtol=1e-4, atol=3e-4)
    for name, w in plain.concept.attn_weights.items():
        torch.testing.assert_close(fast.concept.attn_weights[name], w, rtol=1e-4, atol=3e-4)
    assert not backbone.unet.is_gradient_checkpointing
    assert all(p.is_contiguous() for p in backbone.unet.parameters())


@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="torch.compile on the CPU needs a C compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")   # inside torch.compile, not ours
def test_compiled_unet_and_text_give_the_same_losses(micro_model_dir):
    """--compile-unet --compile-text (torch.compile; Inductor's C++ kernels take a minute or two to build on this
    CPU the first time, seconds from its cache): same losses; each model is one graph with no graph break (a break
    would split the CUDA graphs of reduce-overhead), compiled once for the run (no step recompiles), and the text
    encoder gets its own forward back. On the micro model, with scalar C++ kernels (vectorised ones take longer to
    build, and compute the same up to float rounding)."""
    from torch._dynamo.utils import counters

    from clic.speed import text_layers

    _, plain = _run(micro_model_dir, steps=2, lr=1e-3, seed=2)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        backbone, compiled = _run(micro_model_dir, steps=3, lr=1e-3, seed=2, compile_unet=True, compile_text=True)
    for a, b in zip(plain.history, compiled.history):
        for key in ("l_con", "l_att", "l_roi"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert counters["stats"]["unique_graphs"] == 2      # the UNet's and the text layers', nothing more for steps 2-3
    assert sum(counters["graph_break"].values()) == 0
    assert "forward" not in vars(text_layers(backbone.text_encoder))


@pytest.mark.parametrize("options", [
    {"compile_unet": True, "compile_text": True, "compile_mode": "cudagraphs"},
    {"cuda_graphs": "on"},                                           # the same, channels-last: a GPU's default
], ids=["compile-mode-cudagraphs", "cuda-graphs-on"])
def test_cuda_graph_backend_gives_the_same_losses(micro_model_dir, options):
    """--compile-mode cudagraphs (torch's cudagraphs backend: traced, not compiled; without a GPU the traced graphs
    run as they are, and say so), and --cuda-graphs on (that with channels-last, the default on a GPU): same losses
    and weights, one graph per model, no graph break."""
    from torch._dynamo.utils import counters

    _, plain = _run(micro_model_dir, steps=3, lr=1e-3, seed=2)
    torch._dynamo.reset()
    counters.clear()
    _, graphed = _run(micro_model_dir, steps=3, lr=1e-3, seed=2, **options)
    for a, b in zip(plain.history, graphed.history):
        for key in ("l_con", "l_att", "l_roi"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(graphed.concept.embeddings, plain.concept.embeddings, rtol=1e-4, atol=3e-4)
    assert counters["stats"]["unique_graphs"] == 2 and sum(counters["graph_break"].values()) == 0
    assert counters["inductor"]["cudagraph_skips"] >= 2              # on the CPU: "skipping cudagraphs due to cpu"


def test_cuda_graphs_resolved_for_the_device():
    """--cuda-graphs auto turns CUDA graphs on (UNet and text layers through the cudagraphs backend, channels-last)
    for a CUDA device only, and not for the reference path, gradient checkpointing or a run that sets a compile or
    memory-format option itself; on/off are obeyed anywhere; on with options of its own is refused."""
    from clic.speed import GRAPH_OPTIONS, with_cuda_graphs

    def resolved(device, **kw):
        cfg = with_cuda_graphs(make_config(**kw), device)
        return cfg.cuda_graphs, {k: getattr(cfg, k) for k in GRAPH_OPTIONS}

    graphs = ("on", GRAPH_OPTIONS)
    eager = ("off", {"compile_unet": False, "compile_text": False, "compile_mode": "default", "channels_last": False})
    assert resolved("cuda") == graphs and resolved(torch.device("cuda", 1)) == graphs
    assert resolved("cpu") == eager and resolved("mps") == eager
    assert resolved("cpu", cuda_graphs="on") == graphs and resolved("cuda", cuda_graphs="off") == eager
    assert resolved("cuda", gradient_checkpointing=True)[0] == "off"
    assert resolved("cuda", channels_last=True) == ("off", {**eager[1], "channels_last": True})
    assert resolved("cuda", compile_unet=True)[1]["compile_text"] is False
    for kw in ({"compile_unet": True}, {"channels_last": True}):
        with pytest.raises(InputError, match="--cuda-graphs on sets the compile"):
            make_config(cuda_graphs="on", **kw).check()


def test_compile_mode_reaches_torch_compile(tiny_model_dir, monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs; only a GPU can time it) is the mode torch.compile gets, and every
    step first marks a new CUDA-graph iteration; the mode alone, without a model to compile, is refused."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    _run(tiny_model_dir, steps=3, compile_unet=True, compile_text=True, compile_mode="reduce-overhead")
    assert calls == [{"mode": "reduce-overhead"}] * 2 and len(marks) == 3
    _run(tiny_model_dir, steps=2, compile_text=True, compile_mode="reduce-overhead")
    assert len(calls) == 3 and len(marks) == 5
    _run(tiny_model_dir, steps=2, compile_unet=True)
    assert calls[-1] == {"mode": "default"} and len(marks) == 5
    _run(tiny_model_dir, steps=2, compile_unet=True, compile_mode="cudagraphs")
    assert calls[-1] == {"backend": "cudagraphs"} and len(marks) == 7
    with pytest.raises(InputError, match="--compile-mode reduce-overhead needs --compile-unet or --compile-text"):
        make_config(compile_mode="reduce-overhead").check()


def test_compiled_step_fits_cuda_graphs(micro_backbone, monkeypatch):
    """What torch checks before it replays a graph as CUDA graphs, checked on the graphs of a learning step (the UNet
    with trained K/V and the capture attached, the text encoder's layers with a trained token; forward and backward):
    every input on the model's device (the token positions are handed in from the host), no input mutated, no op
    CUDA graphs cannot hold. Without a GPU: the models on the meta device, where any host tensor in a graph shows."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.cudagraphs import find_input_mutations
    from torch._inductor.utils import get_all_devices, get_first_incompatible_cudagraph_node
    from functorch.compile import make_boxed_func

    from clic import speed
    from clic.attention import capture_token_maps, cross_attention_layers, install_processors
    from clic.tokens import add_placeholders, concept_embedding, initializer_embedding

    backbone = micro_backbone                   # the smallest UNet: tracing costs grow with the number of layers
    graphs = []

    def inspect(graph_module, example_inputs):
        graphs.append((get_all_devices(graph_module), find_input_mutations(graph_module.graph),
                       get_first_incompatible_cudagraph_node(graph_module)))
        return make_boxed_func(graph_module)

    backend = aot_autograd(fw_compiler=inspect, bw_compiler=inspect)
    monkeypatch.setattr(speed, "compiled", lambda fn, mode: torch.compile(fn, backend=backend))
    unet, text_encoder = backbone.unet, backbone.text_encoder
    for p in install_processors(unet, train_kv=True).values():
        p.requires_grad_(True)
    add_placeholders(backbone, ["<v*>"], initializer_embedding(backbone, "pattern")[None])
    ids = backbone.tokenize(["a chair with <v*> style", "a photo of <v*>"])
    unet.to("meta")
    text_encoder.to("meta")
    concept_embedding(text_encoder).new.requires_grad_(True)
    with speed.compiled_forward(unet), speed.compiled_forward(speed.text_layers(text_encoder)):
        text = backbone.encode_text(ids.to("meta"))
        x = torch.randn(2, 4, 16, 16, device="meta")
        with capture_token_maps(unet, torch.tensor([[5], [4]]), cross_attention_layers(unet), (16, 16)) as cap:
            out = unet(x, torch.tensor([10, 10], device="meta"), **text.unet_kwargs()).sample
        (out.mean() + cap.maps().mean()).backward()
    assert len(graphs) == 4                      # forward and backward of the UNet and of the text layers
    for devices, mutated, unsafe in graphs:
        assert {d.type for d in devices} == {"meta"} and not mutated and unsafe is None


def test_losses_read_in_bursts_give_the_same_run(tiny_model_dir, tmp_path):
    """--sync-every N (a GPU's default) reads the loss values back every N steps: the same run, the same log; the
    callbacks of a burst come together, after the burst's last update; a checkpoint resumes under other speed
    options (not under other learning options)."""
    _, plain = _run(tiny_model_dir, steps=7, lr=1e-3, seed=2)
    backbone = shared_backbone(tiny_model_dir)
    seen = {}

    def snapshot(step, record):
        procs = [p for p in backbone.unet.attn_processors.values() if hasattr(p, "trained_linears")]
        seen[step] = procs[0].to_k.weight.detach().clone()

    bursty = learn(backbone, [random_image()], [square_mask()],
                   make_config(steps=7, object_class="chair", lr=1e-3, seed=2, sync_every=3),
                   log_path=tmp_path / "log.jsonl", progress=False, callback=snapshot)
    assert bursty.history == plain.history                                   # every step, the same values
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == plain.history
    assert torch.equal(bursty.concept.embeddings, plain.concept.embeddings)
    assert list(seen) == [1, 2, 3, 4, 5, 6, 7]
    # reads after steps 1, 3, 6 and 7: steps 2-3 and 4-6 are reported together, after steps 3 and 6 updated
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[4], seen[6]) and not torch.equal(seen[1], seen[2])

    # a checkpoint of a run with sync_every 1 resumes with sync_every 4 and another checkpoint interval...
    kw = dict(steps=6, lr=1e-3, seed=1)
    out = tmp_path / "c.safetensors"

    def kill(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()],
              make_config(object_class="chair", checkpoint_every=2, **kw), out_path=out, progress=False, callback=kill)
    resumed = learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()],
                    make_config(object_class="chair", checkpoint_every=3, sync_every=4, **kw), out_path=out,
                    resume=True, progress=False)
    _, full = _run(tiny_model_dir, **kw)
    assert [r["step"] for r in resumed.history] == [5, 6]
    assert torch.equal(resumed.concept.embeddings, full.concept.embeddings)
    # ... but not with another learning rate
    with pytest.raises(KeyboardInterrupt):
        learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()],
              make_config(object_class="chair", checkpoint_every=2, **kw), out_path=out, progress=False, callback=kill)
    with pytest.raises(TrainingError, match="checkpoint was made with other options"):
        learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()],
              make_config(object_class="chair", **{**kw, "lr": 2e-3}), out_path=out, resume=True, progress=False)


def test_nan_is_caught_at_the_next_read(tiny_model_dir, monkeypatch):
    calls = _nan_at_step(monkeypatch, 4)
    with pytest.raises(TrainingError, match="loss became nan at step 4; no checkpoint was written yet"):
        _run(tiny_model_dir, steps=10, sync_every=5)
    assert len(calls) == 5                                           # found when step 5 read the pending values


def test_the_loop_waits_for_the_device_only_to_read_the_losses(micro_model_dir, monkeypatch):
    """On a GPU the host queues work and runs on, except where it needs a value back (it then waits for everything
    queued). With every model on the meta device the learning loop runs through, so it needs no device value
    anywhere but in its reads of the loss values (after steps 1, 3, 6 and 7 of 7 with sync_every 3); and every copy
    from the host goes through ``to_device`` (pinned and non-blocking on a GPU)."""
    import clic.learn

    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))       # the smallest model: every op is hooked
    sent = []
    monkeypatch.setattr(clic.learn, "to_device", lambda x, device: sent.append(1) or x.to(device))
    monkeypatch.setattr(clic.learn.Concept, "from_training", lambda *a, **kw: None)    # reads the weights: not the loop
    mode, marks = DeviceReads(), {}

    def mark(step, record):
        marks[step] = (mode.reads, mode.writes, len(sent))

    with mode:
        learn(backbone, [random_image()], [square_mask()], make_config(steps=7, object_class="chair", sync_every=3),
              progress=False, callback=mark)
    assert {step: reads for step, (reads, _, _) in marks.items()} == {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3, 7: 4}
    (_, w1, s1), (_, w7, s7) = marks[1], marks[7]
    assert w7 - w1 == s7 - s1 == 2 * 6                      # steps 2-7: the noise and the timestep, by to_device


def test_self_attention_runs_fused_and_the_unet_is_left_as_found(tiny_model_dir):
    """Inside the loop each self-attention layer projects Q, K, V with one frozen matmul; afterwards the UNet has its
    own processors and parameters back, and no fused copy."""
    backbone = shared_backbone(tiny_model_dir)
    before = {n: type(p).__name__ for n, p in backbone.unet.attn_processors.items() if ".attn1." in n}
    names = set(backbone.unet.state_dict())
    inside = {}

    def on_step(step, record):
        procs = backbone.unet.attn_processors
        inside["types"] = {type(p).__name__ for n, p in procs.items() if ".attn1." in n}
        inside["fused_trainable"] = [n for n, p in backbone.unet.named_parameters() if "to_qkv" in n and p.requires_grad]

    learn(backbone, [random_image()], [square_mask()], make_config(steps=1, object_class="chair"), progress=False,
          callback=on_step)
    assert inside == {"types": {"FusedAttnProcessor2_0"}, "fused_trainable": []}
    after = {n: type(p).__name__ for n, p in backbone.unet.attn_processors.items() if ".attn1." in n}
    assert after == before and set(backbone.unet.state_dict()) - {n for n in backbone.unet.state_dict()
                                                                   if ".processor." in n} <= names
    assert not any(getattr(m, "fused_projections", False) or hasattr(m, "to_qkv") for m in backbone.unet.modules())
