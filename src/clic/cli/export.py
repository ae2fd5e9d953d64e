"""``clic export-diffusers``: a concept as the files of a stock diffusers pipeline (clic.stock)."""

from __future__ import annotations

from ..concept import Concept
from ..errors import ConceptFileError
from ..models import load_backbone
from ..stock import META, WEIGHTS, embedding_files, export_diffusers
from .options import add_model_options
from .validate import exclusive, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "export-diffusers", help="write a concept as textual-inversion + Custom Diffusion files for a stock diffusers "
                                 "pipeline",
        description="Writes learned_embeds*.safetensors (one file per token, for pipe.load_textual_inversion; SDXL: "
                    "one file with each text encoder's rows, clip_l and clip_g), "
                    "pytorch_custom_diffusion_weights.safetensors (the trained cross-attention weights in "
                    "unet.save_attn_procs's layout) and clic_concept.json. The README's 'In a stock diffusers "
                    "pipeline' shows how to load them with diffusers alone; clic.stock.load_concept(pipe, OUT) does "
                    "the same in one call.")
    p.add_argument("concept", help="concept file (.safetensors) made by `clic learn`")
    p.add_argument("out", help="output folder")
    add_model_options(p, "the concept's base model")
    p.set_defaults(func=run)


def run(args) -> None:
    concept = Concept.load(args.concept)
    names = [WEIGHTS, META, *embedding_files(concept.tokens), *embedding_files(concept.tokens, sdxl=True)]
    out = output_folder(args.out, names, {"concept": [args.concept]})
    with exclusive(out):
        backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
        missing = sorted(set(concept.layers) - set(backbone.unet.attn_processors))
        if missing:
            raise ConceptFileError(f"{args.concept}: layer {missing[0]} does not exist in {backbone.model_id}")
        export_diffusers(args.concept, out, backbone)   # all the files, or none of them
    print(out)
