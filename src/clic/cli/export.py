"""``clic export-diffusers``: a concept as the Custom Diffusion + textual inversion files of stock diffusers."""

from __future__ import annotations

from ..concept import Concept, export_diffusers
from ..models import load_backbone
from .options import add_model_options


def register(sub, argv) -> None:
    p = sub.add_parser("export-diffusers", help="write Custom Diffusion + textual inversion files for a stock "
                                                "diffusers StableDiffusionPipeline")
    p.add_argument("concept")
    p.add_argument("out", help="output folder")
    add_model_options(p, "the concept's base model")
    p.set_defaults(func=run)


def run(args) -> None:
    concept = Concept.load(args.concept)
    backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
    print(export_diffusers(concept, backbone, args.out))
