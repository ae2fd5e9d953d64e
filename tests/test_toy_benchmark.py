"""The procedural-world quality benchmark's mechanics (manifest, RealFill's toy inpainting model, the generation and
RoI-matching measurements) on the bundled toy model with a few steps. Quality numbers come from the full run in
BENCHMARKS.md, never from here."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clic_lab.toyworld.benchmark import extras, make_cases, register_pattern_metric
from clic_lab.toyworld.inpaint import train_inpainting, widen_unet


def test_widened_unet_predicts_what_its_parent_does(backbone):
    """Zero-initialised mask and masked-latent channels: the 9-channel UNet starts as the text-to-image one,
    whatever those channels hold."""
    unet = backbone.unet
    wide = widen_unet(unet)
    c = unet.config.in_channels
    assert wide.config.in_channels == 2 * c + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, backbone.latent_size, backbone.latent_size, generator=g)
    extra = torch.randn(2, c + 1, backbone.latent_size, backbone.latent_size, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 500, text).sample
        out = wide(torch.cat([x, extra], 1), 500, text).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def toy_inpaint_dir(tmp_path_factory):
    from clic.models import bundled_model

    out = tmp_path_factory.mktemp("toyinpaint")
    report = train_inpainting(bundled_model(), out, minutes=5, max_steps=2, n_scenes=16, batch=4, n_held=2,
                              held_steps=4)
    assert report["steps"] == 2 and set(report["held_out_in_mask_psnr_db"]) == {"parent_blended", "inpainting"}
    return out / "pipeline"


def test_toy_inpainting_model_is_an_sd_inpainting_pipeline(toy_inpaint_dir):
    from clic.models import bundled_model, load_backbone

    index = json.loads((toy_inpaint_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    b = load_backbone(str(toy_inpaint_dir), device="cpu")
    assert b.unet.config.in_channels == 9 and b.resolution == load_backbone(str(bundled_model())).resolution


def test_manifest_cases_and_truth(tmp_path, toy_inpaint_dir):
    from clic.models import bundled_model

    path = make_cases(tmp_path, n_cases=7, seed=1, model=str(bundled_model()), steps=2, sample_steps=4,
                      inpaint_model=str(toy_inpaint_dir))
    manifest = yaml.safe_load(path.read_text())
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert len(manifest["cases"]) == 7 and manifest["inpaint_model"] == str(toy_inpaint_dir)
    names = [m if isinstance(m, str) else m["name"] for m in manifest["methods"]]
    assert names == ["clic", "custom-diffusion", "break-a-scene", "clic-official-roi", "realfill"]
    assert manifest["methods"][-1]["learn"] == {"steps": 1}          # a third of the others' 2 steps, at least 1
    for case in manifest["cases"]:
        info = truth[case["id"]]
        assert case["id"].endswith(f"-{info['part']}-{info['pattern']}") and case["object_class"] in case["id"]
        assert case["prompt"].endswith(f" <v*> {info['part']}") and f" {case['object_class']} with " in case["prompt"]
        target = np.asarray(Image.open(tmp_path / case["target_mask"])) > 127
        obj = np.asarray(Image.open(tmp_path / info["target_object"])) > 127
        assert target.sum() > 0 and not (target & ~obj).any()        # the target part lies on the target object
        # the discovery renders: the source's class, pattern and pattern colour on the same part, other objects
        renders = [np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in info["discover"]["images"]]
        masks = [np.asarray(Image.open(tmp_path / f)) > 127 for f in info["discover"]["masks"]]
        assert len(renders) == len(masks) == 3 and all(m.sum() > 0 for m in masks)
        source = np.asarray(Image.open(tmp_path / case["source"]).convert("RGB"))
        assert all(not np.array_equal(r, source) for r in renders)
        from clic_lab.toyworld.evaluate import top_colours

        assert all(info["discover"]["pattern_colour"] in top_colours(r, m, 2) for r, m in zip(renders, masks))
    # the discovery renders do not disturb the cases' draws: case 0's source is still the scene of the seed's first draw
    from clic_lab.toyworld.world import HELD_OUT_PATTERNS, render_scene

    first = render_scene(int(np.random.default_rng(1).integers(1 << 30)), object_class="chair",
                         pattern=HELD_OUT_PATTERNS[0], part="back")
    assert np.array_equal(np.asarray(Image.open(tmp_path / manifest["cases"][0]["source"]).convert("RGB")), first.image)


def test_run_and_extras_on_one_case(tmp_path, monkeypatch):
    """Transfer benchmark + generation + RoI matching for CLiC alone on one case: every number is produced and in
    range."""
    from clic_lab.compare import run_benchmark
    from clic.models import bundled_model

    make_cases(tmp_path, n_cases=1, model=str(bundled_model()), steps=2, sample_steps=4)
    manifest = yaml.safe_load((tmp_path / "manifest.yaml").read_text())
    manifest["methods"], manifest["ablations"] = ["clic"], {}
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    register_pattern_metric(tmp_path / "truth.json")
    report = run_benchmark(tmp_path / "manifest.yaml", tmp_path / "results", "cpu", progress=False)
    with open(report.results_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["presence"]) in (0.0, 1.0) and float(rows[0]["colour"]) in (0.0, 0.5, 1.0)

    summary = extras(tmp_path, tmp_path / "results", n_images=1, match_steps=2, device="cpu")
    gen = summary["generation"]["clic"]
    assert gen["n"] == 1 and 0.0 <= gen["on_part"][0] <= 1.0
    match = summary["roi_matching"]["clic"]
    assert match["n"] == 1 and 0.0 <= match["iou"][0] <= 1.0 and 0.0 < match["area"][0] <= 1.0
    assert "| w* from clic | 1 |" in (tmp_path / "results" / "extras.md").read_text()
    text = summary["text_controls"]
    assert set(text) == {"text-name", "text-other"} and all(s["n"] == 1 for s in text.values())
    assert all(0.0 <= s["presence"][0] <= 1.0 for s in text.values())
    found = summary["discover"]
    assert set(found) == {"discover", "discover-new", "untrained", "object"} and all(s["n"] == 1 for s in found.values())
    assert all(0.0 <= s["iou"][0] <= 1.0 and 0.0 < s["area"][0] < 1.0 for s in found.values())
    assert found["object"]["iou"][0] > 0.1                      # the part is a good share of its object
    assert (tmp_path / "results" / "discover" / f"{manifest['cases'][0]['id']}.png").exists()
    assert "| discover: w* on a new image | 1 |" in (tmp_path / "results" / "extras.md").read_text()
    pipeline = summary["pipeline"]
    assert set(pipeline) == {"discovered-masks", "true-masks"} and all(s["n"] == 1 for s in pipeline.values())
    assert all(s["presence"][0] in (0.0, 1.0) and s["colour"][0] in (0.0, 0.5, 1.0) for s in pipeline.values())
    assert "| discovered masks | 1 |" in (tmp_path / "results" / "extras.md").read_text()

    # recomputing some parts keeps the others' rows; a fresh process (`run --extras-only`) has no pattern metric
    # registered, which the pipeline's manifest names
    from clic_lab.compare import METRIC_GROUPS

    monkeypatch.delitem(METRIC_GROUPS, "pattern")
    before = json.loads((tmp_path / "results" / "extras.json").read_text())["rows"]
    again = extras(tmp_path, tmp_path / "results", n_images=1, match_steps=2, device="cpu", parts=("text", "pipeline"))
    after = json.loads((tmp_path / "results" / "extras.json").read_text())["rows"]
    assert after["generation"] == before["generation"] and after["matching"] == before["matching"]
    assert after["discover"] == before["discover"]
    assert again["text_controls"] == text                      # same seeds, same words: the same transfers
    assert again["pipeline"] == pipeline


def test_text_control_words_and_seen_patterns(tmp_path):
    """The text controls name the case's pattern and another pattern of the same set, each a single CLIP token of
    the toy model's vocabulary; ``--patterns seen`` cases use only the patterns the toy model was trained on."""
    from transformers import CLIPTokenizer

    from clic.models import bundled_model
    from clic_lab.toyworld.benchmark import PATTERN_SETS, SEEN_PATTERNS, text_words
    from clic_lab.toyworld.world import TRAIN_PATTERNS

    tok = CLIPTokenizer.from_pretrained(bundled_model() / "tokenizer")
    for patterns, group in PATTERN_SETS.items():
        for pattern in group:
            words = text_words(pattern, patterns)
            assert words["text-name"] != words["text-other"]
            assert all(len(tok.tokenize(w)) == 1 for w in words.values())
    assert set(SEEN_PATTERNS) <= set(TRAIN_PATTERNS)
    make_cases(tmp_path, n_cases=18, model=str(bundled_model()), steps=2, sample_steps=4, patterns="seen")
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert {t["pattern"] for t in truth.values()} == set(SEEN_PATTERNS)
    assert yaml.safe_load((tmp_path / "manifest.yaml").read_text())["name"] == "toyworld-18-seen"


def test_scores_of_a_source_against_itself(tmp_path):
    """Scored against its own region, a rendered source has its pattern present and both of its colours (the part's
    and the pattern's, as the world drew them: source_colours reads them off the case's source); a colour pair it
    does not have scores 0."""
    from clic.models import bundled_model
    from clic_lab.toyworld.benchmark import pattern_scores, source_colours
    from clic_lab.toyworld.detector import PatternDetector

    make_cases(tmp_path, n_cases=1, model=str(bundled_model()), steps=2, sample_steps=4, patterns="seen")
    case = yaml.safe_load((tmp_path / "manifest.yaml").read_text())["cases"][0]
    info = json.loads((tmp_path / "truth.json").read_text())[case["id"]]
    image = np.asarray(Image.open(tmp_path / case["source"]).convert("RGB"))
    region = np.asarray(Image.open(tmp_path / case["source_mask"])) > 127
    from clic.imaging import load_image, load_mask

    colours = source_colours(load_image(tmp_path / case["source"], 128), load_mask(tmp_path / case["source_mask"], 128))
    assert len(colours) == 2
    det = PatternDetector.load()
    scores = pattern_scores(det, image, region, region, info["pattern"], colours)
    assert scores["presence"] == 1.0 and scores["colour"] == 1.0
    other = [c for c in ("red", "blue", "green", "white", "black") if c not in colours][:2]
    assert pattern_scores(det, image, region, region, info["pattern"], other)["colour"] == 0.0
