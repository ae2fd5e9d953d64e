"""--cuda-graphs capture: the whole learning step over fixed tensors, recorded once and replayed (clic.capture).

Without a GPU the recording is :class:`clic.capture.EagerGraph` (a replay runs the static-buffer step): these tests
check that step computes what the plain loop does, bit for bit, that the step to be recorded needs no device value
and no copy from the host (models on the meta device), and that warm-up and recording happen once a phase.
"""

import pytest
import torch
from conftest import DeviceReads, on_meta, random_image, shared_backbone, square_mask

import clic.learn
from clic.capture import WARMUP_STEPS, StepGraph
from clic.config import learn_config as make_config
from clic.errors import InputError
from clic.learn import learn
from clic.models import load_backbone
from clic.speed import with_cuda_graphs

#: the official recipe's per-step draws: several RoI prompts, posterior samples of the image and the masked images
OFFICIAL_DRAWS = {"roi_prompts": ("a photo of {token}", "{token} on a blank background", "a {token} thing"),
                  "posterior": "sample", "roi_input": "pixels", "grad_clip": 1.0, "optimizer": "adamw",
                  "weight_decay": 0.1}


@pytest.fixture
def graphs(monkeypatch):
    """Every StepGraph the learning loop makes, in order."""
    made = []

    class Recorded(StepGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(clic.learn, "StepGraph", Recorded)
    return made


def _learn(backbone, out=None, callback=None, resume=False, images=1, **kw):
    cfg = make_config(**{"steps": 6, "object_class": "chair", "lr": 1e-3, "seed": 3, **kw})
    imgs = [random_image(seed=i) for i in range(images)]
    masks = [square_mask(box=(8 + 4 * i, 24 + 4 * i, 40, 56)) for i in range(images)]
    return learn(backbone, imgs, masks, cfg, out_path=out, resume=resume, progress=False, callback=callback)


def _same_concept(a, b):
    assert a.history == b.history                                           # every step, every term: bit for bit
    assert torch.equal(a.concept.embeddings, b.concept.embeddings)
    for name, proc in a.processors.items():
        for (_, x), (_, y) in zip(proc.named_parameters(), b.processors[name].named_parameters()):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("options", [{}, OFFICIAL_DRAWS, {"token_warmup_steps": 3}],
                         ids=["paper", "official-draws", "token-warmup"])
def test_captured_step_is_the_plain_step(tiny_model_dir, graphs, options):
    """The static-buffer step (image, flip, prompt rows picked by device indices; timestep, noise and posterior
    samples copied into one fixed tensor) gives the plain loop's losses and trained weights exactly, with two
    source images, flips, several RoI prompts, posterior samples, clipping, AdamW. --cuda-graphs capture sets
    channels-last, so the plain run does too. Two eager steps, then one recording, replayed for the rest; the token
    warm-up (other trained set and learning rates from step 4) records a second graph."""
    backbone = shared_backbone(tiny_model_dir)
    plain = _learn(backbone, images=2, cuda_graphs="off", channels_last=True, **options)
    captured = _learn(backbone, images=2, cuda_graphs="capture", **options)
    _same_concept(plain, captured)
    assert {r["t"] for r in plain.history} != {plain.history[0]["t"]}                   # the draws do vary
    (graph,) = graphs
    phases = 2 if options.get("token_warmup_steps") else 1
    assert (graph.captures, graph.eager_steps) == (phases, phases * WARMUP_STEPS) and graph.graph is None


def test_capture_is_a_real_lever(tiny_model_dir, graphs):
    """Not the plain loop under another name: without channels-last the plain run differs in rounding only, and
    the capture loop ran (its graph recorded once)."""
    backbone = shared_backbone(tiny_model_dir)
    plain = _learn(backbone, cuda_graphs="off", steps=4)
    captured = _learn(backbone, cuda_graphs="capture", steps=4)
    for a, b in zip(plain.history, captured.history):
        for key in ("l_con", "l_att", "l_roi"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert len(graphs) == 1 and graphs[0].captures == 1


def test_resume_across_capture(tiny_model_dir, tmp_path):
    """A checkpoint of the plain loop resumes under capture and one of the capture loop under the plain loop: the
    same concept as an uninterrupted run (speed options are not part of what a checkpoint must match)."""
    backbone = shared_backbone(tiny_model_dir)
    full = _learn(backbone, cuda_graphs="off", channels_last=True)

    def kill(step, record):
        if step == 5:
            raise KeyboardInterrupt

    for first, then in (({"cuda_graphs": "off", "channels_last": True}, {"cuda_graphs": "capture"}),
                        ({"cuda_graphs": "capture"}, {"cuda_graphs": "off", "channels_last": True})):
        out = tmp_path / f"{first['cuda_graphs']}.safetensors"
        with pytest.raises(KeyboardInterrupt):
            _learn(backbone, out=out, callback=kill, checkpoint_every=2, **first)
        resumed = _learn(backbone, out=out, resume=True, checkpoint_every=2, **then)
        assert [r["step"] for r in resumed.history] == [5, 6]
        assert resumed.history == full.history[4:] and torch.equal(resumed.concept.embeddings, full.concept.embeddings)


def test_recorded_step_needs_no_device_value(micro_model_dir, monkeypatch):
    """What a CUDA graph can hold: with the models on the meta device, the step after the warm-up (the one recorded
    and replayed) reads no device value and copies nothing from the host; each step sends its draws in one copy;
    the loss values are read only at the loop's reads (after steps 1, 3, 6 and 7 of 7 with sync_every 3)."""
    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))
    monkeypatch.setattr(clic.learn.Concept, "from_training", lambda *a, **kw: None)    # reads the weights: not the loop
    mode, inside, marks = DeviceReads(), [], {}
    real_run = clic.learn.StaticStep.run

    def counted(self):
        before = (mode.reads, mode.writes)
        real_run(self)
        inside.append((mode.reads - before[0], mode.writes - before[1]))

    monkeypatch.setattr(clic.learn.StaticStep, "run", counted)
    with mode:
        learn(backbone, [random_image()], [square_mask()],
              make_config(steps=7, object_class="chair", sync_every=3, cuda_graphs="capture", **OFFICIAL_DRAWS),
              progress=False, callback=lambda step, record: marks.setdefault(step, (mode.reads, mode.writes)))
    assert len(inside) == 7 and inside[WARMUP_STEPS:] == [(0, 0)] * (7 - WARMUP_STEPS)
    assert {step: reads for step, (reads, _) in marks.items()} == {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3, 7: 4}
    assert marks[7][1] - marks[1][1] == 6                   # steps 2-7: one copy of the draws each


def test_capture_options_resolved_and_checked():
    """capture stays capture on any device and sets channels-last; it refuses the compile options and gradient
    checkpointing (a recorded step cannot hold dynamo's own graphs or the checkpoint's RNG-state reads)."""
    cfg = with_cuda_graphs(make_config(cuda_graphs="capture"), "cpu")
    assert (cfg.cuda_graphs, cfg.channels_last, cfg.compile_unet, cfg.compile_text) == ("capture", True, False, False)
    make_config(cuda_graphs="capture", channels_last=True).check()
    for kw in ({"compile_unet": True}, {"compile_text": True}, {"gradient_checkpointing": True}):
        with pytest.raises(InputError, match="--cuda-graphs capture records the whole step itself"):
            make_config(cuda_graphs="capture", **kw).check()
