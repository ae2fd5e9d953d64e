"""RoI matching (paper sec. 3.3): masks found by a token's cross-attention instead of drawn by hand.

Automatic target mask (``clic match``, fig. 4)::

    w*   <- v*                                                  a new token, initialised from the learned v*
    w*   <- argmin l_att(CA(w*, x_t), M_s)                      eq. 1 alone, prompt "a <w*> region of a OBJECT",
                                                                on the UNet with the concept's K/V; only w* trains
    M_tg  = threshold(normalise(smooth(resize(CA(w*, x_tg,t)))))   on any target: noise it to a few timesteps,
                                                                run the UNet, average w*'s up-block maps

Automatic source mask (``clic discover``, fig. 5)::

    w*, K/V <- argmin ||eps_theta(x_t, c, t) - eps||^2          plain diffusion loss (no mask, alpha = 1), several
                                                                images, prompt "an OBJECT with <w*> style"
    M_s^k   = threshold(normalise(CA(w*, x^k_t)))               on each source image
    then (by default) in-context learning (sec. 3.1) with those masks.

A *matcher* (:class:`Matcher`) is w* saved as a concept file (role ``roi-matcher``): for ``clic match`` it holds
only the token (a few kB) and names the concept under whose K/V it was trained (path and fingerprint); for
``clic discover`` it holds its own K/V. It can be applied to any number of images without retraining.

From map to mask (:func:`attention_to_mask`): bilinear resize to the model resolution, optional Gaussian
smoothing, min-max normalisation to [0, 1], a threshold (Otsu's, or a fixed level of the normalised map:
pixels >= level are in the mask), optional dilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .concept import Concept, applied_concept
from .config import DiscoverConfig, LearnConfig, MaskConfig, MatchConfig, learn_config
from .errors import ConceptFileError, InputError
from .generate import with_article
from .learn import learn
from .maps import token_attention_maps
from .tokens import free_placeholder

log = logging.getLogger(__name__)

ROLE = "roi-matcher"
MATCH_PROMPT = "a {token} region of {a_object}"        # paper: "a w* region of an OBJECT"
DISCOVER_PROMPT = "{a_object} with {token} style"      # paper: "An OBJECT with w* style"


def discover_prompt(object_class: str, token: str) -> str:
    """The paper's prompt of the discovery (sec. 3.3): "an OBJECT with w* style"."""
    return DISCOVER_PROMPT.format(token=token, a_object=with_article(object_class))


# ---------------------------------------------------------------------------------------------- map -> mask


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the level that maximises the between-class variance.

    Returned as the lower edge of the upper class: ``values >= level`` is the foreground."""
    v = values.detach().flatten().float().cpu().clamp(0, 1)
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = p.cumsum(0)                                    # weight of the lower class for a cut after bin k
    mu0 = (p * centres).cumsum(0)
    between = (mu0[-1] * w0 - mu0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[-1] = -1                                    # a cut after the last bin leaves no foreground
    return (int(between.argmax()) + 1) / bins


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with replicated borders."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def normalised_map(attention: torch.Tensor, size: int, smooth: float = 0.0) -> torch.Tensor:
    """``(h, w)`` attention map -> ``(size, size)`` in [0, 1]: bilinear resize, smoothing, min-max normalisation."""
    m = attention.detach().float().cpu().reshape(1, 1, *attention.shape[-2:])
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
    if smooth > 0:
        m = _gaussian_blur(m, smooth)
    lo, hi = m.min(), m.max()
    if not torch.isfinite(hi - lo) or float(hi - lo) <= 1e-12 * max(1.0, float(hi.abs())):
        raise InputError("the token's attention map is flat on this image: no region stands out")
    return ((m - lo) / (hi - lo))[0, 0]


def attention_to_mask(attention: torch.Tensor, size: int, cfg: MaskConfig | None = None) -> torch.Tensor:
    """Binary ``(1, size, size)`` float mask from an ``(h, w)`` map (see the module docstring for the steps)."""
    cfg = cfg or MaskConfig()
    cfg.check()
    m = normalised_map(attention, size, cfg.smooth)
    level = cfg.level()
    if level is None:
        level = otsu_threshold(m)
    mask = (m >= level).float()[None]
    if cfg.dilate > 0:
        mask = F.max_pool2d(mask[None], 2 * cfg.dilate + 1, stride=1, padding=cfg.dilate)[0]
    return mask


# ---------------------------------------------------------------------------------------------- the matcher


def concept_fingerprint(concept: Concept) -> str:
    """SHA-256 (16 hex digits) of a concept's tokens, embeddings and attention weights."""
    h = hashlib.sha256(json.dumps(concept.tokens).encode())
    h.update(concept.embeddings.float().contiguous().numpy().tobytes())
    for key in sorted(concept.attn_weights):
        h.update(key.encode())
        h.update(concept.attn_weights[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Matcher:
    """w* and the attention weights it works under.

    Attributes:
        token: a :class:`Concept` with the single token w*; ``token.meta["prompt"]`` is the prompt its maps are
            read with. No attention weights (``clic match``: they are the parent's), or its own (``clic discover``).
        parent: the concept whose K/V w* was trained under (``clic match``), else None.
    """

    token: Concept
    parent: Concept | None = None

    @property
    def prompt(self) -> str:
        return self.token.meta["prompt"]

    @property
    def tokens(self) -> list[str]:
        return list(self.token.tokens)

    def save(self, path) -> Path:
        return self.token.save(path)

    @classmethod
    def load(cls, path, concept: Concept | str | Path | None = None) -> "Matcher":
        """Read a matcher file; ``concept`` (object or path) is the parent, default: the path recorded in the file.

        A parent other than the one w* was trained under (by fingerprint) is refused."""
        token = Concept.load(path)
        if token.meta.get("role") != ROLE:
            raise ConceptFileError(f"{path}: not a w* matcher file (made by `clic match` or `clic discover`)")
        info = token.meta.get("parent")
        if info is None:
            if concept is not None:
                log.info("%s carries its own attention weights; the given concept is not used", path)
            return cls(token, None)
        if concept is None:
            recorded = info.get("path")
            if not recorded or not Path(recorded).is_file():
                where = recorded or "not saved"
                raise ConceptFileError(f"{path}: w* works with the concept it was trained on ({where}), which is not "
                                       "there; give it with --concept")
            concept = recorded
        name = str(concept) if not isinstance(concept, Concept) else "the given concept"
        if not isinstance(concept, Concept):
            concept = Concept.load(concept)
        if concept_fingerprint(concept) != info.get("fingerprint"):
            raise ConceptFileError(f"{path}: w* was trained with another concept than {name} "
                                   f"(fingerprint {info.get('fingerprint')}, got {concept_fingerprint(concept)})")
        return cls(token, concept)

    @contextlib.contextmanager
    def applied(self, backbone) -> Iterator[None]:
        """Install w* (and its K/V: the parent's or its own) for the body; the backbone is as it was afterwards."""
        with contextlib.ExitStack() as stack:
            if self.parent is not None:
                stack.enter_context(applied_concept(backbone, self.parent, name="concept"))
            # w* alone (clic match) keeps the parent's cross-attention processors; w* of clic discover has its own
            stack.enter_context(applied_concept(backbone, self.token, name="w*"))
            yield


def _check_image(backbone, image: torch.Tensor, name: str = "image") -> None:
    size = backbone.resolution
    if image.ndim != 3 or tuple(image.shape) != (3, size, size):
        raise InputError(f"{name} must be a (3, {size}, {size}) tensor in [-1, 1] (clic.imaging.load_image(path, "
                         f"{size})), got {tuple(image.shape)}")


# ---------------------------------------------------------------------------------------------- match


def learn_matcher(backbone, concept: Concept, image: torch.Tensor, mask: torch.Tensor, cfg: MatchConfig | None = None,
                  concept_path=None, progress: bool = True,
                  callback: Callable[[int, dict], None] | None = None) -> Matcher:
    """Learn w* on a source image and its mask (sec. 3.3): l_att alone, only w*'s embedding trains.

    Args:
        concept: the learned concept (its K/V are installed while w* trains; its token initialises w*).
        image: ``(3, R, R)`` in [-1, 1]; mask: ``(1, R, R)`` or ``(R, R)`` binary, the source RoI M_s.
        concept_path: where the concept file is, recorded in the matcher so it can be loaded alone later.
    The backbone is as it was afterwards.
    """
    cfg = cfg or MatchConfig()
    cfg.check()
    _check_image(backbone, image, "source image")
    mask = mask.float().reshape(1, *mask.shape[-2:])
    if mask.sum() == 0:
        raise InputError("source mask is empty")
    if cfg.token is not None and cfg.token not in concept.tokens:
        raise InputError(f"token {cfg.token} is not in the concept (tokens: {' '.join(concept.tokens)})")
    index = concept.tokens.index(cfg.token) if cfg.token is not None else 0
    object_class = cfg.object_class or concept.meta.get("object_class") or "object"
    placeholder = free_placeholder(backbone, cfg.placeholder)
    prompt = (cfg.prompt or MATCH_PROMPT.format(token=cfg.placeholder, a_object=with_article(object_class)))
    prompt = prompt.replace(cfg.placeholder, placeholder)
    lcfg = learn_config(object_class=object_class, prompt=prompt, placeholder=placeholder, steps=cfg.steps,
                       lr=cfg.lr, token_lr=cfg.lr, use_con=False, use_roi=False, use_att=True, lambda_att=1.0,
                       train="token", flip_p=cfg.flip_p, attn_norm=cfg.attn_norm, attn_blocks=tuple(cfg.attn_blocks),
                       seed=cfg.seed, checkpoint_every=0)
    with applied_concept(backbone, concept):
        # learn() with train="token" keeps the installed (the concept's) K/V and trains only w*
        result = learn(backbone, [image], [mask], lcfg, progress=progress, callback=callback,
                       init_vectors=concept.embeddings[index:index + 1])
    meta = {k: v for k, v in result.concept.meta.items()}
    meta.update(role=ROLE, kind="match", method="roi-match", prompt=prompt, initialised_from=concept.tokens[index],
                match_config=dataclasses.asdict(cfg),
                parent={"path": str(Path(concept_path).resolve()) if concept_path else None,
                        "fingerprint": concept_fingerprint(concept), "tokens": concept.tokens,
                        "object_class": concept.meta.get("object_class")})
    token = Concept(result.concept.tokens, result.concept.embeddings, {}, meta)   # the parent's K/V stay out
    return Matcher(token, concept)


@torch.no_grad()
def matcher_attention(backbone, matcher: Matcher, image: torch.Tensor, cfg: MaskConfig | None = None) -> torch.Tensor:
    """CA(w*, x_t) on ``image (3, R, R)``: ``(h, w)`` at the latent resolution, averaged over ``cfg.map_timesteps``."""
    cfg = cfg or MaskConfig()
    cfg.check(backbone.training_scheduler().config.num_train_timesteps)
    _check_image(backbone, image, "target image")
    with matcher.applied(backbone):
        latents = backbone.encode_image(image[None])
        maps = token_attention_maps(backbone, latents, matcher.prompt, matcher.tokens,
                                    timesteps=tuple(cfg.map_timesteps), blocks=tuple(cfg.map_blocks),
                                    seed=cfg.map_seed)
    return maps[0].cpu()


def auto_target_mask(backbone, matcher: Matcher | str | Path, target_image: torch.Tensor,
                     cfg: MaskConfig | None = None) -> torch.Tensor:
    """The target mask M_tg found by w* (sec. 3.3): binary ``(1, R, R)`` float on the CPU, like
    :func:`clic.imaging.load_mask`.

    Args:
        matcher: a :class:`Matcher` or the path of a matcher file (its concept is found by the recorded path).
        target_image: ``(3, R, R)`` in [-1, 1] at the model resolution R (``clic.imaging.load_image(path, R)``).
    The backbone is as it was afterwards.
    """
    cfg = cfg or MaskConfig()
    if not isinstance(matcher, Matcher):
        matcher = Matcher.load(matcher)
    attention = matcher_attention(backbone, matcher, target_image, cfg)
    return attention_to_mask(attention, backbone.resolution, cfg)


# ---------------------------------------------------------------------------------------------- discover


@dataclass
class DiscoverResult:
    masks: list[torch.Tensor]          # (1, R, R) binary, one per image: the discovered source masks M_s
    maps: list[torch.Tensor]           # (h, w) CA(w*) per image
    matcher: Matcher                   # w* with its K/V: finds the pattern on other images too (fig. 5)
    concept: Concept | None            # the in-context concept learned with the masks (if asked)
    history: list[dict]                # losses of the discovery, then of the in-context learning


def discover(backbone, images: list[torch.Tensor], cfg: DiscoverConfig | None = None,
             mask_cfg: MaskConfig | None = None, learn_cfg: LearnConfig | None = None,
             progress: bool = True) -> DiscoverResult:
    """Find the pattern several images share (sec. 3.3, fig. 5), then learn it in context with the found masks.

    Args:
        images: ``(3, R, R)`` tensors in [-1, 1], at least 2, all of the object class ``cfg.object_class``.
        learn_cfg: :class:`clic.config.LearnConfig` of the in-context learning (default: the paper recipe with
            ``cfg.object_class``); used when ``cfg.learn_concept``.
    The backbone is as it was afterwards.
    """
    cfg = cfg or DiscoverConfig()
    mask_cfg = mask_cfg or MaskConfig()
    cfg.check()
    mask_cfg.check(backbone.training_scheduler().config.num_train_timesteps)
    if len(images) < 2:
        raise InputError(f"discover needs at least 2 images that share the pattern, got {len(images)}")
    for k, image in enumerate(images):
        _check_image(backbone, image, f"image {k}")
    if learn_cfg is not None and learn_cfg.object_class != cfg.object_class:
        learn_cfg = replace(learn_cfg, object_class=cfg.object_class)

    # 1. w* and K/V by the plain diffusion loss: M_soft = 1 (alpha = 1), no l_att, no l_RoI ("custom-diffusion").
    placeholder = free_placeholder(backbone, cfg.placeholder)
    prompt = cfg.prompt or discover_prompt(cfg.object_class, cfg.placeholder)
    prompt = prompt.replace(cfg.placeholder, placeholder)
    dcfg = learn_config("custom-diffusion", object_class=cfg.object_class, prompt=prompt, placeholder=placeholder,
                       initializer=cfg.initializer, steps=cfg.steps, lr=cfg.lr, flip_p=cfg.flip_p, seed=cfg.seed,
                       checkpoint_every=0)
    size = backbone.resolution
    ones = [torch.ones(1, size, size) for _ in images]   # unused by the loss (alpha = 1); learn() wants masks
    found = learn(backbone, list(images), ones, dcfg, progress=progress)
    # 2. w*'s maps on each image, with the K/V just learned
    with applied_concept(backbone, found.concept, name="w*"), torch.no_grad():
        maps = [token_attention_maps(backbone, backbone.encode_image(image[None]), prompt, [placeholder],
                                     timesteps=tuple(mask_cfg.map_timesteps), blocks=tuple(mask_cfg.map_blocks),
                                     seed=mask_cfg.map_seed)[0].cpu() for image in images]
    meta = {**found.concept.meta, "role": ROLE, "kind": "discover", "method": "roi-discover", "parent": None,
            "discover_config": dataclasses.asdict(cfg)}
    matcher = Matcher(Concept(found.concept.tokens, found.concept.embeddings, found.concept.attn_weights, meta))
    masks = [attention_to_mask(m, size, mask_cfg) for m in maps]
    for k, mask in enumerate(masks):
        if bool((mask > 0.5).all()):
            raise InputError(f"the discovered mask of image {k} covers the whole image; use a higher --threshold")

    # 3. In-context learning (sec. 3.1) with the discovered masks.
    concept, history = None, list(found.history)
    if cfg.learn_concept:
        learn_cfg = learn_cfg or learn_config(object_class=cfg.object_class)
        learned = learn(backbone, list(images), masks, learn_cfg, progress=progress)
        concept, history = learned.concept, history + learned.history
        concept.meta["source_masks"] = "discovered by clic discover (w* cross-attention, sec. 3.3)"
    return DiscoverResult(masks, maps, matcher, concept, history)
