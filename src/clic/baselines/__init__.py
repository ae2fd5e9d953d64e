"""The paper's baselines (sec. 4.2) under CLiC's interface: same inputs (source image, source mask, object class;
target image, target mask), same concept file, same transfer and generation entry points.

    clic learn --method clic|custom-diffusion|break-a-scene|realfill --image I --mask M --object-class chair --out C
    clic baselines transfer C --target T --mask M_tg --out DIR       (dispatches on C's method)
    clic baselines generate C --out DIR
    clic baselines list

Python: :func:`learn_config` + :func:`learn_concept`, :func:`transfer_config` + :func:`transfer_concept`,
:func:`generate_config` + :func:`generate_concept` (see :mod:`clic.baselines.methods`).

Defaults follow each method's published recipe where the paper does not say otherwise. Deviations (details and
reasons in ``src/clic/baselines/README.md``):

==================  ==========================================  ==========================================
method              as the paper runs it / published recipe     here
==================  ==========================================  ==========================================
custom-diffusion    prior preservation (200 class images)       none (one source image, as CLiC; paper)
                    batch 2 x 250 steps, random-rescale aug.    batch 1 x 500 steps (same samples), h-flip only
break-a-scene       SD2.1, phase 2 trains full UNet + text enc  SD1.4, phase 2 trains v* + cross-attn K/V (paper)
                    prior preservation (100 images)             none
                    masks resized nearest; l_att at 16x16       bilinear (soft edge); maps upsampled to latent
                    new optimiser for phase 2                   one AdamW, state kept across phases
realfill            SD2-inpainting, LoRA on UNet + text enc.    SD1.x-inpainting, v* + cross-attn K/V (paper)
                    lr 2e-4 / 4e-5 (LoRA)                       1e-5 (full K/V matrices, Custom Diffusion's)
                    loss weight 0 in the target hole            loss weight = M_s (the concept region)
                    VAE posterior samples in training           posterior mean
==================  ==========================================  ==========================================
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .methods import (METHODS, Method, check_method, default_model, generate_concept, generate_config, learn_concept,
                      learn_config, method_of, transfer_concept, transfer_config)
from .realfill import (InpaintConfig, InpaintResult, RealFillConfig, generate_inpainting, inpaint, learn_realfill,
                       random_masks, realfill_loss)

__all__ = ["METHODS", "Method", "check_method", "default_model", "generate_concept", "generate_config",
           "learn_concept", "learn_config", "method_of", "transfer_concept", "transfer_config", "InpaintConfig",
           "InpaintResult", "RealFillConfig", "generate_inpainting", "inpaint", "learn_realfill", "random_masks",
           "realfill_loss", "add_learn_options", "learn_values", "register_cli"]


# ---------------------------------------------------------------------------------------------- `clic learn`


def add_learn_options(parser) -> None:
    """``--method`` and the RealFill-only options of ``clic learn`` (the others come from LearnConfig)."""
    from dataclasses import fields

    from ..cli import add_dataclass_options
    from ..learn import LearnConfig

    parser.add_argument("--method", default="clic", choices=tuple(METHODS),
                        help="clic (paper) or one of the paper's baselines (sec. 4.2); each baseline's defaults are "
                             "its published recipe, see `clic baselines list` (default: clic)")
    group = parser.add_argument_group("RealFill only (--method realfill)")
    shared = tuple(f.name for f in fields(LearnConfig)) + ("recipe",)
    add_dataclass_options(group, RealFillConfig, skip=shared)


def learn_values(args) -> dict:
    """The learning options given on a ``clic learn`` command line (LearnConfig's and RealFill's)."""
    from dataclasses import fields

    from ..cli import dataclass_values
    from ..learn import LearnConfig

    if getattr(args, "method", "clic") == "realfill" and getattr(args, "save_maps", None):
        raise InputError("--save-maps is not available for --method realfill")
    values = dataclass_values(args, LearnConfig)
    values.pop("recipe", None)                      # given separately (--recipe)
    for f in fields(RealFillConfig):
        value = getattr(args, f.name, None)
        if f.name not in values and f.name != "recipe" and value is not None:
            values[f.name] = value
    return values


# ---------------------------------------------------------------------------------------------- `clic baselines`


def _cmd_list(args) -> None:
    for m in METHODS.values():
        print(f"{m.name:18s} {m.summary}\n{'':18s} base model: {m.default_model}")


def _backbone(args, concept):
    from ..models import load_backbone

    backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
    concept.check_base(backbone, args.concept)
    return backbone


def _cmd_transfer(args) -> None:
    from ..cli import dataclass_values
    from ..imaging import grid, image_size, load_image, load_mask, mask_overlay, save_png, to_pil
    from ..transfer import TransferConfig

    from ..concept import Concept

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    concept = Concept.load(args.concept)
    method = method_of(concept)
    values = dataclass_values(args, TransferConfig)
    values.pop("recipe", None)
    cfg = transfer_config(method, args.recipe, **values)
    cfg.check()
    backbone = _backbone(args, concept)
    size = backbone.resolution
    target = load_image(args.target, size)
    mask = load_mask(args.mask, size, image_size(args.target), cfg.mask_threshold)

    result = transfer_concept(backbone, concept, target, mask, cfg, progress=not args.quiet)

    files = {}
    tiles, labels = [], []
    if args.source:
        tiles, labels = [to_pil(load_image(args.source, size))], ["source"]
    tiles += [mask_overlay(result.target, result.mask), to_pil(result.target)]
    labels += ["mask", "target"]
    for k, seed in enumerate(result.seeds):
        files[f"seed{seed}.png"] = to_pil(result.images[k])
        tiles.append(files[f"seed{seed}.png"])
        labels.append(f"{method} seed {seed}")
    files["grid.png"] = grid(tiles, labels=labels, cell=max(128, size))
    for name, image in files.items():
        save_png(image, out_dir / name)
    print("\n".join(str(out_dir / name) for name in files))


def _cmd_generate(args) -> None:
    from ..cli import dataclass_values
    from ..concept import Concept
    from ..generate import GenerateConfig
    from ..imaging import grid, save_png, to_pil

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    concept = Concept.load(args.concept)
    cfg = generate_config(method_of(concept), **dataclass_values(args, GenerateConfig))
    cfg.check()
    backbone = _backbone(args, concept)
    result = generate_concept(backbone, concept, cfg, progress=not args.quiet)
    files = {f"seed{seed}.png": to_pil(result.images[k]) for k, seed in enumerate(result.seeds)}
    files["grid.png"] = grid(list(files.values()), labels=[f"seed {s}" for s in result.seeds],
                             cell=max(128, backbone.resolution))
    for name, image in files.items():
        save_png(image, out_dir / name)
    print("\n".join(str(out_dir / name) for name in files))


def register_cli(subparsers, add_model_options) -> None:
    from ..cli import add_dataclass_options
    from ..generate import GenerateConfig
    from ..transfer import TransferConfig

    p = subparsers.add_parser("baselines", help="the paper's baselines (Custom Diffusion, Break-A-Scene, RealFill): "
                                                "list, transfer or generate with any method's concept")
    sub = p.add_subparsers(dest="baselines_command", required=True, metavar="ACTION")

    q = sub.add_parser("list", help="the methods, their recipes and base models")
    q.set_defaults(func=_cmd_list)

    q = sub.add_parser("transfer", help="transfer a concept the way its method does",
                       description="CLiC: blended editing with guidance; Custom Diffusion and Break-A-Scene: the same "
                                   "blended editing with --eta 0; RealFill: inpaint the target mask (DDPM 200 steps, "
                                   "CFG 1 unless given) and paste. The options' defaults shown are CLiC's.")
    q.add_argument("concept", help="concept file made by `clic learn --method ...`")
    q.add_argument("--target", required=True, help="target image I_tg")
    q.add_argument("--mask", required=True, help="target mask M_tg (white = region to edit)")
    q.add_argument("--source", default=None, help="source image, only shown in the grid")
    q.add_argument("--out", required=True, help="output folder: seed<S>.png per seed and grid.png")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(q)
    add_dataclass_options(q, TransferConfig)
    q.set_defaults(func=_cmd_transfer)

    q = sub.add_parser("generate", help="generate objects carrying a concept the way its method does",
                       description="CLiC: two-stage sampling (t_s = 5); baselines: plain sampling with the concept "
                                   "(t_s = 0) unless --base-steps is given.")
    q.add_argument("concept", help="concept file made by `clic learn --method ...`")
    q.add_argument("--out", required=True, help="output folder: seed<S>.png per seed and grid.png")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(q)
    add_dataclass_options(q, GenerateConfig)
    q.set_defaults(func=_cmd_generate)
