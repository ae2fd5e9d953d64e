"""``clic export-diffusers``: a concept as the Custom Diffusion + textual inversion files of stock diffusers."""

from __future__ import annotations

from ..concept import EXPORT_EMBEDS, EXPORT_WEIGHTS, Concept, export_diffusers
from ..errors import ConceptFileError
from ..fileio import staged_folder
from ..models import load_backbone
from .options import add_model_options
from .validate import exclusive, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser("export-diffusers", help="write Custom Diffusion + textual inversion files for a stock "
                                                "diffusers StableDiffusionPipeline")
    p.add_argument("concept")
    p.add_argument("out", help="output folder")
    add_model_options(p, "the concept's base model")
    p.set_defaults(func=run)


def run(args) -> None:
    concept = Concept.load(args.concept)
    out = output_folder(args.out, [EXPORT_WEIGHTS, EXPORT_EMBEDS, "clic_concept.json"], {"concept": [args.concept]})
    with exclusive(out):
        backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
        missing = sorted(set(concept.layers) - set(backbone.unet.attn_processors))
        if missing:
            raise ConceptFileError(f"{args.concept}: layer {missing[0]} does not exist in {backbone.model_id}")
        with staged_folder(out) as tmp:           # the three files together, or none of them
            export_diffusers(concept, backbone, tmp)
    print(out)
