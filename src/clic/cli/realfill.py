"""``clic realfill``: the RealFill baseline (sec. 4.2), with its own model (SD inpainting) and loop: learn a
concept, transfer it by inpainting the target mask, generate with it."""

from __future__ import annotations

from ..baselines.realfill import generate_inpainting, inpaint, learn_realfill
from ..concept import Concept
from ..config import GenerateConfig, InpaintConfig, RealFillConfig, generate_config, learn_config, transfer_config
from ..imaging import image_size, load_image, load_mask
from ..models import DEFAULT_INPAINT_MODEL
from . import generate, learn, transfer
from .options import add_config_options, add_model_options, check_target, config_values, write_folder
from .validate import exclusive


def register(sub, argv) -> None:
    p = sub.add_parser("realfill", help="the RealFill baseline (its own inpainting model and loop): learn, transfer, "
                                        "generate")
    actions = p.add_subparsers(dest="realfill_command", required=True, metavar="ACTION")

    q = actions.add_parser("learn", help="learn v* and the cross-attention K/V of an inpainting model under random "
                                         "masks (the paper's adaptation of RealFill)")
    learn.add_source_options(q, "realfill")
    add_model_options(q, DEFAULT_INPAINT_MODEL)
    add_config_options(q, RealFillConfig)
    q.set_defaults(func=run_learn)

    q = actions.add_parser("transfer", help="inpaint the target mask with a RealFill concept, then paste")
    q.add_argument("concept", help="concept file made by `clic realfill learn`")
    transfer.add_target_options(q)
    add_model_options(q, "the concept's base model")
    add_config_options(q, InpaintConfig)
    q.set_defaults(func=run_transfer)

    q = actions.add_parser("generate", help="generate with a RealFill concept (the inpainting model, nothing kept)")
    generate.add_concept_options(q)
    add_config_options(q, GenerateConfig, generate_config("realfill"))
    q.set_defaults(func=run_generate)


def run_learn(args) -> None:
    cfg = learn_config("realfill", **config_values(args, RealFillConfig))
    print(learn.learn_files(args, cfg, learn_realfill, args.model or DEFAULT_INPAINT_MODEL))


def run_transfer(args, values: dict | None = None) -> None:
    """``clic realfill transfer`` (and ``clic baselines transfer`` of a RealFill concept, with its ``values``)."""
    cfg = transfer_config("realfill", **(values if values is not None else config_values(args, InpaintConfig)))
    cfg.check()
    out_dir = transfer.target_outputs(args, cfg.seed_list())
    check_target(args.target, args.mask, cfg.mask_threshold)
    concept = Concept.load(args.concept)
    with exclusive(out_dir):
        concept, backbone = transfer.concept_and_model(args, concept)
        size = backbone.resolution
        target = load_image(args.target, size)
        mask = load_mask(args.mask, size, image_size(args.target), cfg.mask_threshold)
        source = load_image(args.source, size) if args.source else None
        result = inpaint(backbone, concept, target, mask, cfg, progress=not args.quiet)
        write_folder(out_dir, transfer.result_files(result, size, source, label="realfill seed"))


def run_generate(args) -> None:
    generate.run(args, recipe="realfill", generator=generate_inpainting)
