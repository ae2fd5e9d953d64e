"""RoI matching (sec. 3.3): w* masks on sources and targets, discovery, several tokens on one image, the CLI.

The mechanism tests run on the tiny model, whose VAE scaling factor gives unit-variance latents
(:func:`clic.builder.latent_scaling_factor`; with SD's 0.18215 the random tiny VAE's latents have std ~0.04, the UNet
sees almost nothing of the image after noising, and w*'s maps stay flat: IoU at chance level).
"""


import numpy as np

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_backbone
from PIL import Image

from clic.cli import main
from clic.concept import Concept, applied_concept
from clic.config import learn_config as make_config
from clic.errors import ConceptFileError, InputError
from clic.imaging import to_pil
from clic.learn import learn
from clic.maps import token_attention_maps
from clic.roi import (DiscoverConfig, MaskConfig, MatchConfig, Matcher, attention_to_mask, auto_target_mask,
                      discover, learn_matcher, matcher_attention, otsu_threshold)
from clic_lab.compare.metrics import iou

SIZE = 64
BOX = (8, 56, 4, 28)      # rows, cols of the source RoI: a tall band on the left


def _background(seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    return torch.stack([0.1 * xx, 0.1 * yy, 0.05 * (xx + yy)]) + 0.02 * torch.randn(3, SIZE, SIZE, generator=g)


def _box_mask(r0, r1, c0, c1):
    m = torch.zeros(1, SIZE, SIZE)
    m[:, r0:r1, c0:c1] = 1
    return m


def _paste_stripes(image, mask, period=3):
    """Red and white vertical stripes where ``mask`` is 1."""
    stripes = ((torch.arange(SIZE) // period) % 2).float().expand(SIZE, SIZE)
    pattern = torch.stack([torch.full((SIZE, SIZE), 0.9), -0.8 + 1.6 * stripes, -0.8 + 1.6 * stripes])
    return torch.where(mask.bool(), pattern, image)


def _source():
    mask = _box_mask(*BOX)
    return _paste_stripes(_background(), mask), mask


def _box_baseline(mask):
    """Mean IoU of a box of the mask's size placed anywhere: the chance level of a mask of that shape."""
    rows, cols = mask[0].any(1).nonzero().flatten(), mask[0].any(0).nonzero().flatten()
    h, w = len(rows), len(cols)
    scores = [iou(_box_mask(r, r + h, c, c + w), mask) for r in range(SIZE - h + 1) for c in range(SIZE - w + 1)]
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def seeing_model_dir(tiny_model_dir):
    """The tiny model, checked to give latents of about unit variance on this test's images."""
    backbone = shared_backbone(tiny_model_dir)
    images = torch.stack([_source()[0], _background(1), torch.rand(3, SIZE, SIZE) * 2 - 1])
    with torch.no_grad():
        std = float(backbone.encode_image(images).std())
    assert 0.5 < std < 2.0, f"tiny model latents have std {std:.3f}: its VAE scaling factor is not calibrated"
    return tiny_model_dir


@pytest.fixture(scope="module")
def matched(seeing_model_dir, tmp_path_factory):
    """A concept learned on the source (v* with l_att, K/V trained, 50 steps), then w* learned from it (30 steps)."""
    torch.manual_seed(0)
    image, mask = _source()
    backbone = shared_backbone(seeing_model_dir)
    concept = learn(backbone, [image], [mask], make_config(steps=50, lr=3e-3, use_con=False, use_roi=False,
                                                         object_class="chair"), progress=False).concept
    concept_path = tmp_path_factory.mktemp("concepts") / "chair.safetensors"
    concept.save(concept_path)
    before = dict(backbone.unet.attn_processors)
    l_att = []
    matcher = learn_matcher(backbone, concept, image, mask, MatchConfig(steps=30, lr=1e-2), concept_path=concept_path,
                            progress=False, callback=lambda step, record: l_att.append(record["l_att"]))
    assert dict(backbone.unet.attn_processors) == before, "learn_matcher() left other processors installed"
    return dict(backbone=backbone, concept=concept, concept_path=concept_path, matcher=matcher, l_att=l_att,
                image=image, mask=mask)


# ---------------------------------------------------------------------------------------------- match


def test_w_star_trains_only_its_token_with_the_attention_loss(matched):
    m = matched["matcher"]
    assert m.tokens == ["<w*>"] and m.prompt == "a <w*> region of a chair"
    assert m.token.attn_weights == {}                                # the concept's K/V stay in the concept
    assert m.token.meta["initialised_from"] == "<v*>" and m.token.meta["config"]["train"] == "token"
    assert not torch.equal(m.token.embeddings[0], matched["concept"].embeddings[0])
    l_att = matched["l_att"]
    assert sum(l_att[-10:]) / 10 < 0.75 * sum(l_att[:5]) / 5, l_att


def test_w_star_mask_on_source_and_on_flipped_and_shifted_copies(matched):
    backbone, matcher, image, mask = (matched[k] for k in ("backbone", "matcher", "image", "mask"))
    before = dict(backbone.unet.attn_processors)
    chance = _box_baseline(mask)
    scores = {}
    for name, im, truth in (("source", image, mask), ("flipped", image.flip(-1), mask.flip(-1)),
                            ("shifted", image.roll(28, -1), mask.roll(28, -1))):
        found = auto_target_mask(backbone, matcher, im)
        assert found.shape == (1, SIZE, SIZE) and set(found.unique().tolist()) <= {0.0, 1.0}
        scores[name] = (iou(found, truth), iou(found, mask))
    assert dict(backbone.unet.attn_processors) == before, "auto_target_mask() changed the processors"
    print(f"chance (box anywhere) {chance:.3f}; IoU with the true place, with the source place: {scores}")
    assert scores["source"][0] > max(0.5, chance + 0.25), scores
    for name in ("flipped", "shifted"):          # the mask moved with the pattern
        own, stayed = scores[name]
        assert own > chance + 0.15 and own > stayed + 0.25, (name, scores, chance)


def test_matcher_file_is_small_and_reloads_with_its_concept(matched, tmp_path):
    backbone, matcher, image = matched["backbone"], matched["matcher"], matched["image"]
    path = matcher.save(tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["token_embeddings"]
    loaded = Matcher.load(path)                                      # concept found by its recorded path
    assert loaded.parent is not None and loaded.prompt == matcher.prompt
    torch.testing.assert_close(matcher_attention(backbone, loaded, image), matcher_attention(backbone, matcher, image))
    assert torch.equal(auto_target_mask(backbone, path, image), auto_target_mask(backbone, matcher, image))

    other = Concept(matched["concept"].tokens, matched["concept"].embeddings + 1, matched["concept"].attn_weights,
                    matched["concept"].meta)
    with pytest.raises(ConceptFileError, match="another concept"):
        Matcher.load(path, other)
    with pytest.raises(ConceptFileError, match="not a w\\* matcher"):
        Matcher.load(matched["concept_path"])


# ---------------------------------------------------------------------------------------------- map -> mask


def test_otsu_splits_a_bimodal_map():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([0.2 + 0.05 * torch.randn(700, generator=g), 0.8 + 0.05 * torch.randn(300, generator=g)])
    level = otsu_threshold(values.clamp(0, 1))
    assert 0.3 < level < 0.7
    assert int((values >= level).sum()) == 300


def test_attention_to_mask_threshold_smoothing_dilation():
    attention = torch.zeros(16, 16)
    attention[4:8, 4:8] = 1.0
    attention[12, 12] = 0.45                                          # a weak isolated peak
    plain = attention_to_mask(attention, 64)
    assert plain.shape == (1, 64, 64) and 0.05 < plain.mean() < 0.12
    low = attention_to_mask(attention, 64, MaskConfig(threshold="0.3"))
    assert low[0, 49, 49] == 1 and plain[0, 49, 49] == 0                # the fixed level keeps the weak peak
    assert attention_to_mask(attention, 64, MaskConfig(threshold=0.3)).equal(low)
    smooth = attention_to_mask(attention, 64, MaskConfig(threshold="0.3", smooth=3.0))
    assert smooth[0, 49, 49] == 0                                      # smoothing removes it
    grown = attention_to_mask(attention, 64, MaskConfig(dilate=2))
    assert bool((grown >= plain).all()) and grown.sum() > plain.sum()
    for bad in ("1.5", "-0.1", "half", 2.0):
        with pytest.raises(InputError, match="--threshold must be"):
            attention_to_mask(attention, 64, MaskConfig(threshold=bad))
    with pytest.raises(InputError, match="flat"):
        attention_to_mask(torch.ones(16, 16), 64)


# ---------------------------------------------------------------------------------------------- discover


def _pattern_copies():
    """Copies of one image with the same striped patch pasted at different places, and the true places."""
    places = [(4, 36, 4, 36), (28, 60, 28, 60), (4, 36, 28, 60)]
    masks = [_box_mask(*p) for p in places]
    return [_paste_stripes(_background(), m) for m in masks], masks


def test_discover_masks_come_from_w_star_and_feed_in_context_learning(seeing_model_dir, tmp_path):
    """Wiring of automatic source masks: w* + K/V trained with the plain diffusion loss, its maps thresholded into
    one mask per image, the saved w* reproduces them, and in-context learning uses them. (Whether w* lands on the
    common pattern needs a pretrained model: on the random tiny model the IoU with the true places stays at chance,
    so it is printed, not asserted.)"""
    images, truths = _pattern_copies()
    backbone = shared_backbone(seeing_model_dir)
    learn_cfg = make_config(steps=1, lr=1e-3, object_class="chair")
    result = discover(backbone, images, DiscoverConfig(object_class="chair", steps=4, lr=1e-2), MaskConfig(),
                      learn_cfg, progress=False)
    assert result.matcher.prompt == "a chair with <w*> style" and result.matcher.token.attn_weights
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 1]
    assert all(r["l_att"] == 0 and r["l_roi"] == 0 for r in result.history[:4])   # plain diffusion loss
    for k, (image, mask, attention) in enumerate(zip(images, result.masks, result.maps)):
        assert mask.shape == (1, SIZE, SIZE) and 0 < mask.mean() < 1
        assert torch.equal(mask, attention_to_mask(attention, SIZE))
        assert torch.equal(auto_target_mask(backbone, result.matcher, image), mask)   # w* + K/V, no retraining
    assert result.concept.tokens == ["<v*>"] and result.concept.meta["source_masks"].startswith("discovered")
    path = result.matcher.save(tmp_path / "pattern.safetensors")
    assert torch.equal(auto_target_mask(backbone, Matcher.load(path), images[0]), result.masks[0])
    chance = sum(_box_baseline(t) for t in truths) / len(truths)
    found = [iou(m, t) for m, t in zip(result.masks, truths)]
    print(f"discover on the tiny model: IoU with the true places {[round(x, 3) for x in found]}, chance {chance:.3f}")

    before = dict(backbone.unet.attn_processors)                # the in-context concept's, as learn() leaves them
    only_masks = discover(backbone, images, DiscoverConfig(object_class="chair", steps=1, learn_concept=False),
                          progress=False)
    assert only_masks.concept is None and len(only_masks.masks) == 3
    assert dict(backbone.unet.attn_processors) == before


# ---------------------------------------------------------------------------------------------- several concepts


def test_two_masks_on_one_image_each_token_attends_to_its_own_region(seeing_model_dir):
    """Fig. 6: two patterns of one image, one token each; each token's attention stays on its own region."""
    masks = torch.cat([_box_mask(6, 30, 6, 58), _box_mask(38, 60, 10, 54)])
    image = _paste_stripes(_background(), masks[:1])
    dots = (((torch.arange(SIZE) // 4) % 2).view(-1, 1) * ((torch.arange(SIZE) // 4) % 2).view(1, -1)).float()
    image = torch.where(masks[1:].bool(), torch.stack([-0.6 + dots, -0.6 + dots, torch.full_like(dots, 0.9)]), image)
    backbone = shared_backbone(seeing_model_dir)
    cfg = make_config(steps=40, lr=3e-3, use_con=False, use_roi=False, object_class="necklace", flip_p=0.0)
    result = learn(backbone, [image], [masks], cfg, progress=False)
    with applied_concept(backbone, result.concept):
        maps = token_attention_maps(backbone, backbone.encode_image(image[None]), cfg.context_prompt(2),
                                    result.concept.tokens)
    small = F.interpolate(masks[None], size=maps.shape[-2:], mode="area")[0] > 0.5
    for j in range(2):
        own, other = float(maps[j][small[j]].mean()), float(maps[j][small[1 - j]].mean())
        print(f"{result.concept.tokens[j]}: mean CA on its own region {own:.3f}, on the other's {other:.3f}")
        assert own > 1.3 * other, (j, own, other)


# ---------------------------------------------------------------------------------------------- CLI


def _png(tensor, path, size=None):
    image = to_pil(tensor)
    if size is not None:
        image = image.resize(size, Image.BICUBIC)
    image.save(path)
    return str(path)


def test_cli_match_trains_w_star_then_reuses_it(seeing_model_dir, tmp_path, capsys):
    image, mask = _source()
    src, msk = _png(image, tmp_path / "src.png"), _png(mask, tmp_path / "src_mask.png")
    wide = _png(image.flip(-1), tmp_path / "wide.png", size=(96, 64))       # other size and aspect ratio
    concept = tmp_path / "c.safetensors"
    assert main(["learn", "--model", seeing_model_dir, "--device", "cpu", "--image", src, "--mask", msk,
                 "--out", str(concept), "--steps", "2", "-q", "--object-class", "chair"]) == 0
    out = tmp_path / "out"
    rc = main(["match", "--model", seeing_model_dir, "--device", "cpu", "--concept", str(concept), "--source", src,
               "--mask", msk, "--target", wide, "--target", src, "--out", str(out), "--steps", "2", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "matcher.safetensors").exists()
    for stem in ("wide", "src"):
        assert {(out / f"{stem}_{kind}.png").exists() for kind in ("mask", "overlay", "attention")} == {True}
    assert Image.open(out / "grid.png").size == (2 * 256, 2 * (256 + 14))
    full = Image.open(out / "wide_mask.png")
    assert full.size == (96, 64) and full.mode == "L"
    assert set(full.convert("L").tobytes()) <= {0, 255}

    again = tmp_path / "again"
    rc = main(["match", "--matcher", str(out / "matcher.safetensors"), "--model", seeing_model_dir, "--device", "cpu",
               "--target", src, "--out", str(again), "--threshold", "0.5", "--dilate", "1"])
    assert rc == 0, capsys.readouterr().err
    assert (again / "src_mask.png").exists() and not (again / "matcher.safetensors").exists()


def test_cli_discover_writes_masks_pattern_and_concept(seeing_model_dir, tmp_path, capsys):
    images, _ = _pattern_copies()
    paths = [_png(im, tmp_path / f"copy{k}.png") for k, im in enumerate(images[:2])]
    out = tmp_path / "found"
    (tmp_path / "learn.yaml").write_text("steps: 2\n")                   # the in-context learning's options
    rc = main(["discover", "--model", seeing_model_dir, "--device", "cpu", "--image", paths[0], "--image", paths[1],
               "--object-class", "chair", "--steps", "2", "--learn-config", str(tmp_path / "learn.yaml"),
               "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "pattern.safetensors").exists() and (out / "concept.safetensors").exists()
    assert (out / "copy0_mask.png").exists() and (out / "copy1_overlay.png").exists()
    assert Image.open(out / "grid.png").size == (2 * 256, 2 * (256 + 14))    # masks over attention, a column each
    assert Concept.load(out / "concept.safetensors").meta["config"]["steps"] == 2


def _refused(argv, capsys, out):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("clic: error:"), err
    assert not out.exists(), "something was written"
    return err


def test_cli_bad_inputs_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, example_paths):
    image, mask = example_paths
    out = tmp_path / "out"
    small = tmp_path / "small.png"
    Image.new("RGB", (128, 128), (200, 30, 30)).save(small)
    model = ["--model", tiny_model_dir, "--device", "cpu"]
    disc = ["discover", *model, "--out", str(out), "--steps", "1", "-q"]

    err = _refused([*disc, "--image", image, "--image", str(small)], capsys, out)
    assert "same size" in err
    err = _refused([*disc, "--image", image], capsys, out)
    assert "at least 2 images" in err
    for bad in ("1.5", "-0.2", "otsux"):
        err = _refused([*disc, "--image", image, "--image", image, "--threshold", bad], capsys, out)
        assert "--threshold" in err
        err = _refused(["match", *model, "--matcher", str(tmp_path / "w.safetensors"), "--target", image,
                        "--out", str(out), "--threshold", bad], capsys, out)
        assert "--threshold" in err
    _refused(["match", *model, "--target", image, "--out", str(out)], capsys, out)
    _refused(["match", *model, "--source", image, "--mask", mask, "--target", image, "--out", str(out)], capsys, out)
    err = _refused(["match", *model, "--matcher", str(tmp_path / "missing.safetensors"), "--target", image,
                    "--out", str(out)], capsys, out)
    assert "not found" in err
    _refused(["match", *model, "--matcher", str(tmp_path / "w.safetensors"), "--source", image, "--mask", mask,
              "--target", image, "--out", str(out)], capsys, out)
    _refused(["match", *model, "--matcher", str(tmp_path / "w.safetensors"), "--target", str(tmp_path / "nope.png"),
              "--out", str(out)], capsys, out)


def test_cli_transfer_with_automatic_target_mask(seeing_model_dir, tmp_path, capsys):
    """`clic transfer --mask auto --matcher W` finds M_tg with w*, writes it, and edits inside it."""
    image, mask = _source()
    src, msk = _png(image, tmp_path / "src.png"), _png(mask, tmp_path / "src_mask.png")
    concept = tmp_path / "c.safetensors"
    assert main(["learn", "--model", seeing_model_dir, "--device", "cpu", "--image", src, "--mask", msk,
                 "--out", str(concept), "--steps", "2", "-q", "--object-class", "chair"]) == 0
    assert main(["match", "--model", seeing_model_dir, "--device", "cpu", "--concept", str(concept), "--source", src,
                 "--mask", msk, "--target", src, "--out", str(tmp_path / "m"), "--steps", "2", "-q"]) == 0
    out = tmp_path / "t"
    rc = main(["transfer", str(concept), "--model", seeing_model_dir, "--device", "cpu", "--target", src,
               "--mask", "auto", "--matcher", str(tmp_path / "m" / "matcher.safetensors"), "--out", str(out),
               "--steps", "4", "-q"])
    assert rc == 0, capsys.readouterr().err
    auto = np.asarray(Image.open(out / "mask_auto.png").convert("L")) > 127
    assert 0 < auto.sum() < auto.size
    assert (out / "seed0.png").exists()
    capsys.readouterr()
    assert main(["transfer", str(concept), "--model", seeing_model_dir, "--target", src, "--mask", "auto",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--matcher" in capsys.readouterr().err and not (tmp_path / "no").exists()
