"""The ``clic`` command. Each sub-command parses its options into the library's config dataclasses and calls
the Python API; library errors (:class:`clic.errors.ClicError`) become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from . import __version__
from .errors import ClicError, InputError

log = logging.getLogger("clic")


# ---------------------------------------------------------------------------------- dataclass -> argparse


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, help text from the field's metadata; defaults stay None so that
    a recipe/preset can fill what the user did not say."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_text = f"{meta.get('help', '')} (default: {f.default})"
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif origin is tuple:
            parser.add_argument(flag, nargs="+", default=None, type=args[0] if args else str, help=help_text)
        else:
            base = args[0] if args and origin is not None else hint
            parser.add_argument(flag, type=base, default=None, choices=meta.get("choices"), help=help_text)


def dataclass_values(args: argparse.Namespace, cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local diffusers folder (default: CompVis/stable-diffusion-v1-4, or the concept's "
                        "base model)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of the frozen parts; trainable parameters stay fp32 (default: fp32)")


def _check_out(path: str, suffix: str | None = None) -> Path:
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name")
    if suffix and out.suffix != suffix:
        raise InputError(f"{out}: the output file must end in {suffix}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: folder is not writable")
    return out


# ---------------------------------------------------------------------------------- commands


def cmd_make_model(args) -> None:
    from .builder import make_model

    out = make_model(args.kind, args.dir, seed=args.seed, dtype=args.dtype)
    print(out)


def cmd_learn(args) -> None:
    import torch

    from .baselines import default_model, learn_concept, learn_config, learn_values
    from .imaging import image_size, load_image, load_mask
    from .models import load_backbone

    out = _check_out(args.out, ".safetensors")
    images, masks = list(args.image), list(args.mask)
    if len(images) == 1 and len(masks) >= 1:
        groups = [masks]                                   # one image, one or several concepts
    elif len(images) == len(masks):
        groups = [[m] for m in masks]                      # several images of one concept
    else:
        raise InputError(f"got {len(images)} images and {len(masks)} masks: give one mask per image, "
                         "or several masks for a single image (one concept each)")
    cfg = learn_config(args.method, args.recipe, **learn_values(args))    # --method: clic or a baseline
    cfg.check(len(groups[0]))
    for image_path, group in zip(images, groups):   # fail fast, before the model loads
        for mask_path in group:
            load_mask(mask_path, 256, image_size(image_path), cfg.mask_threshold)
    backbone = load_backbone(args.model or default_model(args.method), args.device, args.dtype)
    size = backbone.resolution
    pixel_list, mask_list = [], []
    for image_path, group in zip(images, groups):
        pixel_list.append(load_image(image_path, size))
        mask_list.append(torch.cat([load_mask(m, size, image_size(image_path), cfg.mask_threshold) for m in group]))
    cfg.check(mask_list[0].shape[0])
    log_path = args.log or str(out.with_suffix(".log.jsonl"))
    result = learn_concept(backbone, pixel_list, mask_list, cfg, out_path=out, log_path=log_path, resume=args.resume,
                           progress=not args.quiet)
    if args.save_maps:
        from .maps import save_learning_preview

        save_learning_preview(backbone, result, pixel_list, mask_list, args.save_maps, seed=cfg.seed)
    final = result.history[-1]
    losses = " ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith("l_"))
    print(f"{out}  tokens={' '.join(result.concept.tokens)}  {losses}")


def cmd_export(args) -> None:
    from .concept import Concept, export_diffusers
    from .models import load_backbone

    concept = Concept.load(args.concept)
    backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
    out = export_diffusers(concept, backbone, args.out)
    print(out)


def cmd_info(args) -> None:
    import json

    from .concept import Concept

    concept = Concept.load(args.concept)
    n = sum(v.numel() for v in concept.attn_weights.values())
    print(json.dumps({**concept.meta, "attention_parameters": n}, indent=2, default=str))


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .learn import LearnConfig

    parser = argparse.ArgumentParser(
        prog="clic", description="CLiC: learn a local visual concept in the context of its object, from one image "
                                 "and a mask, then transfer it to other objects or generate new ones.")
    parser.add_argument("--version", action="version", version=f"clic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("learn", help="learn a concept token v* in context (paper sec. 3.1)",
                       description="In-context concept learning: v* + cross-attention K/V trained with l_con "
                                   "(soft-masked diffusion loss), l_att (v*'s up-block cross-attention tied to the "
                                   "mask) and l_RoI (masked input under 'a photo of v*').")
    p.add_argument("--image", action="append", required=True, help="source image I_s (PNG/JPEG/WebP, any mode); "
                   "repeat for several images of one concept")
    p.add_argument("--mask", action="append", required=True, help="binary mask M_s of the concept (white = RoI); "
                   "resized with its image; repeat: one per image, or several for one image (one token each)")
    p.add_argument("--out", required=True, help="output concept file (.safetensors)")
    p.add_argument("--log", default=None, help="JSON-lines log of the losses (default: OUT with .log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt left by an interrupted run")
    p.add_argument("--save-maps", metavar="DIR", default=None,
                   help="write the mask, v*'s attention map overlay and a grid to DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    add_dataclass_options(p, LearnConfig)
    from .baselines import add_learn_options

    add_learn_options(p)                                # --method and RealFill's own options
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("make-model", help="write a random-init pipeline (tiny, tiny-sd2, sd14-random) in the "
                                          "diffusers layout, for tests and benchmarks")
    p.add_argument("kind", choices=None, help="tiny | tiny-sd2 | sd14-random")
    p.add_argument("dir", help="output folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("export-diffusers", help="write Custom Diffusion + textual inversion files for a stock "
                                                "diffusers StableDiffusionPipeline")
    p.add_argument("concept")
    p.add_argument("out", help="output folder")
    _add_model_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="print a concept file's metadata")
    p.add_argument("concept")
    p.set_defaults(func=cmd_info)

    for register in _extra_commands():
        register(sub, _add_model_options)
    return parser


def _extra_commands():
    """Sub-commands that live next to their feature (transfer, generate, ...): each module exposes
    ``register_cli(subparsers, add_model_options)``."""
    import importlib

    for name in ("transfer", "generate", "roi", "baselines", "bench", "benchmark", "demo", "ui"):
        try:
            module = importlib.import_module(f"clic.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"clic.{name}":
                continue
            raise
        if hasattr(module, "register_cli"):
            yield module.register_cli


def _quiet_libraries(verbose: bool) -> None:
    """No weight-loading progress bars or library chatter on stderr: errors stay one line."""
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        for lib in (dlog, tlog):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _quiet_libraries(args.verbose)
    try:
        args.func(args)
    except ClicError as exc:
        print(f"clic: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clic: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
