"""Cross-attention machinery: Custom-Diffusion trainable K/V and the token maps CA(v*, x_t) of eq. 1 and 7.

One processor class, :class:`ClicCrossAttnProcessor`, is installed on the UNet's cross-attention layers
(``attn2``); self-attention keeps diffusers' stock SDPA processor. The processor

(a) optionally holds trainable fp32 copies of ``to_k``/``to_v`` (Custom Diffusion) and of ``to_q``/``to_out``
    (the official CLiC code's ``train_q_out=True``), and
(b) when a :class:`TokenMapCapture` is attached, records, differentiably, the attention probabilities of a few
    token columns: the softmax of the fp32 logits, of which only those columns are kept; the attention *output*
    always comes from ``scaled_dot_product_attention`` (:meth:`ClicCrossAttnProcessor.attend`).

Maps flow back through the capture object owned by the caller (:func:`capture_token_maps`), never through a
global store; processors swapped for a while are put back by :func:`restored_processors`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

BLOCKS = ("down", "mid", "up")


def _linear_copy(layer: nn.Linear) -> nn.Linear:
    """An fp32 trainable copy of a frozen linear layer (trainable parameters stay fp32 under half-precision UNets)."""
    copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=torch.float32)
    with torch.no_grad():
        copy.weight.copy_(layer.weight.float())
        if layer.bias is not None:
            copy.bias.copy_(layer.bias.float())
    return copy


def _apply(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` in its own dtype and return the input's dtype."""
    return layer(x.to(layer.weight.dtype)).to(x.dtype)


class ClicCrossAttnProcessor(nn.Module):
    """Cross-attention processor with optional trained K/V (and Q/out) and token-map capture.

    Args:
        attn: the diffusers ``Attention`` module the processor serves (its weights are copied, never changed).
        train_kv: hold trainable copies of ``to_k`` and ``to_v`` (Custom Diffusion).
        train_q_out: also hold trainable copies of ``to_q`` and ``to_out[0]`` (official CLiC code).

    A subclass may compute the attention output its own way by overriding :meth:`attend`.
    """

    def __init__(self, attn=None, train_kv: bool = False, train_q_out: bool = False):
        super().__init__()
        self.train_kv = train_kv
        self.train_q_out = train_q_out
        self.to_k = _linear_copy(attn.to_k) if train_kv else None
        self.to_v = _linear_copy(attn.to_v) if train_kv else None
        self.to_q = _linear_copy(attn.to_q) if train_q_out else None
        self.to_out = _linear_copy(attn.to_out[0]) if train_q_out else None
        self.name = ""
        self.start_token_grad = True     # see start_token_detached()
        self.capture: TokenMapCapture | None = None
        self.kv_cache: dict[int, tuple] | None = None     # see text_kv_cached()

    def trained_linears(self) -> dict[str, nn.Linear]:
        return {k: m for k, m in (("to_k", self.to_k), ("to_v", self.to_v), ("to_q", self.to_q),
                                  ("to_out.0", self.to_out)) if m is not None}

    def _key_value(self, attn, encoder_hidden_states: torch.Tensor, dtype: torch.dtype, norm: bool):
        if norm:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if self.to_k is not None:
            key, value = _apply(self.to_k, encoder_hidden_states), _apply(self.to_v, encoder_hidden_states)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        return key.to(dtype), value.to(dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = _apply(self.to_q, hidden_states) if self.to_q is not None else attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            key, value = self._key_value(attn, hidden_states, query.dtype, norm=False)
        elif self.kv_cache is None:
            key, value = self._key_value(attn, encoder_hidden_states, query.dtype, norm=attn.norm_cross)
        else:
            # the same tensor object, unchanged since (its version counter counts in-place writes)
            stamp = (encoder_hidden_states, encoder_hidden_states._version)
            cached = self.kv_cache.get(id(encoder_hidden_states))
            if cached is not None and cached[0] is stamp[0] and cached[1] == stamp[1]:
                key, value = cached[2], cached[3]
            else:
                key, value = self._key_value(attn, encoder_hidden_states, query.dtype, norm=attn.norm_cross)
                if len(self.kv_cache) >= 4:                   # a few prompts' tensors at a time (CFG, guidance)
                    self.kv_cache.pop(next(iter(self.kv_cache)))
                self.kv_cache[id(encoder_hidden_states)] = (*stamp, key, value)
        if not self.start_token_grad and encoder_hidden_states is not None:
            # the official code's: the start token's key and value give the trained K/V no gradient
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], 1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], 1)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])

        if self.capture is not None:
            self.capture.record(self.name, query, key, attn.scale)

        out = self.attend(query, key, value, attention_mask, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        out = _apply(self.to_out, out) if self.to_out is not None else attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:     # SD's is 1: no kernel (and no backward one) for nothing
            out = out / attn.rescale_output_factor
        return out


    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax(Q K^T * scale + mask) V for ``(B, heads, N, d)`` queries, by SDPA."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)


# ------------------------------------------------------------------------------------------------ layers


def cross_attention_layers(unet, blocks: Iterable[str] = ("up",), factor: int | None = None) -> list[str]:
    """Names (keys of ``unet.attn_processors``) of the cross-attention layers in the given UNet blocks.

    Args:
        blocks: any of ``"down"``, ``"mid"``, ``"up"``; the paper's l_att uses the up (decoder) blocks.
        factor: keep only layers whose feature map is the latent downsampled by this factor
            (e.g. 4 for Break-A-Scene's 16x16 maps of a 64x64 latent).
    """
    blocks = tuple(blocks)
    unknown = set(blocks) - set(BLOCKS)
    if unknown:
        raise ValueError(f"unknown UNet block(s) {sorted(unknown)}; use {BLOCKS}")
    n_levels = len(unet.config.block_out_channels)
    out = []
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        kind = name.split(".")[0].split("_")[0]          # down_blocks | mid_block | up_blocks
        if kind not in blocks:
            continue
        if factor is not None:
            if kind == "mid":
                level = n_levels - 1
            else:
                index = int(name.split(".")[1])
                level = index if kind == "down" else n_levels - 1 - index
            if 2 ** level != factor:
                continue
        out.append(name)
    return out


def install_processors(unet, train_kv: bool = True, train_q_out: bool = False, layers: Sequence[str] | None = None,
                       processor_class: type[ClicCrossAttnProcessor] = ClicCrossAttnProcessor
                       ) -> dict[str, ClicCrossAttnProcessor]:
    """Put a :class:`ClicCrossAttnProcessor` (or ``processor_class``) on every cross-attention layer; self-attention
    is left as it is.

    ``layers`` limits which cross-attention layers get trainable copies (default: all 16 in SD1.x, as Custom
    Diffusion); the others get a plain (non-trainable) processor so that maps can still be captured there.
    Returns ``{layer name: processor}`` for the cross-attention layers.
    """
    trainable = set(layers) if layers is not None else None
    modules = dict(unet.named_modules())
    processors = dict(unet.attn_processors)
    clic_procs = {}
    for name in processors:
        if ".attn2." not in name:
            continue
        attn = modules[name[: -len(".processor")]]
        train = trainable is None or name in trainable
        proc = processor_class(attn, train_kv=train_kv and train, train_q_out=train_q_out and train)
        proc.name = name
        processors[name] = clic_procs[name] = proc
    unet.set_attn_processor(processors)
    return clic_procs


def clic_processors(unet) -> dict[str, ClicCrossAttnProcessor]:
    return {n: p for n, p in unet.attn_processors.items() if isinstance(p, ClicCrossAttnProcessor)}


@contextlib.contextmanager
def text_kv_cached(unet, enabled: bool = True) -> Iterator[None]:
    """Inside, each :class:`ClicCrossAttnProcessor` of ``unet`` computes the keys and values of a text-embedding
    tensor once and reuses them whenever the same tensor object comes again. A denoising loop passes the same prompt
    embeddings at every step, so this saves each cross-attention layer its K/V projections (and their casts around
    the fp32 trained copies) at every step after the first: the same numbers, fewer kernels for the host to launch.
    Only for frozen weights (sampling, never learning); off under ``torch.compile``, whose graphs hold no cache."""
    procs = list(clic_processors(unet).values()) if enabled else []
    for proc in procs:
        proc.kv_cache = {}
    try:
        yield
    finally:
        for proc in procs:
            proc.kv_cache = None


@contextlib.contextmanager
def start_token_detached(processors: Iterable[ClicCrossAttnProcessor], enabled: bool = True) -> Iterator[None]:
    """Inside, the start-of-text token's key and value rows give the trained K/V no gradient, as in the official
    code's processor (the same forward values; only the K/V gradients lose that token's terms). The start token's
    text embedding does not depend on v* (CLIP's attention is causal), so v*'s gradient is the same either way."""
    procs = list(processors) if enabled else []
    for proc in procs:
        proc.start_token_grad = False
    try:
        yield
    finally:
        for proc in procs:
            proc.start_token_grad = True


@contextlib.contextmanager
def attention_outputs_detached(unet, enabled: bool = True) -> Iterator[None]:
    """Inside, the output of every attention layer of ``unet`` (self- and cross-attention) is detached: a gradient
    with respect to the UNet input then flows through the convolutions, norms, feed-forward layers and residual
    paths, and into the maps CA(v*, x_t) through their queries, but not through any attention output. This is what
    the official transfer script's guidance gradient is: its processors reshape the attention output under
    ``torch.no_grad()``. Forward values are unchanged."""
    hooks = [m.register_forward_hook(lambda module, args, out: out.detach())
             for m in unet.modules() if isinstance(m, Attention)] if enabled else []
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def restored_processors(unet) -> Iterator[dict]:
    """Whatever the body installs on ``unet``, its attention processors are the same objects afterwards (as
    diffusers' PAG pipelines put ``unet.attn_processors`` back). Yields the processors found."""
    saved = dict(unet.attn_processors)
    try:
        yield dict(saved)
    finally:
        unet.set_attn_processor(saved)


@contextlib.contextmanager
def swapped_processors(unet, processors: dict) -> Iterator[None]:
    """Temporarily run ``unet`` with ``processors``; the previous processors are restored on exit."""
    with restored_processors(unet):
        unet.set_attn_processor(dict(processors))
        yield


# ------------------------------------------------------------------------------------------------ capture


def _map_shape(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a flattened feature map of ``n_pixels`` on a UNet level of a latent of size ``latent_hw``."""
    h, w = latent_hw
    for level in range(8):
        if h * w == n_pixels:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"cannot place a map of {n_pixels} pixels on a {latent_hw} latent")


class TokenMapCapture:
    """Collects CA(token, x_t): per layer, the softmax column of chosen tokens, averaged over heads,
    resized (bilinear) to ``size`` and, on :meth:`maps`, averaged over layers.

    Args:
        token_index: LongTensor ``(batch, n_tokens)``, the positions of the tokens in each prompt of the batch
            (prompts may differ, e.g. the context and RoI branches of a learning step).
        latent_hw: spatial size of the UNet input latent (maps are placed on it by their pixel count).
        size: output resolution of the maps (default: the latent size).
    """

    def __init__(self, token_index: torch.Tensor, latent_hw: tuple[int, int], size: tuple[int, int] | None = None):
        self.token_index = token_index
        self.latent_hw = tuple(latent_hw)
        self.size = tuple(size) if size is not None else self.latent_hw
        self._maps: dict[str, torch.Tensor] = {}

    def record(self, name: str, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        # logits in fp32 even under a half-precision UNet: guidance and l_att need accurate small probabilities
        # cast and made contiguous in one copy each (a strided fp32 copy would be copied again for the matmul)
        fp32 = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
        logits = (query.to(**fp32) @ key.to(**fp32).transpose(-1, -2)) * scale       # (B, H, N, L)
        index = self.token_index.to(logits.device)
        if index.shape[0] != logits.shape[0]:                                      # one index row for all
            index = index.expand(logits.shape[0], -1)
        # the whole softmax (one kernel, one backward kernel) and then its token columns: fewer kernels than the
        # columns' exp(logit - logsumexp), whose logsumexp alone is ~9 kernels, for the same numbers
        probs = logits.softmax(-1).gather(-1, index[:, None, None, :].expand(-1, logits.shape[1], logits.shape[2], -1))
        probs = probs.mean(1)                                                       # (B, N, T)
        h, w = _map_shape(probs.shape[1], self.latent_hw)
        maps = probs.transpose(1, 2).reshape(probs.shape[0], -1, h, w)            # (B, T, h, w)
        if (h, w) != self.size:
            maps = F.interpolate(maps, size=self.size, mode="bilinear", align_corners=False)
        self._maps[name] = maps

    @property
    def layer_maps(self) -> dict[str, torch.Tensor]:
        return dict(self._maps)

    def maps(self) -> torch.Tensor:
        """CA(token, x_t): ``(batch, n_tokens, *size)`` averaged over the captured layers."""
        if not self._maps:
            raise RuntimeError("no attention map was captured: was the UNet run inside capture_token_maps()?")
        return torch.stack(list(self._maps.values())).mean(0)

    def clear(self) -> None:
        self._maps.clear()


@contextlib.contextmanager
def capture_token_maps(unet, token_index: torch.Tensor | None, layers: Sequence[str], latent_hw: tuple[int, int],
                       size: tuple[int, int] | None = None) -> Iterator[TokenMapCapture]:
    """Attach a :class:`TokenMapCapture` to ``layers`` (which must carry :class:`ClicCrossAttnProcessor`)."""
    # on the UNet's device: a host tensor read inside the UNet would keep a compiled step off CUDA graphs
    if token_index is not None:                   # None: nothing captured (no layers)
        token_index = token_index.to(unet.device)
    capture = TokenMapCapture(token_index, latent_hw, size)
    attached = []
    try:
        for name in layers:   # each layer looked up by its name (``unet.attn_processors`` walks every module)
            proc = unet.get_submodule(name.removesuffix(".processor")).processor
            if not isinstance(proc, ClicCrossAttnProcessor):
                raise TypeError(f"{name} has no ClicCrossAttnProcessor; call install_processors() first")
            proc.capture = capture
            attached.append(proc)
        yield capture
    finally:
        for proc in attached:
            proc.capture = None
