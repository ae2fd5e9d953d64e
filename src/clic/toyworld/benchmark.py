"""The quality benchmark on the procedural world: held-out patterns learned from one image, transferred to the
analogous part of another object, scored by the pattern detector.

    python -m clic.toyworld.benchmark make --out DIR [--cases 30] [--seed 0] [--model PATH] [--steps 300]
                                           [--inpaint-model PATH]
    python -m clic.toyworld.benchmark run DIR [--out DIR/results] [--no-extras]

``make`` renders the cases (source: an object with a held-out pattern on a part; target: a plain object of the
same class, its same part as the target mask) and writes ``manifest.yaml`` (CLiC, Custom Diffusion,
Break-A-Scene, the three loss ablations and an eta sweep; RealFill too when ``--inpaint-model`` names the toy
inpainting model of :mod:`clic.toyworld.inpaint`) plus ``truth.json`` (each case's pattern and the target's object
mask). ``run`` registers the ``pattern`` metric and runs ``clic benchmark`` (transfer):

- ``presence``: the detector finds the source pattern inside the target region of the result (1/0);
- ``leakage``: it finds the source pattern on the rest of the target object (1/0);
- ``psnr`` (out of the target mask; transfers run without the pixel composite, which would make it infinite) and
  the attention localisation come from :mod:`clic.benchmark`.

then the two measurements ``clic benchmark`` does not make (:func:`extras`, from the cached concepts; written to
``results/extras.json`` and ``results/extras.md``):

- generation (sec. 4.1): each concept-learning method's concept generates new objects of the case's class
  ("a photo of a chair, with <v*> style", default t_s); ``on_part``: the detector finds the pattern on the
  analogous part (the part's expected region, :func:`clic.toyworld.train.part_region`); ``off_part``: on the rest
  of the object;
- RoI matching (sec. 3.3): w* learned from CLiC's concept on the source mask finds the target mask
  (:func:`clic.roi.auto_target_mask`); ``iou`` against the true part mask.
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


def context_prompt(object_class: str, part: str) -> str:
    """P_s in the grammar of the toy model's captions ("a red chair with a striped back"), v* in the pattern's
    place: "a chair with a <v*> back", "a house with <v*> walls" (CLiC and Custom Diffusion learn and transfer with
    it; Break-A-Scene and RealFill keep their "a photo of <v*>")."""
    article = "an" if object_class[0] in "aeiou" else "a"
    return f"{article} {object_class} with {'' if part.endswith('s') else 'a '}<v*> {part}"


def make_cases(out_dir, n_cases: int = 30, seed: int = 0, model: str | None = None, steps: int = 300,
               sample_steps: int = 50, size: int = 64, inpaint_model: str | None = None) -> Path:
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
                      "target": files["target"], "target_mask": files["target_mask"], "object_class": cls,
                      "prompt": context_prompt(cls, part)})
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
    if inpaint_model:
        # RealFill keeps its batch of 16 per step: a third of the steps still sees 1600 samples (CLiC: 300 x 2)
        manifest["inpaint_model"] = str(inpaint_model)
        manifest["methods"].append({"name": "realfill", "method": "realfill", "learn": {"steps": max(1, steps // 3)}})
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


#: the concept-learning variants whose concepts generate (RealFill's is for its inpainting model only; the eta
#: variants share CLiC's concept)
GENERATION_VARIANTS = ("clic", "custom-diffusion", "break-a-scene", "clic-no-con", "clic-no-att", "clic-no-roi")


def extras(root, results_dir=None, n_images: int = 2, match_steps: int | None = None, match_lr: float | None = None,
           device=None, progress: bool = False) -> dict:
    """Generation and RoI-matching scores from the concepts ``clic benchmark`` cached in ``results_dir``.

    ``match_steps`` / ``match_lr`` default to the manifest's learning steps and lr (the same budget as learning).
    Writes ``extras.json`` (per case and summary) and ``extras.md`` (the tables); returns the summary."""
    import yaml

    from ..benchmark import Cache, mean_ci
    from ..concept import Concept
    from ..generate import GenerateConfig, generate
    from ..imaging import load_image, load_mask, to_pil
    from ..models import load_backbone
    from ..roi import MatchConfig, auto_target_mask, iou, learn_matcher
    from .detector import PatternDetector
    from .train import foreground_mask, part_priors, part_region

    root = Path(root)
    results = Path(results_dir) if results_dir else root / "results"
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    truth = json.loads((root / "truth.json").read_text())
    plan = json.loads((results / "plan.json").read_text())
    keys = {(r["case"], r["method"]): r["learn_key"] for r in plan}
    cache = Cache(results)
    model = manifest["model"] if Path(manifest["model"]).is_absolute() else str(root / manifest["model"])
    backbone = load_backbone(model if Path(model).exists() else manifest["model"], device=device)
    det, priors = PatternDetector.load(), part_priors()
    cases = {c["id"]: c for c in manifest["cases"]}
    learn = manifest.get("learn", {})
    mcfg = MatchConfig(steps=match_steps or learn.get("steps", 300), lr=match_lr or learn.get("lr", 1e-3))

    gen_rows, match_rows = [], []
    for cid, case in cases.items():
        info, cls = truth[cid], case["object_class"]
        for variant in GENERATION_VARIANTS:
            key = keys.get((cid, variant))
            if key is None or not cache.concept_done(key):
                continue
            concept = Concept.load(cache.concept(key))
            res = generate(backbone, concept, GenerateConfig(seeds=tuple(range(n_images)), object_class=cls),
                           progress=progress)
            for k, seed in enumerate(res.seeds):
                img = np.asarray(to_pil(res.images[k]))
                fg = foreground_mask(img)
                region = part_region(img, priors[cls][info["part"]], fg)
                rest = fg & ~region
                on = det.predict(img, region)[0] == info["pattern"]
                off = det.predict(img, rest)[0] == info["pattern"] if rest.sum() >= 16 else None
                gen_rows.append({"case": cid, "method": variant, "seed": seed, "on_part": float(on),
                                 "off_part": None if off is None else float(off)})
        key = keys.get((cid, "clic"))
        if key is not None and cache.concept_done(key):
            size = backbone.resolution
            concept = Concept.load(cache.concept(key))
            source, target = load_image(root / case["source"], size), load_image(root / case["target"], size)
            matcher = learn_matcher(backbone, concept, source, load_mask(root / case["source_mask"], size), mcfg,
                                    progress=progress)
            found = auto_target_mask(backbone, matcher, target)
            match_rows.append({"case": cid, "iou": iou(found, load_mask(root / case["target_mask"], size)),
                               "area": float(found.mean())})
        log_line = f"{cid}: generation {sum(r['case'] == cid for r in gen_rows)} images"
        if match_rows and match_rows[-1]["case"] == cid:
            log_line += f", RoI-matching IoU {match_rows[-1]['iou']:.2f}"
        print(log_line, flush=True)

    def summary(rows, columns, by="method"):
        out = {}
        for name in dict.fromkeys(r.get(by, "clic") for r in rows):
            mine = [r for r in rows if r.get(by, "clic") == name]
            out[name] = {"n": len(mine), **{c: mean_ci([r[c] for r in mine if r[c] is not None]) for c in columns}}
        return out

    report = {"generation": summary(gen_rows, ("on_part", "off_part")),
              "roi_matching": summary(match_rows, ("iou", "area")),
              "match_config": {"steps": mcfg.steps, "lr": mcfg.lr}, "images_per_concept": n_images,
              "rows": {"generation": gen_rows, "roi_matching": match_rows}}
    (results / "extras.json").write_text(json.dumps(report, indent=1, default=str))

    def cell(v):
        return "-" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = ["| method | images | on part ↑ | off part ↓ |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['n']} | {cell(s['on_part'])} | {cell(s['off_part'])} |"
              for m, s in report["generation"].items()]
    lines += ["", "| RoI matching | cases | IoU ↑ | mask area |", "|---|---|---|---|"]
    lines += [f"| w* from clic | {s['n']} | {cell(s['iou'])} | {cell(s['area'])} |"
              for s in report["roi_matching"].values()]
    (results / "extras.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {k: report[k] for k in ("generation", "roi_matching")}


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
    p.add_argument("--inpaint-model", default=None,
                   help="the toy inpainting model (python -m clic.toyworld.inpaint): adds RealFill")
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-extras", action="store_true", help="skip the generation and RoI-matching measurements")
    p.add_argument("--extras-only", action="store_true", help="only the generation and RoI-matching measurements")
    p.add_argument("--images", type=int, default=2, help="extras: generated images per concept")
    args = parser.parse_args(argv)
    if args.cmd == "make":
        model = args.model
        if model is None:
            from ..demo import bundled_model

            model = str(bundled_model())
        print(make_cases(args.out, args.cases, args.seed, model, args.steps, args.sample_steps,
                         inpaint_model=args.inpaint_model))
        return 0
    from ..benchmark import run_benchmark

    root = Path(args.dir)
    out = args.out or root / "results"
    report = None
    if not args.extras_only:
        register_pattern_metric(root / "truth.json")
        report = run_benchmark(root / "manifest.yaml", out, args.device)
        if report is not None:
            print(report.table)
    if not args.no_extras and (args.extras_only or report is not None):   # the main process only
        extras(root, out, n_images=args.images, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
