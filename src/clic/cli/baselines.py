"""``clic baselines``: the paper's baselines (sec. 4.2) under CLiC's interface: their recipes, and the transfer and
generation of any concept the way its method does (``clic learn --recipe`` and ``clic realfill learn`` learn them)."""

from __future__ import annotations

from .. import baselines
from ..concept import Concept
from ..config import RECIPES, GenerateConfig, TransferConfig
from . import generate, realfill, transfer
from .options import add_config_options, add_model_options, config_values


def register(sub, argv) -> None:
    p = sub.add_parser("baselines", help="the recipes (CLiC's and the paper's baselines'); transfer or generate "
                                         "with any recipe's concept the way its method does")
    actions = p.add_subparsers(dest="baselines_command", required=True, metavar="ACTION")

    q = actions.add_parser("list", help="the recipes, what they do and their base models")
    q.set_defaults(func=run_list)

    q = actions.add_parser("transfer", help="transfer a concept the way its method does",
                           description="CLiC: blended editing with guidance; Custom Diffusion and Break-A-Scene: the "
                                       "same blended editing with --eta 0; RealFill: inpaint the target mask (DDPM 200 "
                                       "steps, CFG 1 unless given) and paste. The options' defaults shown are CLiC's.")
    q.add_argument("concept", help="concept file made by `clic learn` or `clic realfill learn`")
    transfer.add_target_options(q)
    add_model_options(q, "the concept's base model")
    add_config_options(q, TransferConfig)
    q.set_defaults(func=run_transfer)

    q = actions.add_parser("generate", help="generate objects carrying a concept the way its method does",
                           description="CLiC: two-stage sampling (t_s = 5); baselines: plain sampling with the concept "
                                       "(t_s = 0) unless --base-steps is given.")
    generate.add_concept_options(q)
    add_config_options(q, GenerateConfig)
    q.set_defaults(func=run_generate)


def run_list(args) -> None:
    for r in RECIPES.values():
        print(f"{r.name:18s} {r.title}: {r.summary}\n{'':18s} base model: {r.default_model}")


def _method(args) -> str:
    return baselines.method_recipe(Concept.load(args.concept))


def run_transfer(args) -> None:
    method = _method(args)
    if method == "realfill":
        realfill.run_transfer(args, config_values(args, TransferConfig))
    else:
        transfer.run(args, recipe=method, label=f"{method} seed")


def run_generate(args) -> None:
    method = _method(args)
    generate.run(args, recipe=method, generator=baselines.generate_concept)
