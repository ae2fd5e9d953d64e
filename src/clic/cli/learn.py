"""``clic learn``: in-context concept learning (paper sec. 3.1) from source images and masks into a concept file."""

from __future__ import annotations

from ..config import LEARN_RECIPES, LearnConfig, learn_config
from ..errors import OutputError
from ..learn import learn
from ..maps import learning_preview
from ..models import DEFAULT_MODEL, load_backbone
from ..runs import checkpoint_path
from .options import (add_config_options, add_model_options, add_quiet_option, add_recipe_option, check_sources,
                      config_values, load_sources, peek_recipe, source_groups, write_folder)
from .validate import exclusive, output_file, output_folder


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


def learn_files(args, cfg, learner, model: str, after=None):
    """Check every input and output, load the model, learn with ``learner`` (:func:`clic.learn.learn`'s signature),
    then ``after(backbone, images, masks, result)`` (more outputs), all while holding the output's lock; returns a
    summary line."""
    groups = source_groups(list(args.image), list(args.mask))
    inputs = {"--image": args.image, "--mask": args.mask}
    out = output_file(args.out, ".safetensors", inputs)
    log = output_file(args.log or out.with_suffix(".log.jsonl"), None, {**inputs, "--out": [out]})
    output_file(checkpoint_path(out), None, {**inputs, "--log": [log]})
    cfg.check(len(groups[0][1]))
    # how the files become model inputs (RealFill's config has the defaults: crop, binary)
    threshold = cfg.mask_threshold if getattr(cfg, "binary_masks", True) else None
    fit = getattr(cfg, "image_fit", "crop")
    check_sources(groups, threshold, fit)                         # fail fast, before the model loads
    with exclusive(out):                                          # one run per output: no interleaved log
        backbone = load_backbone(model, args.device, args.dtype)
        images, masks = load_sources(groups, backbone.resolution, threshold, fit)
        try:
            result = learner(backbone, images, masks, cfg, out_path=out, log_path=str(log), resume=args.resume,
                             progress=not args.quiet)
        except OutputError as exc:            # e.g. a full disk: what was learned up to the checkpoint is kept
            ckpt = checkpoint_path(out)
            raise OutputError(f"{exc}; {ckpt} is kept: --resume continues from it" if ckpt.is_file() else
                              str(exc)) from exc
        if after is not None:
            after(backbone, images, masks, result)
    losses = " ".join(f"{k}={v:.4f}" for k, v in result.history[-1].items() if k.startswith("l_"))
    return f"{out}  tokens={' '.join(result.concept.tokens)}  {losses}"


def preview_names(groups, n_tokens: int) -> list[str]:
    """The files of :func:`clic.maps.learning_preview`."""
    return [f"{kind}_{i}_{j}.png" for i in range(len(groups)) for j in range(n_tokens)
            for kind in ("mask", "attention")] + ["grid.png"]


def run(args) -> None:
    cfg = learn_config(args.recipe or "paper", **config_values(args, LearnConfig))
    after = None
    if args.save_maps:
        groups = source_groups(list(args.image), list(args.mask))
        maps = output_folder(args.save_maps, preview_names(groups, len(groups[0][1])),
                             {"--image": args.image, "--mask": args.mask})

        def after(backbone, images, masks, result):
            write_folder(maps, learning_preview(backbone, result.concept, images, masks, seed=cfg.seed), show=False)
    print(learn_files(args, cfg, learn, args.model or DEFAULT_MODEL, after))
