"""Attention machinery: captured token columns vs. a full-softmax reference, processors vs. stock diffusers."""

import pytest
import torch

from clic.attention import (ClicCrossAttnProcessor, capture_token_maps, cross_attention_layers, install_processors,
                            swapped_processors, text_kv_cached)
from clic_lab.bench.reference import ExplicitSoftmaxCrossAttn


def _full_softmax_maps(unet, x, t, text, token_index, layers, hw):
    """Reference: materialise every softmax map with explicit attention, pick the token columns afterwards. ``text``:
    the hidden states, or a TextConditioning (SDXL's carries the added conditioning)."""
    store = {}
    modules = dict(unet.named_modules())
    hooks = []
    for name in layers:
        attn = modules[name[: -len(".processor")]]

        def hook(mod, args, kwargs, out, name=name):
            hs = args[0]
            ehs = kwargs["encoder_hidden_states"]
            proc = mod.processor
            q = proc.to_q(hs) if getattr(proc, "to_q", None) is not None else mod.to_q(hs)
            k = proc.to_k(ehs) if getattr(proc, "to_k", None) is not None else mod.to_k(ehs)
            b, n, _ = q.shape
            h = mod.heads
            q = q.view(b, n, h, -1).transpose(1, 2)
            k = k.view(b, k.shape[1], h, -1).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) * mod.scale, dim=-1)       # (B, H, N, L) full maps
            cols = probs[..., token_index].mean(1)                                   # (B, N, T)
            side = int(round(n ** 0.5))
            m = cols.transpose(1, 2).reshape(b, -1, side, side)
            store[name] = torch.nn.functional.interpolate(m, size=hw, mode="bilinear", align_corners=False)

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        unet(x, t, **text.unet_kwargs()) if hasattr(text, "unet_kwargs") else unet(x, t, text)
    for h in hooks:
        h.remove()
    return torch.stack(list(store.values())).mean(0)


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("trained", [False, True])
def test_capture_equals_full_softmax_reference(backbone, explicit, trained):
    unet = backbone.unet
    install_processors(unet, train_kv=trained, train_q_out=trained,
                       processor_class=ExplicitSoftmaxCrossAttn if explicit else ClicCrossAttnProcessor)
    if trained:  # make the copies differ from the base weights
        with torch.no_grad():
            for proc in unet.attn_processors.values():
                if isinstance(proc, ClicCrossAttnProcessor):
                    for lin in proc.trained_linears().values():
                        lin.weight.add_(0.05 * torch.randn_like(lin.weight))
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 77, 32)
    layers = cross_attention_layers(unet, ("up",))
    assert len(layers) == 4 and all(l.startswith("up_blocks") for l in layers)
    token_index = [3, 5]
    with torch.no_grad(), capture_token_maps(unet, torch.tensor([token_index, token_index]), layers, (16, 16)) as cap:
        unet(x, t, text)
    got = cap.maps()
    ref = _full_softmax_maps(unet, x, t, text, token_index, layers, (16, 16))
    assert got.shape == (2, 2, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_capture_per_row_token_positions(backbone):
    unet = backbone.unet
    install_processors(unet, train_kv=False)
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 10]), torch.randn(2, 77, 32)
    layers = cross_attention_layers(unet)
    with torch.no_grad(), capture_token_maps(unet, torch.tensor([[3], [7]]), layers, (16, 16)) as cap:
        unet(x, t, text)
    ref3 = _full_softmax_maps(unet, x, t, text, [3], layers, (16, 16))
    ref7 = _full_softmax_maps(unet, x, t, text, [7], layers, (16, 16))
    torch.testing.assert_close(cap.maps()[0], ref3[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cap.maps()[1], ref7[1], rtol=1e-4, atol=1e-6)


def test_capture_is_differentiable(backbone):
    unet = backbone.unet
    install_processors(unet, train_kv=False)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    with capture_token_maps(unet, torch.tensor([[4]]), cross_attention_layers(unet), (16, 16)) as cap:
        unet(x, torch.tensor([100]), torch.randn(1, 77, 32))
    cap.maps().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_untrained_processor_matches_stock_diffusers(backbone):
    unet = backbone.unet
    torch.manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, text).sample
        for explicit in (False, True):
            install_processors(unet, train_kv=True, train_q_out=True,
                               processor_class=ExplicitSoftmaxCrossAttn if explicit else ClicCrossAttnProcessor)
            torch.testing.assert_close(unet(x, t, text).sample, ref, rtol=1e-4, atol=1e-5)
    # self-attention untouched
    assert all(type(v).__name__ == "AttnProcessor2_0" for k, v in unet.attn_processors.items() if ".attn1." in k)


def test_swapped_processors_restores_state(backbone):
    unet = backbone.unet
    tuned = install_processors(unet, train_kv=True)
    before = dict(unet.attn_processors)
    base = {k: (v if ".attn1." in k else ClicCrossAttnProcessor(dict(unet.named_modules())[k[:-10]]))
            for k, v in before.items()}
    with swapped_processors(unet, base):
        assert all(unet.attn_processors[k] is base[k] for k in base)
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert set(tuned) <= set(after)


def test_layer_selection_by_block_and_factor(backbone):
    unet = backbone.unet
    assert len(cross_attention_layers(unet, ("down", "mid", "up"))) == 7
    assert len(cross_attention_layers(unet, ("down",))) == 2
    assert all(".mid_block." in "." + l for l in cross_attention_layers(unet, ("mid",)))
    # tiny UNet: two levels -> factor 1 (16x16) and factor 2 (8x8)
    f2 = cross_attention_layers(unet, ("down", "up"), factor=2)
    assert f2 == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                  "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                  "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"]
    with pytest.raises(ValueError):
        cross_attention_layers(unet, ("decoder",))


def test_text_kv_cache_reuses_keys_and_values_of_the_same_text(backbone):
    """Inside text_kv_cached, a layer projects a text tensor to K/V once: a second pass with the same tensor runs no
    K/V projection and gives the same output to the bit; another tensor, or the same one written in place, is
    projected anew; outside, nothing is cached."""
    unet = backbone.unet
    procs = install_processors(unet, train_kv=True)
    calls = []
    hooks = [p.to_k.register_forward_hook(lambda *a: calls.append(1)) for p in procs.values()]
    torch.manual_seed(0)
    x, t, text, other = torch.randn(2, 4, 16, 16), torch.tensor([300]), torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    n = len(procs)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        with text_kv_cached(unet):
            first = unet(x, t, text).sample
            assert len(calls) == 2 * n                          # both passes so far projected K/V
            again = unet(x, t, text).sample
            assert len(calls) == 2 * n                          # ... the cached one did not
            assert torch.equal(again, plain) and torch.equal(first, plain)
            unet(x, t, other)
            assert len(calls) == 3 * n                          # another tensor: projected
            text.mul_(2)                                        # same object, new values: projected again
            doubled = unet(x, t, text).sample
            assert len(calls) == 4 * n
        assert all(p.kv_cache is None for p in procs.values())
        torch.testing.assert_close(unet(x, t, text).sample, doubled, rtol=0, atol=0)
        assert len(calls) == 5 * n
    for hook in hooks:
        hook.remove()
