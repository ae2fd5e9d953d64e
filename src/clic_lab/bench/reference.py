"""The reference path of the speed bench: the same learning as :func:`clic.learn.learn`, computed the way the
official CLiC code computes it (REFERENCE.md), so that ``clic bench --reference`` can say how much faster the fast
path is for the same losses (``tests/test_learn.py`` checks they agree):

- an explicit softmax in every attention layer, self-attention included (no SDPA);
- the source image VAE-encoded and the prompts text-encoded at every step (no caching);
- the context and RoI branches as separate UNet passes (not one batch);
- gradients computed for the whole UNet (then discarded), not only for the trained copies;
- the loss values read back at every step; no CUDA graphs, no fused projections.

It reuses the loop's pieces (:func:`clic.learn.prepare_sources`, :func:`~clic.learn.draw`,
:func:`~clic.learn.noised_batch`, :func:`~clic.learn.step_losses`) and, like the loop, leaves the backbone as found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Callable

import torch
from diffusers.models.attention_processor import AttnProcessor

from clic.attention import ClicCrossAttnProcessor, capture_token_maps, start_token_detached
from clic.concept import Concept, applied_concept
from clic.config import LearnConfig
from clic.draws import SeededDraws
from clic.learn import (TERMS, LearnResult, check_inputs, config_json, draw, initial_vectors, make_optimizer,
                        noised_batch, prepare_sources, step_losses, token_warmup, with_attention_level)
from clic.runs import Run


class ExplicitSoftmaxCrossAttn(ClicCrossAttnProcessor):
    """:class:`clic.attention.ClicCrossAttnProcessor` whose output is softmax(Q K^T * scale + mask) V computed
    explicitly, as the official code does (the same numbers as SDPA up to float rounding)."""

    def attend(self, query, key, value, attention_mask, scale):
        scores = (query @ key.transpose(-1, -2)) * scale
        if attention_mask is not None:
            scores = scores + attention_mask
        return scores.softmax(-1) @ value


@contextlib.contextmanager
def official_computation(unet) -> Iterator[None]:
    """Self-attention with an explicit softmax (diffusers' ``AttnProcessor``) and gradients for every UNet weight, for
    the body (inside :func:`clic.concept.applied_concept`, which puts processors and flags back)."""
    unet.set_attn_processor({n: (p if ".attn2." in n else AttnProcessor()) for n, p in unet.attn_processors.items()})
    base = [p for n, p in unet.named_parameters() if ".processor." not in n]
    for p in base:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in base:
            p.grad = None


def learn_reference(backbone, images: list[torch.Tensor], masks: list[torch.Tensor], cfg: LearnConfig,
                    progress: bool = False, callback: Callable[[int, dict], None] | None = None) -> LearnResult:
    """:func:`clic.learn.learn` computed as the official code computes it (see the module docstring)."""
    n_tok = check_inputs(images, masks, cfg)
    cfg = replace(with_attention_level(backbone, cfg), cuda_graphs="off", sync_every=1)
    start = Concept.untrained(cfg.tokens(n_tok), initial_vectors(backbone, cfg, n_tok))
    unet = backbone.unet
    with applied_concept(backbone, start, train=cfg.train, train_token=cfg.train_token,
                         processor_class=ExplicitSoftmaxCrossAttn) as applied, official_computation(unet), \
            start_token_detached(applied.processors.values(), not cfg.start_token_grad):
        src = prepare_sources(backbone, images, masks, cfg, applied)
        params, optimizer = make_optimizer(applied, cfg, backbone.device)
        draws = SeededDraws(cfg.seed)
        run = Run(None, None, False, params, optimizer, draws.generator, config_json(cfg), cfg.steps, 0, TERMS, 1,
                  "learning v* (reference)", progress, callback)
        with run:
            for step in run.steps():
                token_warmup(optimizer, applied, cfg, step, run.start)
                noise = draw(src, cfg, draws, step)
                k = noise.k
                with torch.no_grad():                   # no caching: the (flipped) source encoded every step
                    pixels = src.pixels[k:k + 1].flip(-1) if noise.flip else src.pixels[k:k + 1]
                    x0 = (backbone.encode_image(pixels) if noise.z is None else
                          backbone.posterior_sample(*backbone.encode_posterior(pixels), noise.z))
                batch = noised_batch(backbone, src, cfg, noise, x0)
                text = backbone.encode_text(src.ids(noise))             # nor the prompts
                preds, capture = [], None
                for i in range(batch.x_in.shape[0]):    # one UNet pass per branch, the maps from the context pass
                    layers = src.layers if cfg.use_att and i == 0 else []
                    with capture_token_maps(unet, src.positions(noise)[i:i + 1], layers, src.hw) as cap:
                        preds.append(unet(batch.x_in[i:i + 1], batch.t,
                                          **text[i:i + 1].to(src.text_dtype).unet_kwargs()).sample.float())
                    capture = capture or cap
                losses = step_losses(torch.cat(preds), capture.maps if cfg.use_att else None, batch, src, cfg)
                losses[0].backward()
                run.add(step, torch.stack(losses).detach().float(), t=int(noise.t))
                ready = run.read()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for p in unet.parameters():             # the whole UNet's gradients, discarded
                    p.grad = None
                run.report(ready)
        for p in params:
            p.requires_grad_(False)
        concept = Concept.from_training(
            backbone, start.tokens, applied.token_rows, applied.processors, method=cfg.recipe,
            prompt=cfg.context_prompt(n_tok), roi_prompt=cfg.roi_prompt, object_class=cfg.object_class,
            initializer=cfg.initializer, config=asdict(cfg), final_losses=run.history[-1] if run.history else {})
    return LearnResult(concept, run.history, applied.processors)
