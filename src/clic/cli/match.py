"""``clic match``: find the region of a learned concept on other images with a token w* (paper sec. 3.3)."""

from __future__ import annotations

from ..concept import Concept
from ..config import MaskConfig, MatchConfig
from ..errors import InputError
from ..imaging import image_size, load_image, load_mask
from ..models import load_backbone
from ..roi import Matcher, attention_to_mask, learn_matcher, matcher_attention
from .masks import grid_file, image_sizes, mask_files, output_names, stem_names
from .options import add_config_options, add_model_options, add_quiet_option, config_values, write_folder
from .validate import exclusive, output_file, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "match", help="find the region of a learned concept on other images with a token w* (paper sec. 3.3)",
        description="Automatic target masks: learn w* (initialised from v*) with l_att alone on the source image "
                    "and mask, prompt 'a <w*> region of a OBJECT', on the UNet with the concept applied; then mark "
                    "each target where w*'s cross-attention is high. Or apply a w* saved before (--matcher). "
                    "Writes per target STEM_mask.png (at the target's size), STEM_overlay.png and "
                    "STEM_attention.png (at the model resolution, centre-cropped).")
    p.add_argument("--concept", default=None, help="concept file made by `clic learn` (needed to train w*; with "
                                                   "--matcher: default, the path recorded in the matcher)")
    p.add_argument("--source", default=None, help="source image I_s the concept was learned on")
    p.add_argument("--mask", default=None, help="its mask M_s (white = RoI)")
    p.add_argument("--matcher", default=None, help="a w* file made before by `clic match` or `clic discover`")
    p.add_argument("--target", action="append", default=None,
                   help="image to find the region on (repeat for several)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-matcher", default=None,
                   help="where the trained w* goes (default: OUT/matcher.safetensors)")
    add_quiet_option(p)
    add_model_options(p, "the concept's base model")
    add_config_options(p, MatchConfig)
    add_config_options(p, MaskConfig)
    p.set_defaults(func=run)


def run(args) -> None:
    # 1. Check every input and output before the model loads and before anything is written.
    cfg = MatchConfig(**config_values(args, MatchConfig))
    mask_cfg = MaskConfig(**config_values(args, MaskConfig))
    cfg.check()
    mask_cfg.check()
    targets = list(args.target or [])
    training = args.source is not None or args.mask is not None
    if args.matcher and training:
        raise InputError("give either --matcher (a trained w*) or --source/--mask/--concept (train w*), not both")
    if not args.matcher and not training:
        raise InputError("give --matcher FILE, or --concept, --source and --mask to train w*")
    if training and not (args.source and args.mask and args.concept):
        raise InputError("training w* needs --concept, --source and --mask")
    if not targets and not training:
        raise InputError("give at least one --target image")
    target_sizes = image_sizes(targets)
    inputs = {"--concept": [args.concept], "--source": [args.source], "--mask": [args.mask],
              "--matcher": [args.matcher], "--target": targets}
    in_folder = training and not args.save_matcher            # the trained w* goes with the masks
    out_dir = output_folder(args.out, stem_names(output_names(targets)) + ["matcher.safetensors"] * in_folder,
                            inputs)
    matcher_out = out_dir / "matcher.safetensors"
    if training:
        if not in_folder:
            matcher_out = output_file(args.save_matcher, ".safetensors", inputs)
        concept = Concept.load(args.concept)
        load_mask(args.mask, 256, image_size(args.source))
        model = args.model or concept.meta["base_model"]
    else:
        matcher = Matcher.load(args.matcher, args.concept)
        model = args.model or matcher.token.meta["base_model"]

    with exclusive(out_dir):
        # 2. Model; w* (trained, or loaded).
        backbone = load_backbone(model, args.device, args.dtype)
        size = backbone.resolution
        mask_cfg.check(backbone.training_scheduler().config.num_train_timesteps)
        if training:
            image = load_image(args.source, size)
            mask = load_mask(args.mask, size, image_size(args.source))
            matcher = learn_matcher(backbone, concept, image, mask, cfg, concept_path=args.concept,
                                    progress=not args.quiet)
        else:
            matcher.token.check_base(backbone, args.matcher)
            if matcher.parent is not None:
                matcher.parent.check_base(backbone, "concept")

        # 3. Masks, all computed before any file is written; then all files at once.
        files, shown = {}, []
        names = output_names(targets)
        for path, stem, wh in zip(targets, names, target_sizes):
            image = load_image(path, size)
            attention = matcher_attention(backbone, matcher, image, mask_cfg)
            mask = attention_to_mask(attention, size, mask_cfg)
            files.update(mask_files(stem, image, mask, attention, wh))
            shown.append((image, mask, attention))
        if shown:
            files.update(grid_file(names, *zip(*shown)))
        if in_folder:
            files["matcher.safetensors"] = matcher.save
        elif training:
            matcher.save(matcher_out)
        write_folder(out_dir, files)
    if training:
        print(f"{matcher_out}  token={matcher.tokens[0]}  prompt={matcher.prompt!r}")
