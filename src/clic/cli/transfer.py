"""``clic transfer``: transfer a learned concept into a region of a target image (paper sec. 3.2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..concept import Concept
from ..config import LEARN_RECIPES, TransferConfig, transfer_config
from ..errors import InputError
from ..imaging import grid, heat_overlay, load_image, mask_overlay, to_pil
from ..models import load_backbone
from ..pipeline import ClicPipeline
from ..roi import MaskConfig, Matcher, auto_target_mask
from ..sampling import check_prompt
from .options import (add_config_options, add_model_options, add_quiet_option, add_recipe_option, check_target,
                      config_values, peek_recipe, write_folder)
from .validate import exclusive, image_file, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "transfer", help="transfer a learned concept into a region of a target image (paper sec. 3.2)",
        description="Blended latent editing (eq. 6) with cross-attention guidance (eq. 7), then a pixel composite. "
                    "The start of the edit is --t-start (paper), --replace-steps (official code) or --strength "
                    "(img2img); by default t_start = 15 of 50 steps. The option defaults shown are the selected "
                    "recipe's.")
    p.add_argument("concept", help="concept file (.safetensors) made by `clic learn`")
    add_target_options(p, auto=True)
    p.add_argument("--matcher", default=None, help="with --mask auto: the w* file made by `clic match`; the mask it "
                                                   "finds is written as mask_auto.png")
    p.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=True,
                   help="write each result at the target's own size: the model's centre crop is scaled back and "
                        "composited into the original, whose pixels are kept exactly outside the feathered mask "
                        "(default: on; --no-full-size: the model resolution)")
    p.add_argument("--save-attention", action="store_true", help="also write v*'s attention map over each result "
                                                                 "(averaged over the steps)")
    add_model_options(p, "the concept's base model")
    add_recipe_option(p, LEARN_RECIPES, "transfer")
    recipe = peek_recipe(argv)
    add_config_options(p, TransferConfig, transfer_config(recipe) if recipe in LEARN_RECIPES else None)
    p.set_defaults(func=run)


def add_target_options(p, auto: bool = False) -> None:
    p.add_argument("--target", required=True, help="target image I_tg (any common format)")
    p.add_argument("--mask", required=True, help="target mask M_tg (white = region to edit), same aspect ratio"
                                                 + ("; 'auto': found by a w* token (sec. 3.3), see --matcher"
                                                    if auto else ""))
    p.add_argument("--source", default=None, help="source image, only shown in the grid")
    p.add_argument("--out", required=True, help="output folder: seed<S>.png per seed (the edited target), grid.png "
                                                "(source | mask | target | results, model resolution)")
    add_quiet_option(p)


def concept_and_model(args, concept: Concept | None = None):
    """The concept file (or ``concept``, read from it before) and its base model (or ``--model``), checked against
    each other."""
    concept = concept if concept is not None else Concept.load(args.concept)
    backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
    concept.check_base(backbone, args.concept)
    return concept, backbone


def target_outputs(args, seeds: list[int], extra: tuple[str, ...] = ()) -> Path:
    """Check the target, its mask, the source and the output folder (the files ``result_files`` writes, plus
    ``extra``) before the model loads; returns the output folder."""
    auto = args.mask == "auto"
    for path in (args.target, args.source):
        if path:
            image_file(path)
    names = [f"seed{s}.png" for s in seeds] + [f"attention_seed{s}.png" for s in seeds] + ["grid.png", *extra]
    inputs = {"concept": [args.concept], "--target": [args.target], "--mask": [] if auto else [args.mask],
              "--source": [args.source], "--matcher": [getattr(args, "matcher", None)]}
    return output_folder(args.out, names, inputs)


def result_files(result, size: int, source=None, images=None, label: str = "seed", attention: bool = False) -> dict:
    """``seed<S>.png`` per seed (``images``: PIL images, default the results) and ``grid.png``: source | mask |
    target | the results at the model resolution (with v*'s attention over each, if asked: also
    ``attention_seed<S>.png``)."""
    images = [to_pil(x) for x in result.images] if images is None else images
    files = {}
    tiles, labels = ([to_pil(source)], ["source"]) if source is not None else ([], [])
    tiles += [mask_overlay(result.target, result.mask), to_pil(result.target)]
    labels += ["mask", "target"]
    for k, seed in enumerate(result.seeds):
        files[f"seed{seed}.png"] = images[k]
        tiles.append(to_pil(result.images[k]))
        labels.append(f"{label} {seed}")
        if attention:
            heat = heat_overlay(result.images[k], result.attention[:, k].mean((0, 1)))
            files[f"attention_seed{seed}.png"] = heat
            tiles.append(heat)
            labels.append(f"CA({result.tokens[0]})")
    files["grid.png"] = grid(tiles, labels=labels, cell=max(128, size))
    return files


def run(args, recipe: str | None = None, label: str = "seed") -> None:
    """``clic transfer`` (and ``clic baselines transfer`` of a concept transferred by blended editing: ``recipe``
    is its method's)."""
    cfg = transfer_config(getattr(args, "recipe", None) or recipe or "paper", **config_values(args, TransferConfig))
    cfg.check()
    auto = args.mask == "auto"
    if auto and not getattr(args, "matcher", None):
        raise InputError("--mask auto needs --matcher W.safetensors (made by `clic match`)")
    out_dir = target_outputs(args, cfg.seed_list(), ("mask_auto.png",) if auto else ())
    check_target(args.target, None if auto else args.mask, cfg.mask_threshold)
    concept = Concept.load(args.concept)
    if concept.meta.get("method") == "realfill":
        raise InputError(f"{args.concept} is a RealFill concept (inpainting model): use `clic realfill transfer`")
    check_prompt(cfg.prompt if cfg.prompt is not None else concept.meta.get("prompt", ""), concept.tokens)
    with exclusive(out_dir):
        _run(args, cfg, concept, out_dir, auto, label)


def _run(args, cfg, concept, out_dir: Path, auto: bool, label: str) -> None:
    concept, backbone = concept_and_model(args, concept)
    pipe = ClicPipeline.from_backbone(backbone, cfg.scheduler)
    pipe.set_progress_bar_config(disable=args.quiet)
    pipe.load_concept(concept)
    size = backbone.resolution
    mask = args.mask
    if auto:  # automatic target mask (sec. 3.3): w*'s attention on the target, thresholded
        mask = auto_target_mask(backbone, Matcher.load(args.matcher, concept=concept), load_image(args.target, size),
                                MaskConfig())
    source = load_image(args.source, size) if args.source else None

    # the results at the target's own size unless --no-full-size (a found mask is at the model resolution)
    out = pipe.transfer(image=args.target, mask_image=mask, config=cfg, full_size=getattr(args, "full_size", False))

    # everything is computed: now write (all files or none)
    files = {"mask_auto.png": to_pil(mask)} if auto else {}
    files.update(result_files(out.result, size, source, out.images, label, getattr(args, "save_attention", False)))
    write_folder(out_dir, files)
