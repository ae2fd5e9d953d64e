"""``clic demo``: the offline main job. Learns a concept from the bundled example image and mask, and writes
the concept, its attention previews and a short report.

It runs on the bundled toy model when the package ships one (``clic/assets/toymodel``), else on a tiny
random-init model built on the fly (that one only shows the mechanics: its images are noise).
``--model`` switches to SD1.4 or any other diffusers checkpoint.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

ASSETS = resources.files("clic") / "assets"


def bundled_model() -> Path | None:
    path = Path(str(ASSETS / "toymodel"))
    return path if (path / "model_index.json").is_file() else None


def run_demo(out_dir, model: str | None = None, steps: int = 100, device: str | None = None, progress=True) -> dict:
    from .builder import make_model
    from .imaging import image_size, load_image, load_mask
    from .learn import learn, make_config
    from .maps import save_learning_preview
    from .models import load_backbone

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if model is None:
        model = bundled_model()
        if model is None:
            model = out / "tiny-model"
            if not (model / "model_index.json").is_file():
                make_model("tiny", model)
    backbone = load_backbone(str(model), device)
    image_path = Path(str(ASSETS / "examples" / "chair.png"))
    mask_path = Path(str(ASSETS / "examples" / "chair_mask.png"))
    size = backbone.resolution
    image = load_image(image_path, size)
    mask = load_mask(mask_path, size, image_size(image_path))
    cfg = make_config(steps=steps, object_class="chair", lr=1e-3 if "tiny" in str(model) else 1e-5)
    result = learn(backbone, [image], [mask], cfg, out_path=out / "concept.safetensors",
                   log_path=out / "concept.log.jsonl", progress=progress)
    save_learning_preview(backbone, result, [image], [mask], out / "learning", seed=cfg.seed)
    report = {"model": str(model), "steps": steps, "seconds": round(time.time() - started, 1),
              "final_losses": result.history[-1], "outputs": sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def register_cli(sub, add_model_options) -> None:
    p = sub.add_parser("demo", help="the offline demo: learn a concept from the bundled example and write previews")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=100, help="learning steps (default: 100)")
    p.add_argument("--model", default=None, help="diffusers model (default: the bundled toy model)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=lambda args: print(json.dumps(run_demo(args.out, args.model, args.steps, args.device), indent=2)))
