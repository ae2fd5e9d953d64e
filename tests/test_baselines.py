"""The paper's baselines: recipes, loss forms vs hand values, trainable sets, learn -> save -> load -> transfer,
RealFill's inpainting equal to the stock diffusers pipeline, and the CLI."""

import pytest
import torch
from conftest import random_image, shared_backbone, square_mask

from clic import baselines
from clic.baselines import realfill
from clic.cli import main
from clic.concept import Concept
from clic.config import GenerateConfig, InpaintConfig, RealFillConfig, generate_config, learn_config, transfer_config
from clic.errors import InputError, ModelError
from clic.losses import attention_loss, context_loss, soft_mask
from clic.models import load_backbone


@pytest.fixture(scope="module")
def tiny_inpaint_dir(tmp_path_factory):
    from clic.builder import make_model

    return str(make_model("tiny-inpaint", tmp_path_factory.mktemp("models") / "tiny-inpaint"))


def _trainable(backbone):
    unet = sorted(n for n, p in backbone.unet.named_parameters() if p.requires_grad)
    text = sorted(n for n, p in backbone.text_encoder.named_parameters() if p.requires_grad)
    return unet, text


# ---------------------------------------------------------------------------------------------- recipes


def test_methods_map_onto_their_recipes():
    cd = learn_config("custom-diffusion", object_class="chair")
    assert (cd.recipe, cd.alpha, cd.use_att, cd.use_roi, cd.train) == ("custom-diffusion", 1.0, False, False, "kv")
    assert (cd.optimizer, cd.weight_decay, cd.grad_clip, cd.flip_p) == ("adamw", 1e-2, 1.0, 0.5)
    assert cd.context_prompt() == "a chair with <v*> style"      # the paper's "an OBJECT with v* style" template
    bas = learn_config("break-a-scene")
    assert (bas.steps, bas.token_warmup_steps, bas.token_warmup_lr, bas.lr) == (800, 400, 5e-4, 2e-6)
    assert (bas.alpha, bas.attn_norm, bas.lambda_att, bas.attn_blocks) == (0.0, "max", 0.01, ("down", "up"))
    assert bas.context_prompt() == "a photo of <v*>" and not bas.use_roi
    # fewer steps: the token-only phase stays half of them, as 400 of 800
    assert learn_config("break-a-scene", steps=10).token_warmup_steps == 5
    assert learn_config("break-a-scene", steps=10, token_warmup_steps=2).token_warmup_steps == 2
    clic = learn_config()
    assert clic.recipe == "paper" and learn_config("official").recipe == "official"
    # one selector: the recipe names the baseline
    assert learn_config("custom-diffusion").recipe == "custom-diffusion"
    rf = learn_config("realfill", steps=3)
    assert isinstance(rf, RealFillConfig) and rf.steps == 3
    assert (rf.batch_size, rf.lr, rf.prompt_dropout, rf.max_rectangles) == (16, 1e-5, 0.1, 29)
    assert rf.train_prompt() == "a photo of <v*>"


def test_bad_method_options_are_refused():
    with pytest.raises(InputError, match="unknown recipe"):
        learn_config("dreambooth")
    with pytest.raises(InputError, match="--batch-size do not apply to CLiC"):
        learn_config("paper", batch_size=4)
    with pytest.raises(InputError, match="--alpha do not apply to RealFill"):
        learn_config("realfill", alpha=0.3)
    with pytest.raises(InputError, match="one mask per image"):
        learn_config("realfill").check(2)


def test_transfer_and_generation_defaults_per_method():
    assert transfer_config("paper").eta == 1.0
    assert transfer_config("custom-diffusion").eta == 0.0
    assert transfer_config("break-a-scene").eta == 0.0
    rf = transfer_config("realfill")
    assert isinstance(rf, InpaintConfig)
    assert (rf.steps, rf.scheduler, rf.guidance_scale, rf.composite) == (200, "ddpm", 1.0, True)
    with pytest.raises(InputError, match="--eta do not apply"):
        transfer_config("realfill", eta=1.0)
    assert generate_config("paper") == GenerateConfig()                # the paper's two stages
    assert generate_config("realfill").base_steps == 0
    assert generate_config("break-a-scene", base_steps=3).base_steps == 3


# ---------------------------------------------------------------------------------------------- loss forms


def test_loss_forms_against_hand_values():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])                  # (1, 1, 2, 2)
    eps = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])                   # squared errors 1, 4, 4, 9
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # Custom Diffusion: unmasked diffusion loss (alpha = 1): plain mean
    assert float(context_loss(pred, eps, soft_mask(mask, 1.0))) == pytest.approx((1 + 4 + 4 + 9) / 4)
    # Break-A-Scene: prediction and target multiplied by the mask, mean over all elements (not area-normalised)
    assert float(context_loss(pred, eps, soft_mask(mask, 0.0))) == pytest.approx((1 + 9) / 4)
    # Break-A-Scene's attention loss: the map divided by its max, MSE to the mask
    ca = torch.tensor([[[0.2, 0.4], [0.1, 0.0]]])                      # / 0.4 -> 0.5, 1, 0.25, 0
    assert float(attention_loss(ca, mask[0], "max")) == pytest.approx(((0.5 - 1) ** 2 + 1 + 0.25**2 + 1) / 4)
    # RealFill: mean(W * (eps_hat - eps)^2), W broadcast over channels, not area-normalised
    pred2, eps2 = torch.cat([pred, 2 * pred], 1), torch.cat([eps, eps], 1)  # channel 2 errors: 4, 16, 25, 49
    assert float(realfill.realfill_loss(pred2, eps2, mask)) == pytest.approx((1 + 9 + 4 + 49) / 8)
    assert float(realfill.realfill_loss(pred, eps, torch.ones_like(mask))) == pytest.approx(18 / 4)


def test_random_masks_follow_realfill():
    g = torch.Generator().manual_seed(0)
    masks = realfill.random_masks(64, 64, g)
    assert masks.shape == (64, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.flatten(1).min(1).values == 1).float().mean()
    assert 0.0 < full < 0.5                            # all-ones 10% (plus inverted masks that are all ones: none)
    assert torch.equal(realfill.random_masks(3, 64, g, full_p=1.0), torch.ones(3, 1, 64, 64))
    # one rectangle, never inverted: exactly one zero block with sides in [3%, 25%) of the size
    one = realfill.random_masks(20, 100, torch.Generator().manual_seed(1), max_rectangles=1, full_p=0.0,
                                invert_p=0.0)
    for m in one:
        rows = (m[0] == 0).any(1).nonzero().flatten()
        cols = (m[0] == 0).any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 3 <= h < 25 and 3 <= w < 25 and int((m == 0).sum()) == h * w
    inverted = realfill.random_masks(5, 100, torch.Generator().manual_seed(1), max_rectangles=1, full_p=0.0,
                                     invert_p=1.0)
    assert all(0 < float(m.mean()) < 0.1 for m in inverted)      # now the rectangle is the region to inpaint


def test_paste_alpha_is_dilated_and_blurred():
    mask = torch.zeros(1, 8, 8)
    mask[:, 3:5, 3:5] = 1
    alpha = realfill.paste_alpha(mask)[0, 0]
    # dilated (3x3 max) to rows/cols 2..5, then a 3x3 box average
    assert float(alpha[3, 3]) == 1.0 and float(alpha[2, 2]) == pytest.approx(4 / 9)
    assert float(alpha[1, 1]) == pytest.approx(1 / 9) and float(alpha[0, 0]) == 0.0


# ---------------------------------------------------------------------------------------------- train / save / transfer


@pytest.mark.parametrize("method", ["custom-diffusion", "break-a-scene"])
def test_recipe_baselines_train_save_load_transfer(tiny_model_dir, tmp_path, method):
    backbone = shared_backbone(tiny_model_dir)
    seen = {}

    def on_step(step, record):
        seen[step] = _trainable(backbone)

    cfg = learn_config(method, object_class="chair", steps=2, lr=1e-3, token_warmup_lr=1e-2)
    out = tmp_path / f"{method}.safetensors"
    result = baselines.learn_concept(backbone, [random_image()], [square_mask()], cfg, out_path=out,
                                     progress=False, callback=on_step)
    kv = [n for n in seen[2][0]]
    assert len(kv) == 14 and {n.rsplit(".", 2)[-2] for n in kv} == {"to_k", "to_v"}
    assert seen[2][1] == ["embeddings.token_embedding.new"]
    if method == "break-a-scene":
        assert seen[1][0] == [] and seen[1][1] == ["embeddings.token_embedding.new"]   # phase 1: the token only
        assert result.concept.meta["config"]["attn_factor"] == 2                       # tiny UNet: coarsest level
        assert result.history[0]["l_att"] > 0 and result.history[0]["l_roi"] == 0
    else:
        assert seen[1] == seen[2]
        assert result.history[0]["l_att"] == 0 and result.history[0]["l_roi"] == 0
    concept = Concept.load(out)
    assert baselines.recipe_of(concept) == method
    backbone = shared_backbone(tiny_model_dir)
    before = dict(backbone.unet.attn_processors)
    tcfg = transfer_config(method, steps=4, t_start=1)
    res = baselines.transfer_concept(backbone, concept, random_image(seed=3), square_mask(box=(20, 40, 10, 40)),
                                     tcfg, progress=False)
    assert res.images.shape == (1, 3, 64, 64) and res.guided_steps == []             # eta = 0: no guidance
    assert dict(backbone.unet.attn_processors) == before
    gen = baselines.generate_concept(backbone, concept, generate_config(method, steps=1), progress=False)
    assert gen.images.shape == (1, 3, 64, 64) and gen.base_steps == 0


def test_realfill_trains_kv_and_token_on_the_inpainting_model(tiny_inpaint_dir, tmp_path):
    backbone = shared_backbone(tiny_inpaint_dir)
    base = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    seen = {}

    def on_step(step, record):
        seen[step] = _trainable(backbone)

    cfg = learn_config("realfill", object_class="chair", steps=2, batch_size=2, micro_batch=1, lr=1e-3,
                                 checkpoint_every=1)
    out = tmp_path / "rf.safetensors"
    result = baselines.learn_concept(backbone, [random_image()], [square_mask()], cfg, out_path=out,
                                     log_path=tmp_path / "rf.jsonl", progress=False, callback=on_step)
    unet, text = seen[1]
    assert len(unet) == 14 and {n.rsplit(".", 2)[-2] for n in unet} == {"to_k", "to_v"}
    assert text == ["embeddings.token_embedding.new"]
    for k, v in backbone.unet.state_dict().items():           # the base UNet is untouched
        if k in base:
            assert torch.equal(v, base[k]), k
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert out.exists() and not (tmp_path / "rf.safetensors.ckpt").exists()
    concept = Concept.load(out)
    assert baselines.recipe_of(concept) == "realfill" and concept.meta["prompt"] == "a photo of <v*>"
    assert {k.rsplit(".", 2)[-2] for k in concept.attn_weights} == {"to_k", "to_v"}

    # loss only inside M_s: with an empty weight map nothing would be learned, with the mask something is
    assert result.history[0]["l_realfill"] > 0

    backbone = shared_backbone(tiny_inpaint_dir)
    target, mask = random_image(seed=5), square_mask(box=(20, 40, 10, 40))
    res = baselines.transfer_concept(backbone, concept, target, mask, transfer_config("realfill", steps=2),
                                     progress=False)
    assert res.images.shape == (1, 3, 64, 64) and res.attention.shape[:3] == (2, 1, 1)
    far = realfill.paste_alpha(mask)[0] == 0                  # outside the dilated, blurred mask: the target exactly
    assert torch.equal(res.images[0][far.expand(3, -1, -1)], target[far.expand(3, -1, -1)])
    gen = baselines.generate_concept(backbone, concept, generate_config("realfill", steps=1),
                                     progress=False)
    assert gen.images.shape == (1, 3, 64, 64)


def test_realfill_needs_an_inpainting_model(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    with pytest.raises(ModelError, match="needs an inpainting model"):
        realfill.learn_realfill(backbone, [random_image()], [square_mask()], learn_config("realfill"))


def test_realfill_inpainting_equals_the_stock_pipeline(tiny_inpaint_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from clic.imaging import to_pil
    from clic.concept import applied_concept

    backbone = load_backbone(tiny_inpaint_dir, device="cpu")
    cfg = learn_config("realfill", steps=1, batch_size=1, lr=1e-2)
    concept = baselines.learn_concept(backbone, [random_image()], [square_mask()], cfg, progress=False).concept
    backbone = load_backbone(tiny_inpaint_dir, device="cpu")
    target = torch.from_numpy(__import__("numpy").asarray(to_pil(random_image(seed=7)), dtype="float32")
                              ).permute(2, 0, 1) / 127.5 - 1
    mask = square_mask(box=(16, 48, 8, 40))
    tcfg = transfer_config("realfill", steps=3, scheduler="ddim", guidance_scale=2.0, composite=False,
                                     seeds=(4,))
    ours = baselines.transfer_concept(backbone, concept, target, mask, tcfg, progress=False)

    with applied_concept(backbone, concept):
        pipe = StableDiffusionInpaintPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
            scheduler=DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        stock = pipe("a photo of <v*>", image=to_pil(target), mask_image=to_pil(mask), height=64, width=64,
                     num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(4),
                     output_type="pt").images
    torch.testing.assert_close((ours.images + 1) / 2, stock.float(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_learn_method_and_baseline_transfer(tiny_model_dir, tiny_inpaint_dir, tmp_path, example_paths, capsys):
    image, mask = example_paths
    out = tmp_path / "rf.safetensors"
    sources = ["--image", image, "--mask", mask, "--device", "cpu", "-q", "--object-class", "chair"]
    base = ["learn", *sources]
    assert main(["realfill", "learn", *sources, "--model", tiny_inpaint_dir, "--steps", "1", "--batch-size", "2",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert "l_realfill=" in capsys.readouterr().out and out.exists()
    assert main(["baselines", "transfer", str(out), "--target", image, "--mask", mask, "--out", str(tmp_path / "t"),
                 "--steps", "2", "-q", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert (tmp_path / "t" / "seed0.png").exists() and (tmp_path / "t" / "grid.png").exists()
    cd = tmp_path / "cd.safetensors"
    assert main(base + ["--recipe", "custom-diffusion", "--model", tiny_model_dir, "--steps", "1",
                        "--out", str(cd)]) == 0, capsys.readouterr().err
    assert Concept.load(cd).meta["method"] == "custom-diffusion"
    capsys.readouterr()
    # refused before any model loads: one line, exit code 2
    for command, extra, message in ((["realfill", "learn", *sources], ["--alpha", "0.3"], "--alpha"),
                                    (base, ["--batch-size", "2"], "--batch-size"),
                                    (["realfill", "learn", *sources], ["--save-maps", str(tmp_path)], "--save-maps")):
        assert main(command + ["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors"),
                               *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["baselines", "list"]) == 0
    assert "realfill" in capsys.readouterr().out
