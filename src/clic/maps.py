"""CA(token, x_t) on a given image: noise its latent to a few timesteps, run the UNet, average the token's
cross-attention maps. Used for previews after learning and for RoI matching."""

from __future__ import annotations

import torch
from PIL import Image

from .attention import capture_token_maps, cross_attention_layers
from .concept import Concept, applied_concept
from .imaging import grid, heat_overlay, mask_overlay, to_pil
from .tokens import token_positions


@torch.no_grad()
def token_attention_maps(backbone, latents: torch.Tensor, prompt: str, tokens: list[str],
                         timesteps=(200, 400, 600), blocks=("up",), seed: int = 0,
                         size: tuple[int, int] | None = None) -> torch.Tensor:
    """Maps ``(n_tokens, h, w)`` of ``tokens`` in ``prompt`` on ``latents (1, C, h, w)``, averaged over timesteps."""
    scheduler = backbone.training_scheduler()
    ids = backbone.tokenize(prompt)
    token_ids = backbone.tokenizer.convert_tokens_to_ids(list(tokens))
    pos = token_positions(ids, token_ids, prompt)
    text = backbone.encode_text(ids).to(backbone.unet.dtype)
    generator = torch.Generator().manual_seed(seed)
    hw = tuple(latents.shape[-2:])
    layers = cross_attention_layers(backbone.unet, blocks)
    out = []
    for t in timesteps:
        eps = torch.randn(latents.shape, generator=generator).to(latents.device)
        t_ = torch.tensor([int(t)], device=latents.device)
        x_t = scheduler.add_noise(latents, eps, t_)
        with capture_token_maps(backbone.unet, pos, layers, hw, size) as capture:
            backbone.unet(x_t.to(backbone.unet.dtype), t_, **text.unet_kwargs())
            out.append(capture.maps()[0].float())
    return torch.stack(out).mean(0)


def learning_preview(backbone, concept: Concept, images: list[torch.Tensor], masks: list[torch.Tensor],
                     seed: int = 0) -> dict[str, Image.Image]:
    """source | mask | CA(v*) overlay per source image and token, as ``{file name: image}``: ``mask_<i>_<j>.png``,
    ``attention_<i>_<j>.png`` and ``grid.png`` (the concept is applied for the call)."""
    cfg = concept.meta.get("config", {})
    out, tiles, labels = {}, [], []
    with applied_concept(backbone, concept):
        for i, (image, mask) in enumerate(zip(images, masks)):
            latents = backbone.encode_image(image[None])
            maps = token_attention_maps(backbone, latents, concept.meta["prompt"], concept.tokens, seed=seed,
                                        blocks=tuple(cfg.get("attn_blocks", ("up",))))
            for j, token in enumerate(concept.tokens):
                overlay, mask_img = heat_overlay(image, maps[j]), mask_overlay(image, mask[j])
                out[f"mask_{i}_{j}.png"], out[f"attention_{i}_{j}.png"] = mask_img, overlay
                tiles += [to_pil(image), mask_img, overlay]
                labels += [f"source {i}", f"mask {token}", f"CA({token})"]
    out["grid.png"] = grid(tiles, rows=len(tiles) // 3, labels=labels, cell=max(128, images[0].shape[-1]))
    return out
