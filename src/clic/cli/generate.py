"""``clic generate``: new objects that carry a learned concept (paper sec. 4.1, two-stage sampling)."""

from __future__ import annotations

from ..concept import Concept
from ..config import LEARN_RECIPES, GenerateConfig, generate_config
from ..generate import generate
from ..imaging import grid, to_pil
from ..pipeline import ClicPipeline
from .options import (add_config_options, add_model_options, add_quiet_option, add_recipe_option, config_values,
                      peek_recipe, write_folder)
from .transfer import concept_and_model
from .validate import exclusive, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "generate", help="generate new objects that carry a learned concept (paper sec. 4.1)",
        description="Two-stage sampling: the first t_s steps (--base-steps, default 5) with the base model and "
                    "'a photo of an OBJECT', the rest with the concept and 'a photo of an OBJECT, with <v*> style'.")
    add_concept_options(p)
    add_recipe_option(p, LEARN_RECIPES, "generation")
    recipe = peek_recipe(argv)
    add_config_options(p, GenerateConfig, generate_config(recipe) if recipe in LEARN_RECIPES else None)
    p.set_defaults(func=run)


def add_concept_options(p) -> None:
    p.add_argument("concept", help="concept file (.safetensors) made by `clic learn`")
    p.add_argument("--out", required=True, help="output folder: seed<S>.png per seed and grid.png")
    add_quiet_option(p)
    add_model_options(p, "the concept's base model")


def image_files(result, size: int, rows: int = 1) -> dict:
    """``seed<S>.png`` per seed and ``grid.png``."""
    files = {f"seed{seed}.png": to_pil(result.images[k]) for k, seed in enumerate(result.seeds)}
    files["grid.png"] = grid(list(files.values()), rows=rows, labels=[f"seed {s}" for s in result.seeds],
                             cell=max(128, size))
    return files


def run(args, recipe: str | None = None, generator=generate) -> None:
    """``clic generate`` (and ``clic baselines generate``: ``recipe`` and ``generator`` are the concept's method's)."""
    cfg = generate_config(getattr(args, "recipe", None) or recipe or "paper", **config_values(args, GenerateConfig))
    cfg.check()
    out_dir = output_folder(args.out, [f"seed{s}.png" for s in cfg.seed_list()] + ["grid.png"],
                            {"concept": [args.concept]})
    concept = Concept.load(args.concept)
    with exclusive(out_dir):
        concept, backbone = concept_and_model(args, concept)
        if generator is generate:
            pipe = ClicPipeline.from_backbone(backbone, cfg.scheduler)
            pipe.set_progress_bar_config(disable=args.quiet)
            pipe.load_concept(concept)
            result = pipe.generate(config=cfg, output_type="pt").result
        else:                                    # a baseline's own sampling (RealFill: its inpainting model)
            result = generator(backbone, concept, cfg, progress=not args.quiet)
        rows = max(1, round(len(result.seeds) ** 0.5)) if generator is generate else 1
        write_folder(out_dir, image_files(result, backbone.resolution, rows))
