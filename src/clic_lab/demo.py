"""The offline demo (``clic demo``): the main job, end to end on the CPU in a few minutes.

1. learn v* for a held-out pattern (staggered crosses: the toy model drew crosses only on a grid and never saw this
   pattern named) on the back of a chair, from one bundled source image and its mask (paper sec. 3.1);
2. transfer it to the back of another chair in a bundled target image (sec. 3.2: blending + guidance);
3. generate four new chairs carrying it (sec. 4.1: two-stage sampling);
4. write the images, masks, attention overlays, a grid and a short report (report.md, report.json); on the toy
   model the world's pattern detector says what it sees in the transferred region and on the back of each
   generated chair (where the back should be: :func:`clic_lab.toyworld.evaluate.part_region`).

It runs on the toy model shipped in the package (``clic/assets/toymodel``, trained on the procedural world of
:mod:`clic_lab.toyworld`); without it (or with ``--model tiny``) on a tiny random model built on the fly, which
only shows the mechanics. ``--model`` takes SD1.4 or any diffusers checkpoint; then the learning rate and
step counts of the paper apply unless given.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import numpy as np

from clic.builder import make_model
from clic.config import GenerateConfig, learn_config, transfer_config
from clic.generate import generate
from clic.imaging import grid, heat_overlay, image_size, load_image, load_mask, mask_overlay, save_png, to_pil
from clic.learn import learn
from clic.maps import learning_preview
from clic.models import bundled_model, load_backbone
from clic.transfer import transfer

from .toyworld.detector import PatternDetector
from .toyworld.evaluate import foreground_mask, part_priors, part_region
from .toyworld.examples import DEMO_PART, DEMO_SOURCE

EXAMPLE = {"source": "toy_source.png", "source_mask": "toy_source_mask.png",
           "target": "toy_target.png", "target_mask": "toy_target_mask.png"}


def _asset(name: str) -> Path:
    return Path(str(resources.files("clic") / "assets" / "examples" / EXAMPLE[name]))


def run_demo(out_dir, model: str | None = None, steps: int | None = None, sample_steps: int | None = None,
             device: str | None = None, progress: bool = True) -> dict:
    """Run the demo into ``out_dir``; returns the report dict. ``steps``/``sample_steps`` shorten it (CI)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    toy = False
    if model in (None, "toy"):
        model = bundled_model()
        toy = model is not None
    if model in (None, "tiny"):
        model = out / "tiny-model"
        if not (model / "model_index.json").is_file():
            make_model("tiny", model)
    tiny = not toy and str(model).endswith("tiny-model")
    backbone = load_backbone(str(model), device)
    size = backbone.resolution
    source = load_image(_asset("source"), size)
    source_mask = load_mask(_asset("source_mask"), size, image_size(_asset("source")))
    target = load_image(_asset("target"), size)
    target_mask = load_mask(_asset("target_mask"), size, image_size(_asset("target")))
    timings = {}

    # 1. Learn v* in context.
    if toy or tiny or size <= 128:  # small models: a larger lr and fewer steps than SD1.4's 1e-5 x 500
        cfg = learn_config(steps=steps or 300, lr=1e-3, object_class="chair")
    else:
        cfg = learn_config(steps=steps, object_class="chair")
    t = time.time()
    learned = learn(backbone, [source], [source_mask], cfg, out_path=out / "concept.safetensors",
                    log_path=out / "concept.log.jsonl", progress=progress)
    timings["learn_s"] = round(time.time() - t, 1)
    concept = learned.concept
    for name, image in learning_preview(backbone, concept, [source], [source_mask], seed=cfg.seed).items():
        save_png(image, out / "learning" / name)

    # 2. Transfer to the target's back.
    n = sample_steps or 50
    t = time.time()
    tcfg = transfer_config(steps=n, seeds=(0,), guidance_range=(0, round(0.6 * n)))
    moved = transfer(backbone, concept, target, target_mask, tcfg, progress=progress)
    timings["transfer_s"] = round(time.time() - t, 1)
    save_png(to_pil(moved.images[0]), out / "transfer.png")
    ca = moved.attention[:, 0, 0].mean(0)
    save_png(heat_overlay(moved.images[0], ca), out / "transfer_attention.png")

    # 3. Generate four new chairs with the concept.
    t = time.time()
    gen = generate(backbone, concept, GenerateConfig(steps=n, seeds=(0, 1, 2, 3), object_class="chair"),
                   progress=progress)
    timings["generate_s"] = round(time.time() - t, 1)
    for i, image in enumerate(gen.images):
        save_png(to_pil(image), out / f"generated_{i}.png")

    # 4. Grid and report.
    tiles = [to_pil(source), mask_overlay(source, source_mask), to_pil(target), mask_overlay(target, target_mask),
             to_pil(moved.images[0]), heat_overlay(moved.images[0], ca), *[to_pil(im) for im in gen.images]]
    labels = ["source", "source mask", "target", "target mask", "transfer", "CA(v*)"] + ["generated"] * len(gen.images)
    save_png(grid(tiles, rows=2, labels=labels, cell=max(128, size)), out / "grid.png")
    report = {
        "model": str(model), "toy_model": toy, "learn_steps": cfg.steps, "sample_steps": n,
        "final_losses": {k: round(v, 4) for k, v in learned.history[-1].items() if k.startswith("l_")},
        "seconds": {**timings, "total_s": round(time.time() - t0, 1)},
        "outputs": sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if "tiny-model" not in str(p)),
    }
    if toy:
        report["detector"] = _detect(moved, target_mask, gen)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _detect(moved, target_mask, gen) -> dict:
    """What the toy world's pattern detector sees in the edited region and on the back of each generated chair
    (the back's expected region within the object's foreground, from the world's part priors)."""
    det = PatternDetector.load()
    image = np.asarray(to_pil(moved.images[0]))
    label, _ = det.predict(image, target_mask[0].cpu().numpy() > 0.5)
    prior = part_priors(n=60, classes=("chair",))["chair"][DEMO_PART]
    generated = []
    for im in gen.images:
        arr = np.asarray(to_pil(im))
        fg = foreground_mask(arr)
        generated.append(det.predict(arr, part_region(arr, prior, fg))[0] if fg.sum() >= 20 else "none")
    learned = DEMO_SOURCE["pattern"]
    return {"learned": learned, "transfer_region": label, "transfer_found": label == learned,
            "generated_objects": generated, "generated_found": sum(g == learned for g in generated)}


def _markdown(report: dict) -> str:
    lines = ["# clic demo", "", f"Model: `{report['model']}` ({'bundled toy model' if report['toy_model'] else 'see path'})",
             "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k[:-2]} | {v} |" for k, v in report["seconds"].items()]
    lines += ["", f"Final losses after {report['learn_steps']} steps: " +
              ", ".join(f"{k} = {v}" for k, v in report["final_losses"].items()), ""]
    if "detector" in report:
        d = report["detector"]
        lines += [f"Learned pattern: **{d['learned']}** (held out: the toy model never drew it)", "",
                  f"Pattern detector on the transferred region: **{d['transfer_region']}**",
                  f"Pattern detector on the backs of the generated chairs: {', '.join(d['generated_objects'])} "
                  f"({d['generated_found']} of {len(d['generated_objects'])} carry the learned pattern)", ""]
    lines += ["![grid](grid.png)", "", "Files: " + ", ".join(report["outputs"])]
    return "\n".join(lines) + "\n"
