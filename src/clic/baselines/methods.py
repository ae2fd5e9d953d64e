"""The four methods of the paper's comparison (sec. 4.2) behind one interface: configs, learning, transfer and
generation dispatch on the method name (or, for a learned concept, on the ``method`` in its metadata).

=================  ================================  ===============================  ============================
method             learning                          transfer                         generation
=================  ================================  ===============================  ============================
clic               :func:`clic.learn.learn`,          :func:`clic.transfer.transfer`    :func:`clic.generate.generate`
                   recipe ``paper`` (or ``official``)  (blending + guidance, eta 1)     (two stages, t_s = 5)
custom-diffusion   ``learn``, recipe                  ``transfer`` with eta = 0         ``generate`` with t_s = 0
                   ``custom-diffusion``
break-a-scene      ``learn``, recipe ``break-a-scene``  ``transfer`` with eta = 0         ``generate`` with t_s = 0
realfill           :func:`~clic.baselines.realfill.    :func:`~clic.baselines.realfill.  :func:`~clic.baselines.
                   learn_realfill` (inpainting model)  inpaint` + paste                 realfill.generate_inpainting`
=================  ================================  ===============================  ============================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

from ..errors import InputError
from . import realfill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    inpainting: bool = False          # learns and transfers on an inpainting base model

    @property
    def default_model(self) -> str:
        from ..models import DEFAULT_MODEL

        return realfill.DEFAULT_INPAINT_MODEL if self.inpainting else DEFAULT_MODEL


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("clic", "CLiC (paper): v* + cross-attention K/V with l_con + 0.5 l_att + 0.5 l_RoI; transfer by blended "
                   "editing with cross-attention guidance"),
    Method("custom-diffusion", "Custom Diffusion: v* + cross-attention K/V, unmasked diffusion loss, 'a OBJECT with "
                               "<v*> style'; transfer by blended editing, no guidance"),
    Method("break-a-scene", "Break-A-Scene: token-only phase, then v* + cross-attention K/V with the masked loss and "
                            "its attention loss, 'a photo of <v*>'; transfer by blended latent diffusion"),
    Method("realfill", "RealFill (paper's adaptation): v* + cross-attention K/V of an inpainting model under random "
                       "masks, loss on M_s, 'a photo of <v*>'; transfer by inpainting the target mask + paste",
           inpainting=True),
)}
BASELINE_RECIPES = ("custom-diffusion", "break-a-scene")   # baselines that are recipes of clic.learn


def check_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def default_model(method: str) -> str:
    return check_method(method).default_model


def method_of(concept) -> str:
    """The method a concept file was learned with (its ``method`` metadata; CLiC's recipes are "clic")."""
    method = concept.meta.get("method", "paper")
    return "clic" if method in ("paper", "official") else method


def _resolve(method: str, recipe: str | None) -> tuple[str, str | None]:
    """(method, learn recipe); ``--recipe custom-diffusion`` alone still means that baseline (older CLI spelling)."""
    check_method(method)
    if method == "clic" and recipe in BASELINE_RECIPES:
        return recipe, recipe
    if method == "clic":
        return method, recipe or "paper"
    if recipe not in (None, method):
        raise InputError(f"--recipe {recipe} does not apply to --method {method}")
    return method, (method if method in BASELINE_RECIPES else None)


# ---------------------------------------------------------------------------------------------- learning


def learn_config(method: str = "clic", recipe: str | None = None, **overrides):
    """The learning config of ``method`` (:class:`clic.learn.LearnConfig` or
    :class:`~clic.baselines.realfill.RealFillConfig`) with explicit overrides (None values ignored).

    Break-A-Scene: when ``steps`` is given without ``token_warmup_steps``, the token-only phase is half of the steps,
    as in its recipe (400 of 800).
    """
    from ..learn import LearnConfig, make_config

    method, recipe = _resolve(method, recipe)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if method == "realfill":
        return realfill.make_config(**overrides)
    names = {f.name for f in fields(LearnConfig)}
    only_realfill = sorted((set(overrides) - names) & {f.name for f in fields(realfill.RealFillConfig)})
    if only_realfill:
        raise InputError(f"{', '.join('--' + n.replace('_', '-') for n in only_realfill)} applies to --method "
                         "realfill only")
    if method == "break-a-scene" and "steps" in overrides and "token_warmup_steps" not in overrides:
        overrides["token_warmup_steps"] = overrides["steps"] // 2
    return make_config(recipe, **overrides)


def _break_a_scene_level(backbone, cfg):
    """Break-A-Scene's l_att uses the 16x16 maps of a 64x64 latent (factor 4). A UNet without cross-attention at
    that factor (e.g. the tiny test models) uses its coarsest cross-attention level instead."""
    from ..attention import cross_attention_layers

    if cfg.use_att and not cross_attention_layers(backbone.unet, cfg.attn_blocks, cfg.attn_factor):
        levels = len(backbone.unet.config.block_out_channels)
        factors = [2**k for k in range(levels) if cross_attention_layers(backbone.unet, cfg.attn_blocks, 2**k)]
        if factors:
            log.warning("no cross-attention at latent/%s in %s: Break-A-Scene's l_att uses latent/%s instead",
                        cfg.attn_factor, backbone.model_id, factors[-1])
            return replace(cfg, attn_factor=factors[-1])
    return cfg


def learn_concept(backbone, images, masks, cfg, **kwargs):
    """Learn with whichever method ``cfg`` belongs to; same arguments as :func:`clic.learn.learn`
    (``out_path``, ``log_path``, ``resume``, ``progress``, ``callback``). Returns an object with ``concept``,
    ``history`` and ``processors``."""
    from ..learn import learn

    if isinstance(cfg, realfill.RealFillConfig):
        return realfill.learn_realfill(backbone, images, masks, cfg, **kwargs)
    if cfg.recipe == "break-a-scene":
        cfg = _break_a_scene_level(backbone, cfg)
    return learn(backbone, images, masks, cfg, **kwargs)


# ---------------------------------------------------------------------------------------------- transfer


def transfer_config(method: str = "clic", recipe: str | None = None, **overrides):
    """The transfer config of ``method``: :class:`clic.transfer.TransferConfig` (eta = 0 for Custom Diffusion and
    Break-A-Scene: blended editing without guidance) or :class:`~clic.baselines.realfill.InpaintConfig`."""
    from ..transfer import make_config

    check_method(method)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if method == "realfill":
        if recipe not in (None, "paper"):
            raise InputError(f"--recipe {recipe} does not apply to RealFill's transfer")
        return realfill.make_inpaint_config(**overrides)
    if method != "clic":
        if recipe not in (None, "paper"):
            raise InputError(f"--recipe {recipe} does not apply to {method}'s transfer")
        overrides = {"eta": 0.0, **overrides}
    return make_config(recipe or "paper", **overrides)


def transfer_concept(backbone, concept, target, mask, cfg=None, progress: bool = True, callback=None):
    """Transfer ``concept`` into ``mask`` of ``target`` the way its method does (see the module table). Returns a
    :class:`clic.transfer.TransferResult` or :class:`~clic.baselines.realfill.InpaintResult`; both have
    ``images``, ``decoded``, ``target``, ``mask``, ``attention`` ``(S, N, T, h, w)``, ``seeds``, ``prompt``."""
    from ..transfer import TransferConfig, transfer

    method = method_of(concept)
    cfg = cfg if cfg is not None else transfer_config(method)
    if method == "realfill":
        if not isinstance(cfg, realfill.InpaintConfig):
            raise InputError("a RealFill concept is transferred by inpainting: give an InpaintConfig "
                             "(clic.baselines.transfer_config('realfill'))")
        return realfill.inpaint(backbone, concept, target, mask, cfg, progress=progress, callback=callback)
    if not isinstance(cfg, TransferConfig):
        raise InputError(f"a {method} concept is transferred by blended editing: give a TransferConfig")
    return transfer(backbone, concept, target, mask, cfg, progress=progress, callback=callback)


# ---------------------------------------------------------------------------------------------- generation


def generate_config(method: str = "clic", **overrides):
    """:class:`clic.generate.GenerateConfig` of ``method``: the paper's two stages (t_s = 5) for CLiC, plain
    sampling with the concept (t_s = 0) for the baselines, whose recipes have no base stage."""
    from ..generate import GenerateConfig

    check_method(method)
    names = {f.name for f in fields(GenerateConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"unknown generation option(s) {sorted(unknown)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if method != "clic":
        values = {"base_steps": 0, **values}
    return replace(GenerateConfig(), **values)


def generate_concept(backbone, concept, cfg=None, progress: bool = True):
    from ..generate import generate

    method = method_of(concept)
    cfg = cfg if cfg is not None else generate_config(method)
    if method == "realfill":
        return realfill.generate_inpainting(backbone, concept, cfg, progress=progress)
    return generate(backbone, concept, cfg, progress=progress)
