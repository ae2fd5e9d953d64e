"""The quality benchmark on the procedural world: held-out patterns learned from one image, transferred to the
analogous part of another object, scored by the pattern detector.

    python -m clic.toyworld.benchmark make --out DIR [--cases 30] [--seed 0] [--model PATH] [--steps 150]
    python -m clic.toyworld.benchmark run DIR [--out DIR/results]

``make`` renders the cases (source: an object with a held-out pattern on a part; target: a plain object of the
same class, its same part as the target mask) and writes ``manifest.yaml`` (CLiC, Custom Diffusion,
Break-A-Scene, the three loss ablations and an eta sweep; RealFill needs an inpainting model, which the toy world
does not have) plus ``truth.json`` (each case's pattern and the target's object mask). ``run`` registers the
``pattern`` metric and runs ``clic benchmark``:

- ``presence``: the detector finds the source pattern inside the target region of the result (1/0);
- ``leakage``: it finds the source pattern on the rest of the target object (1/0);
- ``psnr`` (out of the target mask; transfers run without the pixel composite, which would make it infinite) and
  the attention localisation come from :mod:`clic.benchmark`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .world import HELD_OUT_PATTERNS, render_scene

# (class, part) pairs whose parts are big enough at 64 px for a pattern to be recognisable
PAIRS = (("chair", "back"), ("house", "walls"), ("vase", "body"), ("lamp", "shade"), ("table", "top"),
         ("mug", "body"))


def make_cases(out_dir, n_cases: int = 30, seed: int = 0, model: str | None = None, steps: int = 300,
               sample_steps: int = 50, size: int = 64) -> Path:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases, truth = [], {}
    for i in range(n_cases):
        cls, part = PAIRS[i % len(PAIRS)]
        pattern = HELD_OUT_PATTERNS[(i // len(PAIRS)) % len(HELD_OUT_PATTERNS)]
        s_seed, t_seed = int(rng.integers(1 << 30)), int(rng.integers(1 << 30))
        src = render_scene(s_seed, size=size, object_class=cls, pattern=pattern, part=part, split="any")
        tgt = render_scene(t_seed, size=size, object_class=cls, pattern="none", split="any")
        cid = f"{i:02d}-{cls}-{part}-{pattern}"
        files = {}
        for name, arr in (("source", src.image), ("source_mask", src.part_masks[part]), ("target", tgt.image),
                          ("target_mask", tgt.part_masks[part]), ("target_object", tgt.object_mask)):
            path = out / "images" / f"{cid}_{name}.png"
            img = arr if arr.ndim == 3 else (arr.astype(np.uint8) * 255)
            Image.fromarray(img).save(path)
            files[name] = str(path.relative_to(out))
        cases.append({"id": cid, "source": files["source"], "source_mask": files["source_mask"],
                      "target": files["target"], "target_mask": files["target_mask"], "object_class": cls})
        truth[cid] = {"pattern": pattern, "part": part, "target_object": files["target_object"]}
    manifest = {
        "name": f"toyworld-{n_cases}", "model": model or "toy",
        "learn": {"steps": steps, "lr": 1e-3},
        # composite off: out-of-mask PSNR then measures what the latent blending preserves (with the pixel composite
        # it is infinite by construction)
        "transfer": {"steps": sample_steps, "seeds": [0], "composite": False},
        "metrics": ["psnr", "localisation", "pattern"],
        # Break-A-Scene: its token-only phase scaled to the same step budget (400 of 800 in its recipe)
        "methods": ["clic", "custom-diffusion",
                    {"name": "break-a-scene", "method": "break-a-scene", "learn": {"token_warmup_steps": steps // 2}}],
        "ablations": {"losses": True, "eta": [0, 5]},
        "cases": cases,
    }
    import yaml

    (out / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return out / "manifest.yaml"


def register_pattern_metric(truth_path) -> None:
    from ..benchmark import register_metric
    from ..imaging import to_pil
    from .detector import PatternDetector

    root = Path(truth_path).parent
    truth = json.loads(Path(truth_path).read_text())

    def score(sample) -> dict:
        det = sample.context.get("detector")
        if det is None:
            det = sample.context["detector"] = PatternDetector.load()
        info = truth[sample.case.id]
        image = np.asarray(to_pil(sample.result))
        region = sample.target_mask[0].cpu().numpy() > 0.5
        size = image.shape[0]
        obj = np.asarray(Image.open(root / info["target_object"]).convert("L").resize((size, size))) > 127
        rest = obj & ~region
        presence = float(det.predict(image, region)[0] == info["pattern"])
        leakage = float(det.predict(image, rest)[0] == info["pattern"]) if rest.sum() >= 16 else None
        return {"presence": presence, "leakage": leakage}

    register_metric("pattern", ("presence", "leakage"), score, lower_is_better=("leakage",))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clic.toyworld.benchmark")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="default: the bundled toy model")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sample-steps", type=int, default=50)
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        model = args.model
        if model is None:
            from ..demo import bundled_model

            model = str(bundled_model())
        print(make_cases(args.out, args.cases, args.seed, model, args.steps, args.sample_steps))
        return 0
    from ..benchmark import run_benchmark

    root = Path(args.dir)
    register_pattern_metric(root / "truth.json")
    report = run_benchmark(root / "manifest.yaml", args.out or root / "results", args.device)
    if report is not None:
        print(report.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
