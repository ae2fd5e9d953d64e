"""The paper's baselines (sec. 4.2) under CLiC's interface: same inputs (source image, source mask, object class;
target image, target mask), same concept file, same transfer and generation entry points.

Custom Diffusion and Break-A-Scene are recipes of CLiC's own loop (:data:`clic.config.RECIPES`:
``custom-diffusion``, ``break-a-scene``); RealFill has its own model and loop (:mod:`clic.baselines.realfill`).
A concept file records its recipe (``method`` in its metadata), and the functions here run each concept the way
its method does::

    cfg = clic.config.learn_config("break-a-scene", object_class="chair")
    concept = learn_concept(backbone, [image], [mask], cfg).concept
    result = transfer_concept(backbone, concept, target, target_mask)      # eta 0: blended editing, no guidance
    images = generate_concept(backbone, concept).images                    # plain sampling (t_s = 0)

Defaults follow each method's published recipe where the paper does not say otherwise. Deviations (details and
reasons in ``src/clic/baselines/README.md``):

==================  ==========================================  ==========================================
method              as the paper runs it / published recipe     here
==================  ==========================================  ==========================================
custom-diffusion    prior preservation (200 class images)       none (one source image, as CLiC; paper)
                    batch 2 x 250 steps, random-rescale aug.    batch 1 x 500 steps (same samples), h-flip only
break-a-scene       SD2.1, phase 2 trains full UNet + text enc  SD1.4, phase 2 trains v* + cross-attn K/V (paper)
                    prior preservation (100 images)             none
                    masks resized nearest; l_att at 16x16       bilinear (soft edge); maps upsampled to latent
                    new optimiser for phase 2                   one AdamW, state kept across phases
realfill            SD2-inpainting, LoRA on UNet + text enc.    SD1.x-inpainting, v* + cross-attn K/V (paper)
                    lr 2e-4 / 4e-5 (LoRA)                       1e-5 (full K/V matrices, Custom Diffusion's)
                    loss weight 0 in the target hole            loss weight = M_s (the concept region)
                    VAE posterior samples in training           posterior mean
==================  ==========================================  ==========================================
"""

from __future__ import annotations

from ..concept import Concept
from ..config import (GenerateConfig, InpaintConfig, LearnConfig, RealFillConfig, TransferConfig, generate_config,
                      recipe_named, transfer_config)
from ..errors import InputError
from ..generate import GenerateResult, generate
from ..learn import LearnResult, learn
from ..transfer import TransferResult, transfer
from .realfill import (InpaintResult, RealFillResult, generate_inpainting, inpaint, learn_realfill, random_masks,
                       realfill_loss)

__all__ = ["recipe_of", "learn_concept", "transfer_concept", "generate_concept", "learn_realfill", "inpaint",
           "generate_inpainting", "random_masks", "realfill_loss", "InpaintResult", "RealFillResult"]


def recipe_of(concept: Concept) -> str:
    """The recipe a concept file was learned with (its ``method`` metadata)."""
    return recipe_named(concept.meta.get("method", "paper")).name


def method_recipe(concept: Concept) -> str:
    """The recipe whose transfer and generation are the concept's method's: the paper's for CLiC's own concepts
    (paper or official recipe), the baseline's for a baseline's."""
    name = recipe_of(concept)
    return "paper" if name == "official" else name


def learn_concept(backbone, images, masks, cfg: LearnConfig | RealFillConfig, **kwargs) -> LearnResult | RealFillResult:
    """Learn with whichever loop ``cfg`` belongs to: :func:`clic.learn.learn`, or RealFill's own; same arguments
    (``out_path``, ``log_path``, ``resume``, ``progress``, ``callback``)."""
    if isinstance(cfg, RealFillConfig):
        return learn_realfill(backbone, images, masks, cfg, **kwargs)
    return learn(backbone, images, masks, cfg, **kwargs)


def transfer_concept(backbone, concept: Concept, target, mask, cfg: TransferConfig | InpaintConfig | None = None,
                     progress: bool = True, callback=None) -> TransferResult | InpaintResult:
    """Transfer ``concept`` into ``mask`` of ``target`` the way its method does (default: its recipe's transfer
    config): blended editing (:func:`clic.transfer.transfer`), or RealFill's inpainting. Both results have
    ``images``, ``decoded``, ``target``, ``mask``, ``attention`` ``(S, N, T, h, w)``, ``seeds``, ``prompt``."""
    name = method_recipe(concept)
    cfg = cfg if cfg is not None else transfer_config(name)
    if name == "realfill":
        if not isinstance(cfg, InpaintConfig):
            raise InputError("a RealFill concept is transferred by inpainting: give an InpaintConfig "
                             "(clic.config.transfer_config('realfill'))")
        return inpaint(backbone, concept, target, mask, cfg, progress=progress, callback=callback)
    if not isinstance(cfg, TransferConfig):
        raise InputError(f"a {name} concept is transferred by blended editing: give a TransferConfig")
    return transfer(backbone, concept, target, mask, cfg, progress=progress, callback=callback)


def generate_concept(backbone, concept: Concept, cfg: GenerateConfig | None = None,
                     progress: bool = True) -> GenerateResult:
    """Generate with ``concept`` the way its method does (default: its recipe's generation config)."""
    name = method_recipe(concept)
    cfg = cfg if cfg is not None else generate_config(name)
    if name == "realfill":
        return generate_inpainting(backbone, concept, cfg, progress=progress)
    return generate(backbone, concept, cfg, progress=progress)
