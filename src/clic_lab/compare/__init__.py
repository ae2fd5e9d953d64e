"""The comparison runner (``clic benchmark MANIFEST --out DIR``): the paper's comparison (sec. 4.2) and ablations
(sec. 4.3) as one cached, shardable run; the quality metrics are in :mod:`clic_lab.compare.metrics`.

The manifest (YAML or JSON; paths relative to its folder)::

    model: CompVis/stable-diffusion-v1-4            # base model of clic / custom-diffusion / break-a-scene
    inpaint_model: stable-diffusion-v1-5/stable-diffusion-inpainting   # RealFill's (only if it is run)
    dtype: fp32
    learn: {steps: 500}                              # options for every method whose learning config has them
    transfer: {seeds: [0, 1], t_start: 15}           # same for transfer (t_start: not RealFill's inpainting)
    encoder: openai/clip-vit-base-patch32            # image encoder of the fidelity metric (optional)
    metrics: [psnr, ssim, lpips, fidelity, localisation]
    cases:
      - {id: chair, source: chair.png, source_mask: chair_mask.png, target: stool.png, target_mask: stool_mask.png,
         object_class: chair, prompt: "a chair with <v*> style"}         # prompt: optional P_s
    methods:                                         # default: the paper's four
      - clic
      - custom-diffusion
      - {name: clic-lr2x, method: clic, learn: {lr: 2.0e-5}, transfer: {eta: 2.0}}
    ablations:
      losses: true                                   # clic-no-con, clic-no-att, clic-no-roi (fig. 8)
      eta: [0, 0.5, 2]                               # clic-eta=0, ... (fig. 9; they share clic's concept)

The whole manifest is checked first (files, masks, methods, every config, duplicate ids): any problem is one error
and nothing runs. Then each (case, method) is a run: learn (key = hash of the source files, the resolved method
config, the model's files and the clic version) and transfer (key = learn key + transfer config + target files).
Both are cached under ``DIR/cache``, so a rerun only computes what changed. Outputs (the main process, after all
processes are done): ``results.csv`` (quality per case, method and seed; deterministic), ``costs.csv`` (wall time
and peak memory per phase), ``results.md`` (mean and 95% t-interval per method), ``grid.png`` (rows: cases;
columns: source, target, each method; also ``grids/<case>.png``).

Sharding: every process takes the cases ``i`` with ``i % num_processes == process_index`` (accelerate's
:class:`~accelerate.PartialState`), then waits for the others; the main process merges from the cache::

    accelerate launch --multi_gpu --num_processes 4 -m clic benchmark M.yaml --out DIR        # one GPU each
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m clic benchmark M.yaml --out DIR       # CPU processes
    clic benchmark M.yaml --out DIR --merge-only                                              # merge again

Metrics are pluggable: :func:`register_metric` adds a named group of columns computed from a :class:`Sample` (e.g. a
pattern detector's presence score from :mod:`clic_lab.toyworld`); name it in the manifest's ``metrics``. Note that the
manifest is checked against the metrics registered when it is loaded.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from huggingface_hub import snapshot_download
from PIL import Image
from safetensors.torch import load_file, save_file

from clic import __version__, baselines
from clic.concept import Concept
from clic.config import learn_config, recipe_named, transfer_config
from clic.errors import ClicError, InputError
from clic.fileio import atomic_path, read_document
from clic.imaging import grid, image_size, load_image, load_mask, mask_overlay, save_png, to_pil
from clic.models import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, DTYPES, load_backbone

from ..stats import mean_ci
from .metrics import ImageEncoder, attention_localisation, concept_fidelity, lpips_distance, measure, psnr, ssim

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("clic", "custom-diffusion", "break-a-scene", "realfill")
#: the comparison's methods and the recipe (clic.config.RECIPES) each runs with
METHODS = {"clic": "paper", "custom-diffusion": "custom-diffusion", "break-a-scene": "break-a-scene",
           "realfill": "realfill"}
CASE_KEYS = ("id", "source", "source_mask", "target", "target_mask", "object_class", "prompt")
REQUIRED_CASE_KEYS = ("id", "source", "source_mask", "target", "target_mask", "object_class")
MANIFEST_KEYS = ("model", "inpaint_model", "dtype", "device", "learn", "transfer", "encoder", "metrics", "cases",
                 "methods", "ablations", "name")
ABLATION_LOSSES = {"clic-no-con": {"use_con": False}, "clic-no-att": {"use_att": False},
                   "clic-no-roi": {"use_roi": False}}


class BenchmarkError(InputError):
    """A bad manifest (nothing was run), or runs that failed (reported after the others finished)."""


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class Case:
    id: str
    source: Path
    source_mask: Path
    target: Path
    target_mask: Path
    object_class: str
    prompt: str | None = None


@dataclass
class Variant:
    """A column of the comparison: a method with its own overrides (``clic-no-att``: clic with use_att off)."""

    name: str
    method: str
    learn: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)


@dataclass
class Run:
    case: Case
    variant: Variant
    model: str
    learn_cfg: object
    transfer_cfg: object
    learn_key: str = ""
    transfer_key: str = ""


@dataclass
class Manifest:
    path: Path
    name: str
    model: str
    inpaint_model: str
    dtype: str
    device: str | None
    encoder: str | None
    metrics: list[str]
    cases: list[Case]
    variants: list[Variant]
    runs: list[Run]


def _read(path: Path) -> dict:
    # size-limited UTF-8, YAML without aliases (a 1 KB alias bomb expands to gigabytes)
    data = read_document(path, "manifest", BenchmarkError)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: the manifest must be a mapping with 'cases' (and 'methods')")
    return data


#: the type of each manifest key
MANIFEST_TYPES = {"model": str, "inpaint_model": str, "dtype": str, "device": str, "encoder": str, "name": str,
                  "learn": dict, "transfer": dict, "metrics": list, "cases": list, "methods": list, "ablations": dict}
_KINDS = {str: "a string", dict: "a mapping", list: "a list", bool: "true or false"}


def _schema(data: dict, problems: list[str]) -> tuple[dict, set[str]]:
    """The manifest's keys of the wrong type, as problems: the returned copy leaves them out (not checked further),
    the set names them."""
    out, wrong = {}, set()
    for key, value in data.items():
        kind = MANIFEST_TYPES.get(key)
        if kind is not None and value is not None and not isinstance(value, kind):
            problems.append(f"{key}: must be {_KINDS[kind]}, got {_short(value)}")
            wrong.add(key)
            continue
        out[key] = value
    return out, wrong


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_ref(value: str, root: Path) -> str:
    """A local folder (relative to the manifest) or a hub id."""
    local = root / value
    if local.exists() or value.startswith((".", "/", "~")):
        return str(local.expanduser().resolve() if not value.startswith("~") else Path(value).expanduser())
    return value


def _variants(data: dict, problems: list[str]) -> list[Variant]:
    variants = []
    for entry in data.get("methods") or list(DEFAULT_METHODS):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.append(f"methods: {_short(entry)} is neither a method name nor a mapping with a 'name'")
            continue
        unknown = set(map(str, entry)) - {"name", "method", "learn", "transfer"}
        if unknown:
            problems.append(f"method {entry['name']!r}: unknown key(s) {sorted(unknown)}")
        method = entry.get("method", entry["name"])
        if not isinstance(method, str) or method not in METHODS:
            problems.append(f"method {entry['name']!r}: unknown method {_short(method)} (one of {', '.join(METHODS)})")
            continue
        bad = [k for k in ("learn", "transfer") if not isinstance(entry.get(k) or {}, dict)]
        if bad:
            problems.append(f"method {entry['name']!r}: {bad[0]} must be a mapping of options, got "
                            f"{_short(entry[bad[0]])}")
            continue
        variants.append(Variant(entry["name"], method, dict(entry.get("learn") or {}),
                                dict(entry.get("transfer") or {})))
    ablations = data.get("ablations") or {}
    if set(map(str, ablations)) - {"losses", "eta"} or not isinstance(ablations.get("losses", False), bool) \
            or not isinstance(ablations.get("eta") or [], list):
        problems.append("ablations: a mapping with 'losses' (true/false) and/or 'eta' (a list of step sizes), got "
                        f"{_short(ablations)}")
        ablations = {}
    base = next((v for v in variants if v.name == "clic"), Variant("clic", "clic"))
    if ablations.get("losses"):
        for name, switch in ABLATION_LOSSES.items():
            variants.append(Variant(name, "clic", {**base.learn, **switch}, dict(base.transfer)))
    for eta in ablations.get("eta") or []:
        if not isinstance(eta, (int, float)) or isinstance(eta, bool):
            problems.append(f"ablations: eta {_short(eta)} is not a number")
            continue
        variants.append(Variant(f"clic-eta={eta:g}", "clic", dict(base.learn), {**base.transfer, "eta": float(eta)}))
    seen = set()
    for v in variants:
        if v.name in seen:
            problems.append(f"methods: duplicate name {v.name!r}")
        seen.add(v.name)
    return variants


def _cases(data: dict, root: Path, problems: list[str]) -> list[Case]:
    cases, seen = [], set()
    entries = data.get("cases")
    if not isinstance(entries, list) or not entries:
        problems.append("cases: a non-empty list is required")
        return []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"case #{k + 1}: not a mapping")
            continue
        cid = str(entry.get("id", f"#{k + 1}"))
        missing = [key for key in REQUIRED_CASE_KEYS if not entry.get(key)]
        unknown = sorted(set(map(str, entry)) - set(CASE_KEYS))
        wrong = [key for key in CASE_KEYS if key != "id" and entry.get(key) is not None
                 and not isinstance(entry[key], str)]
        if wrong:
            problems.append(f"case {cid!r}: {', '.join(wrong)} must be text, got {_short(entry[wrong[0]])}")
            continue
        if missing:
            problems.append(f"case {cid!r}: missing {', '.join(missing)}")
        if unknown:
            problems.append(f"case {cid!r}: unknown key(s) {unknown}")
        if "id" in entry:
            if cid in seen:
                problems.append(f"case {cid!r}: duplicate id")
            if not cid.replace("-", "").replace("_", "").replace(".", "").isalnum():
                problems.append(f"case {cid!r}: ids may only use letters, digits, '-', '_' and '.'")
            seen.add(cid)
        if missing:
            continue
        paths = {key: root / str(entry[key]) for key in ("source", "source_mask", "target", "target_mask")}
        ok = True
        for image_key, mask_key in (("source", "source_mask"), ("target", "target_mask")):
            try:
                size = image_size(paths[image_key])
                load_mask(paths[mask_key], 64, size)
            except ClicError as exc:
                problems.append(f"case {cid!r}: {exc}")
                ok = False
        if ok:
            cases.append(Case(cid, paths["source"], paths["source_mask"], paths["target"], paths["target_mask"],
                              str(entry["object_class"]), entry.get("prompt")))
    return cases


def _option_names(method: str, phase: str) -> set[str]:
    """Fields of ``method``'s learning or transfer config."""
    r = recipe_named(METHODS[method])
    cls = r.learn_class if phase == "learn" else r.transfer_class
    return {f.name for f in fields(cls)} - {"recipe"}


def _common(common: dict, method: str, phase: str) -> dict:
    """The manifest-wide ``learn`` / ``transfer`` options that ``method``'s config has (``eta`` does not apply to
    RealFill's inpainting, ``batch_size`` of learning only to RealFill); a method's own options are strict."""
    names = _option_names(method, phase)
    return {k: v for k, v in common.items() if k in names}


def _learn_overrides(case: Case, variant: Variant, common: dict) -> dict:
    values = {**_common(common, variant.method, "learn"), **variant.learn, "object_class": case.object_class}
    # P_s of the case is the context prompt of the methods that have one (CLiC and Custom Diffusion); Break-A-Scene
    # and RealFill keep their recipes' "a photo of <v*>"
    if case.prompt and variant.method in ("clic", "custom-diffusion") and "prompt" not in variant.learn:
        values["prompt"] = case.prompt
    return values


def load_manifest(path, device: str | None = None, dtype: str | None = None) -> Manifest:
    """Read and check a manifest; every problem is gathered into one :class:`BenchmarkError` (nothing runs)."""
    path = Path(path)
    problems: list[str] = []
    data, wrong = _schema(_read(path), problems)
    root = path.parent
    unknown = sorted(set(map(str, data)) - set(MANIFEST_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown} (known: {', '.join(MANIFEST_KEYS)})")
    metrics = list(data.get("metrics") or METRIC_GROUPS)
    for m in metrics:
        if not isinstance(m, str) or m not in METRIC_GROUPS:
            problems.append(f"metrics: unknown metric {_short(m)} (one of {', '.join(METRIC_GROUPS)})")
    metrics = [m for m in metrics if isinstance(m, str) and m in METRIC_GROUPS]
    common_learn, common_transfer = dict(data.get("learn") or {}), dict(data.get("transfer") or {})
    dtype = dtype or data.get("dtype") or "fp32"
    if dtype not in DTYPES:
        problems.append(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    model = _model_ref(data.get("model") or DEFAULT_MODEL, root)
    inpaint_model = _model_ref(data.get("inpaint_model") or DEFAULT_INPAINT_MODEL, root)
    variants = _variants(data, problems) if "methods" not in wrong else []
    cases = _cases(data, root, problems) if "cases" not in wrong else []
    for phase, common in (("learn", common_learn), ("transfer", common_transfer)):
        usable = set().union(*(_option_names(v.method, phase) for v in variants))
        for key in sorted(set(map(str, common)) - usable) if variants else []:
            problems.append(f"{phase}: {key!r} is not an option of any method's {phase} config")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    for name, ref in (("model", model), ("inpaint_model", inpaint_model)):
        if not any((v.method == "realfill") == (name == "inpaint_model") for v in variants):
            continue                                        # not used by any method of this manifest
        if os.path.isabs(ref):
            if not (Path(ref) / "model_index.json").is_file() and not (Path(ref) / "unet").is_dir():
                problems.append(f"{name}: {ref} is not a diffusers model folder")
        elif offline and model_fingerprint(ref).startswith("hub:"):
            problems.append(f"{name}: {ref!r} is not in the local Hugging Face cache (offline)")
    runs = []
    for case in cases:
        for variant in variants:
            where = f"case {case.id!r}, method {variant.name!r}"
            try:
                name = METHODS[variant.method]
                lcfg = learn_config(name, **_learn_overrides(case, variant, common_learn))
                lcfg.check(1)
                tcfg = transfer_config(name, **{**_common(common_transfer, variant.method, "transfer"),
                                                **variant.transfer})
                tcfg.check()
            except (ClicError, TypeError) as exc:
                problems.append(f"{where}: {exc}")
                continue
            runs.append(Run(case, variant, inpaint_model if variant.method == "realfill" else model, lcfg, tcfg))
    if problems:
        raise BenchmarkError(f"{path}: {len(problems)} problem(s), nothing was run: " + "; ".join(problems))
    encoder = data.get("encoder")
    if encoder:
        encoder = _model_ref(str(encoder), root)
    manifest = Manifest(path, str(data.get("name", path.stem)), model, inpaint_model, dtype,
                        device or data.get("device"), encoder, metrics, cases, variants, runs)
    _assign_keys(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- cache keys


def _file_hash(path: Path, _memo: dict = {}) -> str:  # noqa: B006 (a per-process memo)
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _memo:
        _memo[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _memo[key]


def model_fingerprint(model: str, _memo: dict = {}) -> str:  # noqa: B006
    """Identity of a model's files without reading all of them: configs and tokenizer files whole, each weight file
    by its size and its first and last MiB. Hub ids use their cached snapshot (offline), else the id itself."""
    if model in _memo:
        return _memo[model]
    root = Path(model)
    if not root.is_dir():
        try:
            root = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the id is all we know
            _memo[model] = f"hub:{model}"
            return _memo[model]
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(root)).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".onnx") and size > 2**21:
                h.update(fh.read(2**20))
                fh.seek(size - 2**20)
                h.update(fh.read(2**20))
            else:
                h.update(fh.read())
    _memo[model] = h.hexdigest()[:20]
    return _memo[model]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _assign_keys(manifest: Manifest) -> None:
    for run in manifest.runs:
        case = run.case
        run.learn_key = _digest({
            "version": __version__, "method": run.variant.method, "config": asdict(run.learn_cfg),
            "source": _file_hash(case.source), "source_mask": _file_hash(case.source_mask),
            "model": model_fingerprint(run.model), "dtype": manifest.dtype})
        run.transfer_key = _digest({
            "learn": run.learn_key, "config": asdict(run.transfer_cfg), "target": _file_hash(case.target),
            "target_mask": _file_hash(case.target_mask)})


# ---------------------------------------------------------------------------------------------- running


class Cache:
    """``DIR/cache/concepts/<learn key>.safetensors`` (+ ``.json`` info, ``.log.jsonl`` losses, ``.ckpt`` while
    learning) and ``DIR/cache/transfers/<transfer key>/`` with
    ``seed<S>.png``, ``attention.safetensors`` and ``info.json`` (written last: a transfer is complete when it
    exists)."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / "cache"

    def concept(self, key: str) -> Path:
        return self.root / "concepts" / f"{key}.safetensors"

    def concept_info(self, key: str) -> Path:
        return self.root / "concepts" / f"{key}.json"

    def concept_log(self, key: str) -> Path:
        return self.root / "concepts" / f"{key}.log.jsonl"

    def transfer_dir(self, key: str) -> Path:
        return self.root / "transfers" / key

    def transfer_done(self, key: str) -> bool:
        return (self.transfer_dir(key) / "info.json").is_file()

    def concept_done(self, key: str) -> bool:
        return self.concept(key).is_file() and self.concept_info(key).is_file()


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str))


def _inputs(case: Case, size: int):
    return (load_image(case.source, size), load_mask(case.source_mask, size, image_size(case.source)),
            load_image(case.target, size), load_mask(case.target_mask, size, image_size(case.target)))


def _execute_group(runs: list[Run], manifest: Manifest, cache: Cache, backbones: dict, device, progress: bool,
                   process_index: int = 0) -> None:
    """Learn (unless cached) the concept shared by ``runs`` and run their missing transfers. ``backbones``: the
    models loaded so far, by name (learning and transfer leave a model as they found it: one load serves all)."""
    first = runs[0]
    todo = [r for r in runs if not cache.transfer_done(r.transfer_key)]
    if not todo and cache.concept_done(first.learn_key):
        return
    if first.model not in backbones:
        backbones[first.model] = load_backbone(first.model, device, manifest.dtype)
    backbone = backbones[first.model]
    source, source_mask, target, target_mask = _inputs(first.case, backbone.resolution)
    if cache.concept_done(first.learn_key):
        concept = Concept.load(cache.concept(first.learn_key))
    else:
        log.info("%s / %s: learning (%s)", first.case.id, first.variant.method, first.learn_key)
        # checkpoints next to the concept: a killed benchmark resumes its learning runs (cost: the resumed part)
        with measure(backbone.device) as cost:
            result = baselines.learn_concept(backbone, [source], [source_mask], first.learn_cfg,
                                   out_path=cache.concept(first.learn_key), log_path=cache.concept_log(first.learn_key),
                                   resume=True, progress=progress)
        concept = result.concept
        _write_json(cache.concept_info(first.learn_key), {
            "case": first.case.id, "method": first.variant.method, "cost": asdict(cost),
            "device": str(backbone.device), "process": process_index,
            "final_losses": result.history[-1] if result.history else {}})
    for run in todo:
        log.info("%s / %s: transfer (%s)", run.case.id, run.variant.name, run.transfer_key)
        with measure(backbone.device) as cost:
            res = baselines.transfer_concept(backbone, concept, target, target_mask, run.transfer_cfg,
                                             progress=progress)
        folder = cache.transfer_dir(run.transfer_key)
        for k, seed in enumerate(res.seeds):
            save_png(to_pil(res.images[k]), folder / f"seed{seed}.png")
        maps = {f"seed{seed}": res.attention[:, k, 0].float().mean(0).contiguous() for k, seed in enumerate(res.seeds)}
        with atomic_path(folder / "attention.safetensors") as tmp:
            save_file(maps, tmp, metadata={"format": "pt"})
        _write_json(folder / "info.json", {
            "case": run.case.id, "method": run.variant.name, "seeds": list(res.seeds), "prompt": res.prompt,
            "cost": asdict(cost), "device": str(backbone.device), "process": process_index,
            "learn_key": run.learn_key})


def _groups(runs: list[Run]) -> list[list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.learn_key, []).append(run)
    return list(groups.values())


def execute(manifest: Manifest, out_dir, process_index: int = 0, num_processes: int = 1, device=None,
            progress: bool = True) -> list[str]:
    """Run this process's share of the cases; returns the failures (``"case / method: error"``)."""
    cache = Cache(Path(out_dir))
    mine = {c.id for i, c in enumerate(manifest.cases) if i % num_processes == process_index}
    failures, backbones = [], {}
    for group in _groups([r for r in manifest.runs if r.case.id in mine]):
        try:
            _execute_group(group, manifest, cache, backbones, device, progress, process_index)
        except (ClicError, RuntimeError, OSError, ValueError) as exc:
            names = ", ".join(r.variant.name for r in group)
            log.error("%s / %s failed: %s", group[0].case.id, names, exc)
            failures.append(f"{group[0].case.id} / {names}: {exc}")
    return failures


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class Sample:
    """One result to score: images ``(3, R, R)`` in [-1, 1], masks ``(1, R, R)``, v*'s attention map ``(h, w)``."""

    case: Case
    variant: Variant
    seed: int
    result: torch.Tensor
    target: torch.Tensor
    target_mask: torch.Tensor
    source: torch.Tensor
    source_mask: torch.Tensor
    attention: torch.Tensor | None
    context: dict


def _m_preservation(s: Sample) -> dict:
    return {"psnr": psnr(s.result, s.target, s.target_mask), "ssim": ssim(s.result, s.target, s.target_mask)}


def _m_lpips(s: Sample) -> dict:
    value, note = lpips_distance(s.result, s.target, s.target_mask)
    if note:
        s.context["notes"].add(note)
    return {"lpips": value}


def _m_fidelity(s: Sample) -> dict:
    encoder = s.context.get("encoder")
    if encoder is None:
        s.context["notes"].add(s.context.get("encoder_note") or
                               "fidelity skipped: no 'encoder' in the manifest (a CLIP or DINO path or hub id)")
        return {"fidelity": None}
    return {"fidelity": concept_fidelity(encoder, s.source, s.source_mask, s.result, s.target_mask)}


def _m_localisation(s: Sample) -> dict:
    if s.attention is None:
        return {"attn_iou": None, "attn_mass": None}
    return attention_localisation(s.attention, s.target_mask)


#: metric group name -> (columns, function of a Sample returning {column: value or None}). Add a group here (e.g. a
#: toyworld PatternDetector's presence score) and name it in a manifest's ``metrics``.
METRIC_GROUPS: dict[str, tuple[tuple[str, ...], Callable[[Sample], dict]]] = {
    "psnr": (("psnr", "ssim"), _m_preservation),
    "ssim": (("psnr", "ssim"), _m_preservation),
    "lpips": (("lpips",), _m_lpips),
    "fidelity": (("fidelity",), _m_fidelity),
    "localisation": (("attn_iou", "attn_mass"), _m_localisation),
}
LOWER_IS_BETTER = {"lpips"}


def register_metric(name: str, columns: tuple[str, ...], score: Callable[[Sample], dict],
                    lower_is_better: tuple[str, ...] = ()) -> None:
    """Make ``name`` usable in a manifest's ``metrics``: ``score(sample)`` returns ``{column: value or None}`` for
    ``columns``; ``sample.context`` is shared by all samples of a merge (cache a loaded model there; add strings to
    ``sample.context["notes"]`` to explain skipped values)."""
    METRIC_GROUPS[name] = (tuple(columns), score)
    LOWER_IS_BETTER.update(lower_is_better)


def _columns(metrics: list[str]) -> list[str]:
    cols = []
    for m in metrics:
        cols += [c for c in METRIC_GROUPS[m][0] if c not in cols]
    return cols


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


# ---------------------------------------------------------------------------------------------- merging


@dataclass
class Report:
    results_csv: Path
    costs_csv: Path
    table: Path
    grid: Path
    missing: list[str]


def merge(manifest: Manifest, out_dir, device=None) -> Report:
    """Score every cached result and write results.csv, costs.csv, results.md and the grids (main process)."""
    out, cache = Path(out_dir), Cache(Path(out_dir))
    context: dict = {"notes": set()}
    if "fidelity" in manifest.metrics and manifest.encoder:
        try:
            context["encoder"] = ImageEncoder.load(manifest.encoder, device or "cpu")
        except ClicError as exc:
            context["encoder_note"] = f"fidelity skipped: {exc}"
    columns = _columns(manifest.metrics)
    rows, costs, missing = [], [], []
    tiles: dict[str, list] = {c.id: [] for c in manifest.cases}
    sizes: dict[str, int] = {}
    for run in manifest.runs:
        case, folder = run.case, cache.transfer_dir(run.transfer_key)
        if not cache.transfer_done(run.transfer_key):
            missing.append(f"{case.id} / {run.variant.name}")
            tiles[case.id].append((run.variant.name, None))
            continue
        info = json.loads((folder / "info.json").read_text())
        maps = load_file(str(folder / "attention.safetensors"))
        learn_info = json.loads(cache.concept_info(run.learn_key).read_text()) \
            if cache.concept_info(run.learn_key).is_file() else {}
        costs.append({"case": case.id, "method": run.variant.name,
                      "learn_s": learn_info.get("cost", {}).get("wall_s"),
                      "learn_peak_gib": learn_info.get("cost", {}).get("peak_gib"),
                      "transfer_s": info["cost"]["wall_s"], "transfer_peak_gib": info["cost"]["peak_gib"],
                      "memory": info["cost"]["memory"], "device": info["device"], "process": info.get("process", 0)})
        for k, seed in enumerate(info["seeds"]):
            result_path = folder / f"seed{seed}.png"
            size = image_size(result_path)[0]
            sizes[case.id] = size
            source, source_mask, target, target_mask = _inputs(case, size)
            sample = Sample(case, run.variant, seed, load_image(result_path, size), target, target_mask, source,
                            source_mask, maps.get(f"seed{seed}"), context)
            row = {"case": case.id, "method": run.variant.name, "base": run.variant.method, "seed": seed}
            for score in dict.fromkeys(METRIC_GROUPS[m][1] for m in manifest.metrics):   # each function once
                row.update(score(sample))
            rows.append(row)
            if k == 0:
                tiles[case.id].append((run.variant.name, Image.open(result_path).convert("RGB")))

    # results.csv (quality, deterministic) and costs.csv
    header = ["case", "method", "base", "seed"] + columns
    results_csv, costs_csv = out / "results.csv", out / "costs.csv"
    _write_csv(results_csv, header, rows)
    _write_csv(costs_csv, ["case", "method", "learn_s", "learn_peak_gib", "transfer_s", "transfer_peak_gib",
                           "memory", "device", "process"], costs)

    # results.md: mean and 95% interval per method
    table = out / "results.md"
    table.write_text(_markdown(manifest, columns, rows, costs, missing, sorted(context["notes"])))

    # grid: rows = cases; columns = source, target, each method (first seed)
    all_tiles, labels = [], []
    for case in manifest.cases:
        size = sizes.get(case.id, 256)
        source, source_mask, target, target_mask = _inputs(case, size)
        row_tiles = [mask_overlay(source, source_mask), mask_overlay(target, target_mask)]
        row_labels = [f"{case.id}: source", "target"]
        for name, image in tiles[case.id]:
            row_tiles.append(image if image is not None else to_pil(torch.zeros(1, size, size)))
            row_labels.append(name if image is not None else f"{name} (missing)")
        save_png(grid(row_tiles, rows=1, labels=row_labels, cell=max(128, size)), out / "grids" / f"{case.id}.png")
        all_tiles += row_tiles
        labels += row_labels
    grid_path = out / "grid.png"
    cell = max(128, max(sizes.values(), default=128))
    save_png(grid(all_tiles, rows=len(manifest.cases), labels=labels, cell=cell), grid_path)
    return Report(results_csv, costs_csv, table, grid_path, missing)


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_fmt(row.get(h)) for h in header])
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue())


def _markdown(manifest: Manifest, columns: list[str], rows: list[dict], costs: list[dict], missing: list[str],
              notes: list[str]) -> str:
    def cell(values, digits=3):
        values = [v for v in values if v is not None]
        if any(v == float("inf") for v in values):       # e.g. PSNR where the result equals the target
            return "inf"
        stats = mean_ci(values)
        if stats is None:
            return "–"
        mean, lo, hi = stats
        return f"{mean:.{digits}f}" if lo == hi else f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def mean(values):
        values = [v for v in values if v is not None]
        return f"{sum(values) / len(values):.1f}" if values else "–"

    arrows = {c: ("↓" if c in LOWER_IS_BETTER else "↑") for c in columns}
    head = ["method", "n"] + [f"{c} {arrows[c]}" for c in columns] + ["learn s", "transfer s", "peak GiB"]
    lines = [f"# Benchmark: {manifest.name}", "",
             f"{len(manifest.cases)} case(s); model {manifest.model}"
             + (f", inpainting model {manifest.inpaint_model}" if any(v.method == 'realfill'
                                                                      for v in manifest.variants) else "")
             + f"; {manifest.dtype}. Quality: mean [95% t-interval] over (case, seed) samples (inf: the result "
               "equals the target outside the mask, as the pixel composite makes it). Cost: mean wall seconds per "
               "learning (one per concept: variants sharing a concept share its cost) and per transfer, largest "
               "peak memory (costs.csv has every run).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in manifest.variants:
        mine = [r for r in rows if r["method"] == variant.name]
        cost = [c for c in costs if c["method"] == variant.name]
        peaks = [c[k] for c in cost for k in ("learn_peak_gib", "transfer_peak_gib") if c.get(k) is not None]
        values = [cell([r.get(c) for r in mine], 2 if c == "psnr" else 3) for c in columns]
        lines.append("| " + " | ".join([variant.name, str(len(mine))] + values + [
            mean([c.get("learn_s") for c in cost]),
            mean([c.get("transfer_s") for c in cost]),
            f"{max(peaks):.2f}" if peaks else "–"]) + " |")
    lines += ["", "Preservation (psnr, ssim, lpips) is measured outside the target mask; fidelity is the cosine "
                  "similarity of the source and edited regions in the image encoder; attn_iou / attn_mass locate "
                  "v*'s attention (mean over the denoising steps) in the target mask (see clic_lab.compare.metrics)."]
    if notes or missing:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [f"- missing (failed or not run): {m}"
                                                                      for m in missing]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- entry points


def run_benchmark(manifest_path, out_dir, device=None, dtype=None, progress: bool = True,
                  merge_only: bool = False) -> Report | None:
    """Check the manifest, run this process's share, wait for the others; the main process merges and returns the
    :class:`Report` (other processes return None). Raises :class:`BenchmarkError` if runs failed."""
    manifest = load_manifest(manifest_path, device, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # CPU processes (no GPU, or ACCELERATE_USE_CPU=1) meet over gloo; long runs: a generous barrier timeout
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(days=7))
    device = manifest.device or (str(state.device) if state.num_processes > 1 else None)
    failures = [] if merge_only else execute(manifest, out, state.process_index, state.num_processes, device,
                                             progress)
    if state.num_processes > 1:
        _write_json(out / "shards" / f"process{state.process_index}.json", {"failures": failures})
    state.wait_for_everyone()
    report = None
    if state.is_main_process:
        _write_json(out / "plan.json", [{"case": r.case.id, "method": r.variant.name, "learn_key": r.learn_key,
                                         "transfer_key": r.transfer_key} for r in manifest.runs])
        report = merge(manifest, out, device)
    state.wait_for_everyone()
    failed = failures or (report.missing if report is not None and not merge_only else [])
    if failed:
        raise BenchmarkError(f"{len(failed)} run(s) failed: " + "; ".join(failed)
                             + f" (the other results are in {out})")
    return report
