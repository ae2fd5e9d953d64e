"""``clic learn``: in-context concept learning (paper sec. 3.1) from source images and masks into a concept file."""

from __future__ import annotations

from ..config import LEARN_RECIPES, LearnConfig, learn_config
from ..learn import learn
from ..maps import learning_preview
from ..models import DEFAULT_MODEL, load_backbone
from .options import (add_config_options, add_model_options, add_quiet_option, add_recipe_option, check_sources,
                      config_values, load_sources, output_file, output_folder, peek_recipe, source_groups,
                      write_images)


def register(sub, argv) -> None:
    p = sub.add_parser("learn", help="learn a concept token v* in context (paper sec. 3.1)",
                       description="In-context concept learning: v* + cross-attention K/V trained with l_con "
                                   "(soft-masked diffusion loss), l_att (v*'s up-block cross-attention tied to the "
                                   "mask) and l_RoI (masked input under 'a photo of v*'). The option defaults shown "
                                   "are the selected recipe's.")
    add_source_options(p, "learn")
    p.add_argument("--save-maps", metavar="DIR", default=None,
                   help="write the mask, v*'s attention map overlay and a grid to DIR")
    add_model_options(p, f"{DEFAULT_MODEL}")
    add_recipe_option(p, LEARN_RECIPES, "learning")
    recipe = peek_recipe(argv)
    add_config_options(p, LearnConfig, learn_config(recipe) if recipe in LEARN_RECIPES else None)
    p.set_defaults(func=run)


def add_source_options(p, command: str) -> None:
    """The source images and masks, the output file, its log and resuming (``clic learn`` and ``realfill learn``)."""
    p.add_argument("--image", action="append", required=True, help="source image I_s (PNG/JPEG/WebP, any mode); "
                   "repeat for several images of one concept")
    p.add_argument("--mask", action="append", required=True, help="mask M_s of the concept (white = RoI; "
                   "thresholded unless --no-binary-masks); resized with its image; repeat: one per image"
                   + (", or several for one image (one token each)" if command == "learn" else ""))
    p.add_argument("--out", required=True, help="output concept file (.safetensors)")
    p.add_argument("--log", default=None, help="JSON-lines log of the losses (default: OUT with .log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt left by an interrupted run")
    add_quiet_option(p)


def learn_files(args, cfg, learner, model: str):
    """Check every input, load the model, learn with ``learner`` (:func:`clic.learn.learn`'s signature); returns the
    backbone, the images, the masks, the result and a summary line."""
    out = output_file(args.out, ".safetensors")
    groups = source_groups(list(args.image), list(args.mask))
    cfg.check(len(groups[0][1]))
    # how the files become model inputs (RealFill's config has the defaults: crop, binary)
    threshold = cfg.mask_threshold if getattr(cfg, "binary_masks", True) else None
    fit = getattr(cfg, "image_fit", "crop")
    check_sources(groups, threshold, fit)                         # fail fast, before the model loads
    backbone = load_backbone(model, args.device, args.dtype)
    images, masks = load_sources(groups, backbone.resolution, threshold, fit)
    result = learner(backbone, images, masks, cfg, out_path=out, log_path=args.log or str(out.with_suffix(".log.jsonl")),
                     resume=args.resume, progress=not args.quiet)
    losses = " ".join(f"{k}={v:.4f}" for k, v in result.history[-1].items() if k.startswith("l_"))
    return backbone, images, masks, result, f"{out}  tokens={' '.join(result.concept.tokens)}  {losses}"


def run(args) -> None:
    cfg = learn_config(args.recipe or "paper", **config_values(args, LearnConfig))
    maps = output_folder(args.save_maps) if args.save_maps else None
    backbone, images, masks, result, summary = learn_files(args, cfg, learn, args.model or DEFAULT_MODEL)
    if maps is not None:
        write_images(learning_preview(backbone, result.concept, images, masks, seed=cfg.seed), maps, show=False)
    print(summary)
