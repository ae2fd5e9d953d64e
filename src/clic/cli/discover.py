"""``clic discover``: find the pattern several images share and learn it (paper sec. 3.3, fig. 5)."""

from __future__ import annotations

from pathlib import Path

from ..config import DiscoverConfig, MaskConfig, learn_config, learn_config_file
from ..errors import InputError
from ..imaging import load_image
from ..models import DEFAULT_MODEL, load_backbone
from ..roi import discover
from .masks import grid_file, image_sizes, mask_files, output_names, stem_names
from .options import add_config_options, add_model_options, add_quiet_option, config_values, write_folder
from .validate import exclusive, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "discover", help="find the pattern several images share and learn it (paper sec. 3.3, fig. 5)",
        description="Automatic source masks: learn w* and the cross-attention K/V with the plain diffusion loss on "
                    "all images (prompt 'an OBJECT with <w*> style'), take w*'s cross-attention on each image as "
                    "its mask, then learn the concept in context with those masks (the options of `clic learn`, "
                    "from --learn-config). Writes STEM_mask.png, STEM_overlay.png, STEM_attention.png per image, "
                    "pattern.safetensors (w* + K/V, for `clic match --matcher`) and concept.safetensors.")
    p.add_argument("--image", action="append", required=True,
                   help="an image of the object with the pattern (repeat: at least 2, all of the same size)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-learn", action="store_true", help="only find the masks; no in-context learning")
    p.add_argument("--learn-config", metavar="FILE", default=None,
                   help="YAML or JSON file of `clic learn` options for the in-context learning, e.g. "
                        "'{recipe: official, steps: 300}' (default: the paper recipe; its object class is "
                        "--object-class)")
    add_quiet_option(p)
    add_model_options(p, DEFAULT_MODEL)
    add_config_options(p, DiscoverConfig, skip=("learn_concept",))
    add_config_options(p, MaskConfig)
    p.set_defaults(func=run)


def run(args) -> None:
    # 1. Check every input before the model loads.
    cfg = DiscoverConfig(**config_values(args, DiscoverConfig), **({"learn_concept": False} if args.no_learn else {}))
    mask_cfg = MaskConfig(**config_values(args, MaskConfig))
    cfg.check()
    mask_cfg.check()
    learn_cfg = (learn_config_file(args.learn_config, object_class=cfg.object_class) if args.learn_config
                 else learn_config(object_class=cfg.object_class))
    learn_cfg.check(1)
    paths = list(args.image)
    if len(paths) < 2:
        raise InputError(f"discover needs at least 2 images that share the pattern, got {len(paths)}")
    sizes = image_sizes(paths)
    if len(set(sizes)) > 1:
        listing = ", ".join(f"{Path(p).name} {w}x{h}" for p, (w, h) in zip(paths, sizes))
        raise InputError(f"the images must all have the same size ({listing}); crop or resize them first")
    out_dir = output_folder(args.out, stem_names(output_names(paths)) + ["pattern.safetensors", "concept.safetensors"],
                            {"--image": paths, "--learn-config": [args.learn_config]})

    # 2. Discovery (and in-context learning); nothing is written before it all succeeded, then all at once.
    with exclusive(out_dir):
        backbone = load_backbone(args.model or DEFAULT_MODEL, args.device, args.dtype)
        size = backbone.resolution
        images = [load_image(p, size) for p in paths]
        result = discover(backbone, images, cfg, mask_cfg, learn_cfg, progress=not args.quiet)
        files = {}
        for stem, image, mask, attention in zip(output_names(paths), images, result.masks, result.maps):
            files.update(mask_files(stem, image, mask, attention, sizes[0]))
        files.update(grid_file(output_names(paths), images, result.masks, result.maps))
        files["pattern.safetensors"] = result.matcher.save
        if result.concept is not None:
            files["concept.safetensors"] = result.concept.save
        write_folder(out_dir, files, show=False)
    matcher_path = out_dir / "pattern.safetensors"
    print(f"{matcher_path}  token={result.matcher.tokens[0]}  (w* + K/V: clic match --matcher {matcher_path})")
    if result.concept is not None:
        print(f"{out_dir / 'concept.safetensors'}  tokens={' '.join(result.concept.tokens)}")
    for name in files:
        if name.endswith(".png"):
            print(out_dir / name)
