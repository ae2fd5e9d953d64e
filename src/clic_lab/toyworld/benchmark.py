"""The quality benchmark on the procedural world: held-out patterns learned from one image, transferred to the
analogous part of another object, scored by the pattern detector.

    python -m clic_lab.toyworld.benchmark make --out DIR [--cases 30] [--seed 0] [--model PATH] [--steps 300]
                                           [--patterns heldout|seen] [--inpaint-model PATH]
    python -m clic_lab.toyworld.benchmark run DIR [--out DIR/results] [--no-extras | --extras-only]
                                              [--extras generation,matching,text,discover,pipeline]

``make`` renders the cases (source: an object with a pattern on a part; target: a plain object of the same class,
its same part as the target mask). ``--patterns heldout`` (default) uses the six held-out patterns of the world: a
trained motif on the lattice it never has in training ("stars on a grid" where training only has staggered stars),
which no caption names and the toy model never drew: the concept must carry the combination. ``--patterns seen``
uses patterns the toy model draws from their names (stripes, waves, stars; :data:`SEEN_PATTERNS`): the concept then
has to carry which pattern, in which colours, on which part. ``make`` writes ``manifest.yaml`` (CLiC, Custom Diffusion, Break-A-Scene, CLiC with
the official code's l_RoI, the three loss ablations and an eta sweep; RealFill too when ``--inpaint-model`` names the toy
inpainting model of :mod:`clic_lab.toyworld.inpaint`) plus ``truth.json`` (each case's pattern and the target's object
mask). ``run`` registers the ``pattern`` metric and runs ``clic benchmark`` (transfer):

- ``presence``: the detector finds the source pattern inside the target region of the result (1/0);
- ``leakage``: it finds the source pattern on the rest of the target object (1/0);
- ``colour``: the share of the source region's two main named colours (part and pattern colour) among the two main
  colours of the target region of the result (0, 0.5, 1);
- ``psnr`` (out of the target mask; transfers run without the pixel composite, which would make it infinite) and
  the attention localisation come from :mod:`clic_lab.compare`.

then the measurements ``clic benchmark`` does not make (:func:`extras`, from the cached concepts; written to
``results/extras.json`` and ``results/extras.md``):

- generation (sec. 4.1): each concept-learning method's concept generates new objects of the case's class
  ("a photo of a chair, with <v*> style", default t_s); ``on_part``: the detector finds the pattern on the
  analogous part (the part's expected region, :func:`clic_lab.toyworld.train.part_region`); ``off_part``: on the rest
  of the object;
- RoI matching (sec. 3.3): w* learned from CLiC's concept on the source mask finds the target mask
  (:func:`clic.roi.auto_target_mask`); ``iou`` against the true part mask;
- text controls: the same transfer (blending, guidance, seeds) with the base model and, in v*'s place, a word:
  ``text-name`` the pattern's caption word ("a chair with a striped back": what naming the pattern achieves; for
  held-out patterns a word the model never saw) and ``text-other`` another pattern's word (how often the source
  pattern appears when something else was asked for: the chance level of ``presence``).
- discovery (sec. 3.3, fig. 5): the source masks found automatically from several images that share the case's
  pattern (the source and renders of other objects of its class with the same pattern, pattern colour and part;
  ``make`` writes them as ``*_discover{k}.png``), w* and K/V learned with the plain diffusion loss for the
  learning budget; ``iou`` of the thresholded w* maps against the true part masks, on its own images and on one
  more render it never saw, against two controls: an untrained token's maps (what the learning adds) and the whole
  object (a method that finds the object but not the part). Overlays in ``results/discover/``.
- pipeline (sec. 3.3's whole automatic route): the concept learned in context on those discovery images with the
  discovered masks, transferred as the CLiC row is; ``presence``/``leakage``/``colour``, against the same learning
  with the true part masks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .world import HELD_OUT_PATTERNS, NATIVE_SIZE, PATTERN_ADJECTIVES, pattern_parts, render_scene

# (class, part) pairs whose parts hold at least two rows of a motif (the layout is visible)
PAIRS = (("chair", "back"), ("house", "walls"), ("vase", "body"), ("lamp", "shade"), ("table", "top"),
         ("mug", "body"))


#: trained patterns the toy model draws from their caption word, one of each kind (lines, a staggered motif, a grid
#: motif); the text controls put their word in v*'s place
SEEN_PATTERNS = ("stripes", "stars", "dots")
PATTERN_SETS = {"heldout": HELD_OUT_PATTERNS, "seen": SEEN_PATTERNS}


def context_prompt(object_class: str, part: str) -> str:
    """P_s in the grammar of the toy model's captions ("a red chair with a striped back"), v* in the pattern's
    place: "a chair with a <v*> back", "a house with <v*> walls" (CLiC and Custom Diffusion learn and transfer with
    it; Break-A-Scene and RealFill keep their "a photo of <v*>")."""
    article = "an" if object_class[0] in "aeiou" else "a"
    return f"{article} {object_class} with {'' if part.endswith('s') else 'a '}<v*> {part}"


def make_cases(out_dir, n_cases: int = 72, seed: int = 0, model: str | None = None, steps: int = 300,
               sample_steps: int = 50, size: int = NATIVE_SIZE, inpaint_model: str | None = None,
               patterns: str = "heldout") -> Path:
    if patterns not in PATTERN_SETS:
        raise ValueError(f"unknown pattern set {patterns!r} ({' | '.join(PATTERN_SETS)})")
    pattern_set = PATTERN_SETS[patterns]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases, truth = [], {}
    for i in range(n_cases):
        cls, part = PAIRS[i % len(PAIRS)]
        pattern = pattern_set[(i // len(PAIRS)) % len(pattern_set)]
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
        truth[cid] = {"pattern": pattern, "part": part, "target_object": files["target_object"],
                      "patterns": patterns, "discover": _discover_set(out, cid, src, seed, i, size)}
    manifest = {
        "name": f"toyworld-{n_cases}" + ("" if patterns == "heldout" else f"-{patterns}"), "model": model or "toy",
        "learn": {"steps": steps, "lr": 1e-3},
        # composite off: out-of-mask PSNR then measures what the latent blending preserves (with the pixel composite
        # it is infinite by construction)
        "transfer": {"steps": sample_steps, "seeds": [0], "composite": False},
        "metrics": ["psnr", "localisation", "pattern"],
        # Break-A-Scene: its token-only phase scaled to the same step budget (400 of 800 in its recipe)
        "methods": ["clic", "custom-diffusion",
                    {"name": "break-a-scene", "method": "break-a-scene", "learn": {"token_warmup_steps": steps // 2}},
                    # l_RoI as the official code computes it (masked pixels, mask-weighted error; paper: masked latent)
                    {"name": "clic-official-roi", "method": "clic",
                     "learn": {"roi_input": "pixels", "roi_weighting": "mask"}}],
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


#: renders per case for the discovery measurement, besides the case's source: objects that share its pattern (the
#: last one is kept out of the discovery and only searched with the found w*, as in the paper's fig. 5)
DISCOVER_RENDERS = 3

#: the token of the discovery's untrained control (the initialiser's embedding, no learning)
UNTRAINED_TOKEN = "<w0*>"


def _discover_set(out: Path, cid: str, src, seed: int, index: int, size: int) -> dict:
    """Objects of the source's class with its pattern, pattern colour and part (own shapes, poses and object
    colours, the part's far enough from the pattern's to show it, as the world keeps them when it draws the pattern
    colour), from seeds that do not disturb the cases' own draws. Returns the files (relative to ``out``)."""
    from .world import COLOURS

    rng = np.random.default_rng([seed, index, 1])
    images, masks = [], []
    for k in range(DISCOVER_RENDERS):
        while True:   # the world picks a contrasting pattern colour only when it draws it: keep the part's own far
            scene = render_scene(int(rng.integers(1 << 30)), size=size, object_class=src.object_class,
                                 pattern=src.pattern, part=src.part, pattern_colour=src.pattern_colour, split="any")
            part_colour = np.asarray(scene.params["part_colours"][src.part], dtype=np.float64)
            if np.linalg.norm(part_colour - np.asarray(COLOURS[src.pattern_colour], dtype=np.float64)) > 110:
                break
        for name, arr, into in ((f"discover{k}", scene.image, images),
                                (f"discover{k}_mask", scene.part_masks[src.part].astype(np.uint8) * 255, masks)):
            path = out / "images" / f"{cid}_{name}.png"
            Image.fromarray(arr).save(path)
            into.append(str(path.relative_to(out)))
    return {"images": images, "masks": masks, "pattern_colour": src.pattern_colour}


def pattern_scores(det, image: np.ndarray, region: np.ndarray, obj: np.ndarray, pattern: str,
                   colours: list[str] | None = None) -> dict:
    """``presence``: the detector finds ``pattern`` in ``region``; ``leakage``: on the rest of the object ``obj``
    (None when fewer than 16 pixels are left); with the source region's two named ``colours`` (part and pattern
    colour, :func:`source_colours`), ``colour``: the share of them among the two main colours of ``region``
    (0, 0.5 or 1)."""
    from .evaluate import top_colours

    rest = obj & ~region
    out = {"presence": float(det.predict(image, region)[0] == pattern),
           "leakage": float(det.predict(image, rest)[0] == pattern) if rest.sum() >= 16 else None}
    if colours is not None:
        out["colour"] = len(set(colours) & set(top_colours(image, region, 2))) / max(len(colours), 1)
    return out


def source_colours(source, source_mask) -> list[str]:
    """The two main named colours of the source region (the part's colour and its pattern's); ``source``
    ``(3, R, R)`` in [-1, 1], ``source_mask`` ``(1, R, R)``, as the benchmark loads them."""
    from clic.imaging import to_pil
    from .evaluate import top_colours

    return top_colours(np.asarray(to_pil(source)), source_mask[0].cpu().numpy() > 0.5, 2)


def register_pattern_metric(truth_path) -> None:
    from clic_lab.compare import register_metric
    from clic.imaging import to_pil
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
        return pattern_scores(det, image, region, _object_mask(root, info, size), info["pattern"],
                              source_colours(sample.source, sample.source_mask))

    register_metric("pattern", ("presence", "leakage", "colour"), score, lower_is_better=("leakage",))


def _object_mask(root: Path, info: dict, size: int) -> np.ndarray:
    return np.asarray(Image.open(root / info["target_object"]).convert("L").resize((size, size))) > 127


def text_words(pattern: str, patterns: str = "heldout") -> dict[str, str]:
    """The words of the text controls of a case (one word each: it takes v*'s place as a token embedding):
    ``text-name`` the nearest name text has for the pattern (a trained pattern's own caption word; for a held-out
    pattern its motif's word, which the model draws on the motif's training layout: no caption word names the
    layout), ``text-other`` the same for the next pattern of the set (the chance level of presence)."""
    group = PATTERN_SETS[patterns]
    other = group[(group.index(pattern) + 1) % len(group)]

    def word(p: str) -> str:
        motif, _ = pattern_parts(p)
        return PATTERN_ADJECTIVES[motif if p in HELD_OUT_PATTERNS else p]

    return {"text-name": word(pattern), "text-other": word(other)}


#: the measurements of :func:`extras`
EXTRAS = ("generation", "matching", "text", "discover", "pipeline")

#: the concept-learning variants whose concepts generate (RealFill's is for its inpainting model only; the eta
#: variants share CLiC's concept)
GENERATION_VARIANTS = ("clic", "custom-diffusion", "break-a-scene", "clic-no-con", "clic-no-att", "clic-no-roi")


def extras(root, results_dir=None, n_images: int = 2, match_steps: int | None = None, match_lr: float | None = None,
           device=None, progress: bool = False, parts=EXTRAS) -> dict:
    """Generation, RoI-matching and text-control scores (see the module docstring) from the concepts
    ``clic benchmark`` cached in ``results_dir``.

    ``parts`` picks which of :data:`EXTRAS` to (re)compute; the rows of the others are kept from an existing
    ``extras.json``. ``match_steps`` / ``match_lr`` default to the manifest's learning steps and lr (the same budget
    as learning). Writes ``extras.json`` (per case and summary) and ``extras.md`` (the tables); returns the summary.
    """
    import yaml

    from clic_lab.compare import Cache, load_manifest
    from clic.concept import Concept
    from clic.models import load_backbone
    from clic.roi import DiscoverConfig, MatchConfig
    from .detector import PatternDetector
    from .evaluate import part_priors

    unknown = set(parts) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)} (of {', '.join(EXTRAS)})")
    root = Path(root)
    results = Path(results_dir) if results_dir else root / "results"
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    truth = json.loads((root / "truth.json").read_text())
    plan = json.loads((results / "plan.json").read_text())
    keys = {(r["case"], r["method"]): r["learn_key"] for r in plan}
    cache = Cache(results)
    model = manifest["model"] if Path(manifest["model"]).is_absolute() else str(root / manifest["model"])
    backbone = load_backbone(model if Path(model).exists() else manifest["model"], device=device)
    det = PatternDetector.load()
    priors = part_priors() if "generation" in parts else None                  # ~900 renders: once
    learn = manifest.get("learn", {})
    mcfg = MatchConfig(steps=match_steps or learn.get("steps", 300), lr=match_lr or learn.get("lr", 1e-3))
    dcfg = DiscoverConfig(steps=mcfg.steps, lr=mcfg.lr, learn_concept=False)
    # the pipeline learns and transfers as the benchmark's CLiC row does (its learning and transfer configs)
    if "pipeline" in parts:
        register_pattern_metric(root / "truth.json")        # the manifest names it
    clic_runs = ({r.case.id: r for r in load_manifest(root / "manifest.yaml").runs if r.variant.name == "clic"}
                 if "pipeline" in parts else {})

    def concept_of(cid, method):
        key = keys.get((cid, method))
        return Concept.load(cache.concept(key)) if key is not None and cache.concept_done(key) else None

    previous = results / "extras.json"
    rows = json.loads(previous.read_text()).get("rows", {}) if previous.exists() else {}
    rows.setdefault("matching", rows.pop("roi_matching", []))         # its name in extras.json files written before the text controls
    for r in rows["matching"]:
        r.setdefault("method", "clic")
    rows = {name: ([] if name in parts else rows.get(name, [])) for name in EXTRAS}
    for cid, case in ((c["id"], c) for c in manifest["cases"]):
        ctx = _ExtrasCase(root, case, truth[cid], backbone, det, priors)
        if "generation" in parts:
            for variant in GENERATION_VARIANTS:
                if (concept := concept_of(cid, variant)) is not None:
                    rows["generation"] += ctx.generation(variant, concept, n_images, progress)
        if "matching" in parts and (concept := concept_of(cid, "clic")) is not None:
            rows["matching"].append(ctx.matching(concept, mcfg, progress))
        if "text" in parts:
            rows["text"] += ctx.text_controls(manifest.get("transfer", {}), progress)
        if "discover" in parts:
            rows["discover"] += ctx.discovery(dcfg, results / "discover", progress)
        if "pipeline" in parts:
            rows["pipeline"] += ctx.pipeline(dcfg, clic_runs[cid], progress)
        done = {name: sum(r["case"] == cid for r in rows[name]) for name in parts}
        print(f"{cid}: " + ", ".join(f"{name} {n} rows" for name, n in done.items()), flush=True)

    report = {"generation": _summary(rows["generation"], ("on_part", "off_part")),
              "roi_matching": _summary(rows["matching"], ("iou", "area")),
              "text_controls": _summary(rows["text"], ("presence", "leakage", "colour")),
              "discover": _summary(rows["discover"], ("iou", "area")),
              "pipeline": _summary(rows["pipeline"], ("presence", "leakage", "colour")),
              "match_config": {"steps": mcfg.steps, "lr": mcfg.lr}, "images_per_concept": n_images,
              "rows": rows}
    (results / "extras.json").write_text(json.dumps(report, indent=1, default=str))
    md = _extras_markdown(report)
    (results / "extras.md").write_text(md)
    print(md)
    return {k: report[k] for k in ("generation", "roi_matching", "text_controls", "discover", "pipeline")}


class _ExtrasCase:
    """One case's inputs for the :func:`extras` measurements."""

    def __init__(self, root: Path, case: dict, info: dict, backbone, det, priors=None):
        self.root, self.case, self.info, self.backbone, self.det = root, case, info, backbone, det
        self.priors = priors
        self.cid, self.cls = case["id"], case["object_class"]
        self.discovered = None          # the masks :meth:`discovery` found, for :meth:`pipeline`

    def generation(self, variant: str, concept, n_images: int, progress: bool) -> list[dict]:
        from clic.generate import GenerateConfig, generate
        from clic.imaging import to_pil
        from .evaluate import foreground_mask, part_region

        priors = self.priors
        res = generate(self.backbone, concept, GenerateConfig(seeds=tuple(range(n_images)), object_class=self.cls),
                       progress=progress)
        out = []
        for k, seed in enumerate(res.seeds):
            img = np.asarray(to_pil(res.images[k]))
            fg = foreground_mask(img)
            region = part_region(img, priors[self.cls][self.info["part"]], fg)
            scores = pattern_scores(self.det, img, region, fg, self.info["pattern"])
            out.append({"case": self.cid, "method": variant, "seed": seed, "on_part": scores["presence"],
                        "off_part": scores["leakage"]})
        return out

    def matching(self, concept, mcfg, progress: bool) -> dict:
        from clic.imaging import load_image, load_mask
        from clic_lab.compare.metrics import iou
        from clic.roi import auto_target_mask, learn_matcher

        size, root = self.backbone.resolution, self.root
        source, target = load_image(root / self.case["source"], size), load_image(root / self.case["target"], size)
        matcher = learn_matcher(self.backbone, concept, source, load_mask(root / self.case["source_mask"], size),
                                mcfg, progress=progress)
        found = auto_target_mask(self.backbone, matcher, target)
        return {"case": self.cid, "method": "clic", "iou": iou(found, load_mask(root / self.case["target_mask"], size)),
                "area": float(found.mean())}

    def text_controls(self, transfer_options: dict, progress: bool) -> list[dict]:
        """Transfer with the base model and a word in v*'s place (a concept with that word's embedding and no
        cross-attention weights), the benchmark's transfer settings otherwise."""
        from dataclasses import fields

        from clic.concept import Concept
        from clic.imaging import load_image, load_mask, to_pil
        from clic.tokens import initializer_embedding
        from clic.transfer import TransferConfig, transfer

        size, root = self.backbone.resolution, self.root
        target, mask = load_image(root / self.case["target"], size), load_mask(root / self.case["target_mask"], size)
        names = {f.name for f in fields(TransferConfig)}
        options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in transfer_options.items() if k in names}
        cfg = TransferConfig(**{**options, "prompt": self.case["prompt"]})
        region, obj = mask[0].numpy() > 0.5, _object_mask(root, self.info, size)
        colours = source_colours(load_image(root / self.case["source"], size),
                                 load_mask(root / self.case["source_mask"], size))
        out = []
        for control, word in text_words(self.info["pattern"], self.info.get("patterns", "heldout")).items():
            concept = Concept.from_training(self.backbone, ["<v*>"], initializer_embedding(self.backbone, word)[None],
                                            {}, method=control, prompt=self.case["prompt"], word=word)
            res = transfer(self.backbone, concept, target, mask, cfg, progress=progress)
            for k, seed in enumerate(res.seeds):
                image = np.asarray(to_pil(res.images[k]))
                out.append({"case": self.cid, "method": control, "word": word, "seed": seed,
                            **pattern_scores(self.det, image, region, obj, self.info["pattern"], colours)})
        return out


    def discovery(self, cfg, out_dir: Path, progress: bool) -> list[dict]:
        """Source masks found from several images that share the case's pattern (sec. 3.3, fig. 5): w* and K/V
        learned with the plain diffusion loss on the source and the case's discovery renders but the last, its
        maps thresholded on each; then the found w* searched on the last render, which the discovery never saw.
        Rows: ``discover`` (mean IoU over the discovery images against their true part masks), ``discover-new``
        (the unseen render), and two controls: ``untrained`` (the same map-to-mask step on a token that learned
        nothing: its initialiser's embedding under the base model's K/V), ``object`` (the whole object as the mask:
        what IoU a method gets for finding the object but not the part). Writes an overlay strip per case to
        ``out_dir``."""
        from dataclasses import replace

        import torch

        from clic.imaging import grid, load_image, load_mask, mask_overlay, save_png, to_pil
        from clic.concept import Concept
        from clic_lab.compare.metrics import iou
        from clic.roi import ROLE, Matcher, auto_target_mask, discover, discover_prompt
        from clic.tokens import initializer_embedding
        from .evaluate import foreground_mask

        sets = self.info.get("discover")
        if not sets:
            raise ValueError(f"case {self.cid} has no discovery renders: truth.json was made before they existed; "
                             "rerun `make` with the same arguments (the cases come out the same)")
        size, root = self.backbone.resolution, self.root
        images = [load_image(root / self.case["source"], size)] + [load_image(root / p, size) for p in sets["images"]]
        truths = [load_mask(root / self.case["source_mask"], size)] + [load_mask(root / p, size) for p in sets["masks"]]
        res = discover(self.backbone, images[:-1], replace(cfg, object_class=self.cls), progress=progress)
        self.discovered = res.masks                       # the pipeline learns with them (no second discovery)
        found = res.masks + [auto_target_mask(self.backbone, res.matcher, images[-1])]
        scores = [iou(f, t) for f, t in zip(found, truths)]
        # the same maps of a token that learned nothing (its initialiser's embedding, the base model's K/V): what the
        # learning adds to where the token attends
        untrained = Matcher(Concept.from_training(
            self.backbone, [UNTRAINED_TOKEN], initializer_embedding(self.backbone, cfg.initializer)[None], {},
            role=ROLE, method="untrained", prompt=discover_prompt(self.cls, UNTRAINED_TOKEN)))
        blank = [auto_target_mask(self.backbone, untrained, image) for image in images[:-1]]
        objects = [torch.from_numpy(foreground_mask(np.asarray(to_pil(image))).astype(np.float32))[None]
                   for image in images]
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png(grid([mask_overlay(image, mask) for image, mask in zip(images, found)], rows=1,
                      labels=[f"IoU {v:.2f}" + (" (new)" if k == len(images) - 1 else "") for k, v in
                              enumerate(scores)]), out_dir / f"{self.cid}.png")
        return [{"case": self.cid, "method": "discover", "iou": float(np.mean(scores[:-1])),
                 "area": float(np.mean([float(m.mean()) for m in found[:-1]]))},
                {"case": self.cid, "method": "discover-new", "iou": scores[-1], "area": float(found[-1].mean())},
                {"case": self.cid, "method": "untrained", "iou": float(np.mean([iou(f, t) for f, t in
                                                                               zip(blank, truths)])),
                 "area": float(np.mean([float(m.mean()) for m in blank]))},
                {"case": self.cid, "method": "object", "iou": float(np.mean([iou(o, t) for o, t in
                                                                            zip(objects, truths)])),
                 "area": float(np.mean([float(o.mean()) for o in objects]))}]

    def pipeline(self, cfg, run, progress: bool) -> list[dict]:
        """The paper's whole automatic route (sec. 3.3): the source masks discovered from the source and the case's
        discovery renders but the last (:meth:`discovery`'s, when it ran for this case), the concept learned in
        context on those images with them (as ``discover(learn_concept=True)`` does), transferred to the case's target as the benchmark's CLiC row is
        (``run``: its learning and transfer configs). Control: the same learning on the same images with their
        true part masks. Rows ``discovered-masks`` / ``true-masks``: presence, leakage, colour."""
        from dataclasses import replace

        from clic.baselines import learn_concept, transfer_concept
        from clic.imaging import load_image, load_mask, to_pil
        from clic.attention import restored_processors
        from clic.roi import discover

        size, root = self.backbone.resolution, self.root
        sets = self.info["discover"]
        images = [load_image(root / self.case["source"], size)] + [load_image(root / p, size)
                                                                   for p in sets["images"][:-1]]
        truths = [load_mask(root / self.case["source_mask"], size)] + [load_mask(root / p, size)
                                                                       for p in sets["masks"][:-1]]
        target, mask = load_image(root / self.case["target"], size), load_mask(root / self.case["target_mask"], size)
        region, obj = mask[0].numpy() > 0.5, _object_mask(root, self.info, size)
        colours = source_colours(images[0], truths[0])
        out = []
        masks = self.discovered
        if masks is None:                                  # `--extras pipeline` alone
            masks = discover(self.backbone, images, replace(cfg, object_class=self.cls, learn_concept=False),
                             progress=progress).masks
        with restored_processors(self.backbone.unet):
            concepts = [(name, learn_concept(self.backbone, images, m, _fresh_token(self.backbone, run.learn_cfg),
                                             progress=progress).concept)
                        for name, m in (("discovered-masks", masks), ("true-masks", truths))]
            for name, concept in concepts:
                res = transfer_concept(self.backbone, concept, target, mask, run.transfer_cfg, progress=progress)
                for k, seed in enumerate(res.seeds):
                    out.append({"case": self.cid, "method": name, "seed": seed,
                                **pattern_scores(self.det, np.asarray(to_pil(res.images[k])), region, obj,
                                                 self.info["pattern"], colours)})
        return out



def _fresh_token(backbone, cfg):
    """``cfg`` with a placeholder this backbone's tokenizer does not have yet (one process learns many concepts)."""
    from dataclasses import replace

    from clic.tokens import free_placeholder

    token = free_placeholder(backbone, cfg.placeholder)
    return replace(cfg, placeholder=token, prompt=cfg.prompt.replace(cfg.placeholder, token) if cfg.prompt else None)


#: the discovery table's row names
DISCOVER_ROWS = {"discover": "discover: w* maps on its own images", "discover-new": "discover: w* on a new image",
                 "untrained": "control: an untrained token's maps on the same images",
                 "object": "control: the whole object"}


def _per_case(rows: list[dict], column: str) -> dict[str, dict[str, float]]:
    """method -> case -> the mean of ``column`` over the case's rows (seeds, generated images)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        v = r.get(column)
        if v in (None, ""):
            continue
        acc.setdefault(r["method"], {}).setdefault(r["case"], []).append(float(v))
    return {m: {c: sum(v) / len(v) for c, v in cases.items()} for m, cases in acc.items()}


#: (table, column, higher is better) compared between the reference method and every other one
PAIRED_COLUMNS = (("transfer", "presence", True), ("transfer", "colour", True), ("transfer", "leakage", False),
                  ("generation", "on_part", True), ("generation", "off_part", False))


def paired_report(results_dir, reference: str = "clic", n_boot: int = 10000) -> dict:
    """The reference method against every other method on the same cases, per column of
    :data:`PAIRED_COLUMNS`: mean difference with its paired-bootstrap 95% interval, wins/losses/ties and the
    sign test (:func:`clic_lab.stats.paired_comparison`). Reads ``results.csv`` (transfers) and ``extras.json``
    (generation); writes ``paired.json`` and ``paired.md``; returns the report."""
    import csv

    from clic_lab.stats import paired_comparison

    results = Path(results_dir)
    tables: dict[str, list[dict]] = {"transfer": [], "generation": []}
    if (results / "results.csv").is_file():
        with open(results / "results.csv", newline="") as f:
            tables["transfer"] = list(csv.DictReader(f))
    if (results / "extras.json").is_file():
        tables["generation"] = json.loads((results / "extras.json").read_text()).get("rows", {}).get("generation", [])
    report: dict = {"reference": reference, "comparisons": []}
    for table, column, higher in PAIRED_COLUMNS:
        by_method = _per_case(tables[table], column)
        ref = by_method.get(reference)
        if not ref:
            continue
        for other, scores in by_method.items():
            if other == reference:
                continue
            cases = sorted(set(ref) & set(scores))
            cmp = paired_comparison([ref[c] for c in cases], [scores[c] for c in cases], n_boot=n_boot)
            if not higher and cmp["ahead"] is not None:      # lower is better: ahead means a lower score
                cmp["ahead"] = not cmp["ahead"]
            report["comparisons"].append({"table": table, "column": column, "other": other,
                                          "higher_is_better": higher, **cmp})
    (results / "paired.json").write_text(json.dumps(report, indent=1))
    lines = [f"| {reference} vs | measure | cases | {reference} | other | difference [95% paired bootstrap] | "
             "wins / losses / ties | sign test p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        if not c["n"]:
            continue
        verdict = {True: f"**{reference} ahead**", False: f"{c['other']} ahead", None: "not separated"}[c["ahead"]]
        arrow = "↑" if c["higher_is_better"] else "↓"
        lines.append(f"| {c['other']} | {c['table']} {c['column']} {arrow} | {c['n']} | {c['mean_a']:.3f} | "
                     f"{c['mean_b']:.3f} | {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                     f"{c['wins']} / {c['losses']} / {c['ties']} | {c['sign_p']:.3g} | {verdict} |")
    (results / "paired.md").write_text("\n".join(lines) + "\n")
    return report


def _summary(rows: list[dict], columns: tuple[str, ...]) -> dict:
    from clic_lab.stats import mean_ci

    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        out[name] = {"n": len(mine), **{c: mean_ci([r[c] for r in mine if r[c] is not None]) for c in columns}}
    return out


def _extras_markdown(report: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = ["| method | images | on part ↑ | off part ↓ |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['n']} | {cell(s['on_part'])} | {cell(s['off_part'])} |"
              for m, s in report["generation"].items()]
    lines += ["", "| RoI matching | cases | IoU ↑ | mask area |", "|---|---|---|---|"]
    lines += [f"| w* from {m} | {s['n']} | {cell(s['iou'])} | {cell(s['area'])} |"
              for m, s in report["roi_matching"].items()]
    lines += ["", "| text control (base model, a word for v*) | transfers | presence | leakage ↓ | colour |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {s['n']} | {cell(s['presence'])} | {cell(s['leakage'])} | {cell(s.get('colour'))} |"
              for m, s in report["text_controls"].items()]
    if report.get("discover"):
        lines += ["", "| source masks found from images sharing the pattern | cases | IoU ↑ | mask area |",
                  "|---|---|---|---|"]
        lines += [f"| {DISCOVER_ROWS.get(m, m)} | {s['n']} | {cell(s['iou'])} | {cell(s['area'])} |"
                  for m, s in report["discover"].items()]
    if report.get("pipeline"):
        lines += ["", "| CLiC learned on the source + 2 images sharing its pattern, with | transfers | presence ↑ | "
                  "leakage ↓ | colour ↑ |", "|---|---|---|---|---|"]
        lines += [f"| {m.replace('-', ' ')} | {s['n']} | {cell(s['presence'])} | {cell(s['leakage'])} | "
                  f"{cell(s['colour'])} |" for m, s in report["pipeline"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clic_lab.toyworld.benchmark")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=72, help="cases (default 72: each held-out pattern on each of the six "
                                                             "(class, part) pairs, twice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="default: the bundled toy model")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--inpaint-model", default=None,
                   help="the toy inpainting model (python -m clic_lab.toyworld.inpaint): adds RealFill")
    p.add_argument("--patterns", default="heldout", choices=tuple(PATTERN_SETS),
                   help="heldout: patterns the toy model never saw; seen: patterns it draws from their names")
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-extras", action="store_true",
                   help="skip the extras (generation, RoI matching, text controls, discovery)")
    p.add_argument("--extras-only", action="store_true", help="only the extras")
    p.add_argument("--images", type=int, default=2, help="extras: generated images per concept")
    p.add_argument("--extras", default=",".join(EXTRAS),
                   help=f"comma-separated extras to (re)compute, the others' rows are kept (default: {','.join(EXTRAS)})")
    args = parser.parse_args(argv)
    if args.cmd == "make":
        model = args.model
        if model is None:
            from clic.models import bundled_model

            model = str(bundled_model())
        print(make_cases(args.out, args.cases, args.seed, model, args.steps, args.sample_steps,
                         inpaint_model=args.inpaint_model, patterns=args.patterns))
        return 0
    from clic_lab.compare import run_benchmark

    root = Path(args.dir)
    out = args.out or root / "results"
    report = None
    if not args.extras_only:
        register_pattern_metric(root / "truth.json")
        report = run_benchmark(root / "manifest.yaml", out, args.device)
        if report is not None:
            print(report.table)
    if not args.no_extras and (args.extras_only or report is not None):   # the main process only
        extras(root, out, n_images=args.images, device=args.device, parts=tuple(args.extras.split(",")))
    if args.extras_only or report is not None:
        paired_report(out)
        print((Path(out) / "paired.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
