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
import functools
import hashlib
import json
import logging
import math
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .attention import BLOCKS
from .concept import Concept
from .errors import ConceptFileError, InputError
from .generate import with_article
from .tokens import free_placeholder

log = logging.getLogger(__name__)

ROLE = "roi-matcher"
MATCH_PROMPT = "a {token} region of {a_object}"        # paper: "a w* region of an OBJECT"
DISCOVER_PROMPT = "{a_object} with {token} style"      # paper: "An OBJECT with w* style"


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def discover_prompt(object_class: str, token: str) -> str:
    """The paper's prompt of the discovery (sec. 3.3): "an OBJECT with w* style"."""
    return DISCOVER_PROMPT.format(token=token, a_object=with_article(object_class))


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class MaskConfig:
    """From a token's cross-attention maps on an image to a binary mask."""

    map_timesteps: tuple[int, ...] = _opt((200, 400, 600), "the image is noised to each of these timesteps (of the "
                                                           "1000 training steps) and w*'s maps are averaged; repeat "
                                                           "a timestep for more noise draws")
    map_blocks: tuple[str, ...] = _opt(("up",), "UNet blocks whose cross-attention maps are averaged (paper: up)")
    map_seed: int = _opt(0, "seed of the noise added to the image")
    threshold: str = _opt("otsu", "'otsu' (Otsu's threshold of the normalised map) or a fixed level in [0, 1] of "
                                  "the min-max normalised map; pixels >= the level are in the mask")
    smooth: float = _opt(0.0, "Gaussian smoothing of the resized map before thresholding, sigma in pixels of the "
                              "model resolution (0: none)")
    dilate: int = _opt(0, "grow the mask by this many pixels of the model resolution (0: none)")

    def level(self) -> float | None:
        """The fixed threshold, or None for Otsu's."""
        text = str(self.threshold).strip().lower()
        if text == "otsu":
            return None
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"--threshold must be 'otsu' or a number in [0, 1], got {self.threshold!r}") from None
        if not 0.0 <= value <= 1.0:
            raise InputError(f"--threshold must be 'otsu' or a number in [0, 1], got {self.threshold}")
        return value

    def check(self, num_train_timesteps: int | None = None) -> None:
        self.level()
        if not self.map_timesteps:
            raise InputError("--map-timesteps needs at least one timestep")
        top = num_train_timesteps or 1000
        if any(not 0 <= int(t) < top for t in self.map_timesteps):
            raise InputError(f"--map-timesteps must be in [0, {top - 1}], got {list(self.map_timesteps)}")
        if not self.map_blocks or set(self.map_blocks) - set(BLOCKS):
            raise InputError(f"--map-blocks must be some of {', '.join(BLOCKS)}, got {list(self.map_blocks)}")
        if self.smooth < 0 or not math.isfinite(self.smooth):
            raise InputError(f"--smooth must be >= 0, got {self.smooth}")
        if self.dilate < 0:
            raise InputError(f"--dilate must be >= 0, got {self.dilate}")


@dataclass
class MatchConfig:
    """Learning w* for automatic target masks (sec. 3.3); the paper gives the prompt, the loss and 500 steps."""

    object_class: str | None = _opt(None, "OBJECT of the prompt (default: the concept's object class)")
    prompt: str | None = _opt(None, "prompt of l_att, must contain the placeholder (default: 'a <w*> region of a "
                                    "OBJECT')")
    placeholder: str = _opt("<w*>", "the new token w* (another name is picked if it is taken in this process)")
    token: str | None = _opt(None, "the concept token whose learned embedding initialises w* (default: the first)")
    steps: int = _opt(500, "optimisation steps (paper: 500)")
    lr: float = _opt(1e-5, "Adam learning rate of w*'s embedding (the paper's only learning rate; it gives none "
                           "for this step)")
    flip_p: float = _opt(0.5, "probability of a horizontal flip of image and mask per step (as in learning)")
    attn_norm: str = _opt("none", "rescale CA before l_att: none (paper), minmax, max",
                          choices=("none", "minmax", "max"))
    attn_blocks: tuple[str, ...] = _opt(("up",), "UNet blocks whose maps form CA(w*, x_t) in l_att (paper: up)")
    seed: int = _opt(0, "random seed of the optimisation (timesteps, noise, flips)")

    def check(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.flip_p <= 1:
            raise InputError(f"--flip-p must be in [0, 1], got {self.flip_p}")
        if self.prompt is not None and self.placeholder not in self.prompt:
            raise InputError(f"prompt {self.prompt!r} does not contain the placeholder {self.placeholder}")


@dataclass
class DiscoverConfig:
    """Learning w* and K/V from several images with the plain diffusion loss, to find their common pattern."""

    object_class: str = _opt("object", "OBJECT, the class of the objects that carry the pattern (e.g. vase)")
    prompt: str | None = _opt(None, "prompt of the diffusion loss, must contain the placeholder (default: 'an "
                                    "OBJECT with <w*> style')")
    placeholder: str = _opt("<w*>", "the new token w* (another name is picked if it is taken in this process)")
    initializer: str = _opt("pattern", "a single-token word whose embedding initialises w*")
    steps: int = _opt(500, "optimisation steps (paper: 500)")
    lr: float = _opt(1e-5, "Adam learning rate of w* and the cross-attention K/V (paper: 1e-5)")
    flip_p: float = _opt(0.5, "probability of a horizontal flip per step (as in learning)")
    seed: int = _opt(0, "random seed of the optimisation")
    learn_concept: bool = _opt(True, "then learn the concept in context (sec. 3.1) with the discovered masks")

    def check(self) -> None:
        MatchConfig(steps=self.steps, lr=self.lr, flip_p=self.flip_p, prompt=self.prompt,
                    placeholder=self.placeholder).check()


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
        """Install w* (and its K/V: the parent's or its own) for the body; the UNet's processors are restored on
        exit (the tokens stay in the tokenizer; applying again refreshes their embeddings)."""
        with restored_processors(backbone.unet):
            if self.parent is not None:
                self.parent.apply(backbone, "concept")
                self.token.check_base(backbone, "w*")
                _set_token_embeddings(backbone, self.token.tokens, self.token.embeddings)
            else:
                self.token.apply(backbone, "w*")
            yield


@contextlib.contextmanager
def restored_processors(unet) -> Iterator[None]:
    """Whatever the body installs on ``unet``, its attention processors are the same objects afterwards."""
    saved = dict(unet.attn_processors)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def _set_token_embeddings(backbone, tokens: list[str], vectors: torch.Tensor) -> None:
    """Add placeholder tokens, or refresh their embeddings if they were added before (without touching the UNet,
    unlike :meth:`Concept.apply`, which would put plain processors where the parent's K/V are)."""
    from .tokens import add_placeholders, concept_embedding

    emb = concept_embedding(backbone.text_encoder)
    if all(t in emb.tokens for t in tokens):
        with torch.no_grad():
            for token, vector in zip(tokens, vectors):
                emb.new[emb.tokens.index(token)] = vector.to(emb.new.device)
    else:
        add_placeholders(backbone, tokens, vectors.to(backbone.device))


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
    The backbone's attention processors are unchanged afterwards; w* stays in its tokenizer.
    """
    from .learn import learn, make_config

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
    lcfg = make_config(object_class=object_class, prompt=prompt, placeholder=placeholder, steps=cfg.steps,
                       lr=cfg.lr, token_lr=cfg.lr, use_con=False, use_roi=False, use_att=True, lambda_att=1.0,
                       train="token", flip_p=cfg.flip_p, attn_norm=cfg.attn_norm, attn_blocks=tuple(cfg.attn_blocks),
                       seed=cfg.seed, checkpoint_every=0)
    with restored_processors(backbone.unet):
        concept.apply(backbone, "concept")
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
    from .maps import token_attention_maps

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
    The backbone's attention processors are unchanged afterwards.
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
             mask_cfg: MaskConfig | None = None, learn_cfg=None, progress: bool = True) -> DiscoverResult:
    """Find the pattern several images share (sec. 3.3, fig. 5), then learn it in context with the found masks.

    Args:
        images: ``(3, R, R)`` tensors in [-1, 1], at least 2, all of the object class ``cfg.object_class``.
        learn_cfg: :class:`clic.learn.LearnConfig` of the in-context learning (default: the paper recipe with
            ``cfg.object_class``); used when ``cfg.learn_concept``.
    The backbone keeps the in-context concept's processors installed (as :func:`clic.learn.learn` does), or, without
    in-context learning, its processors from before the call.
    """
    from .learn import learn, make_config
    from .maps import token_attention_maps

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
    dcfg = make_config("custom-diffusion", object_class=cfg.object_class, prompt=prompt, placeholder=placeholder,
                       initializer=cfg.initializer, steps=cfg.steps, lr=cfg.lr, flip_p=cfg.flip_p, seed=cfg.seed,
                       checkpoint_every=0)
    size = backbone.resolution
    ones = [torch.ones(1, size, size) for _ in images]   # unused by the loss (alpha = 1); learn() wants masks
    with restored_processors(backbone.unet):
        found = learn(backbone, list(images), ones, dcfg, progress=progress)
        # 2. w*'s maps on each image, with the K/V just learned
        with torch.no_grad():
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
        learn_cfg = learn_cfg or make_config(object_class=cfg.object_class)
        learned = learn(backbone, list(images), masks, learn_cfg, progress=progress)
        concept, history = learned.concept, history + learned.history
        concept.meta["source_masks"] = "discovered by clic discover (w* cross-attention, sec. 3.3)"
    return DiscoverResult(masks, maps, matcher, concept, history)


# ---------------------------------------------------------------------------------------------- CLI


def _prefixed(cls, prefix: str, skip: tuple[str, ...] = ()):
    """A copy of a config dataclass with ``prefix`` on every field name, so that two configs that share option
    names (``--steps``) can sit in one parser (``--learn-steps``)."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(
        f"Prefixed{cls.__name__}",
        [(prefix + f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
         for f in dataclasses.fields(cls) if f.name not in skip])


def _output_names(paths: list[str]) -> list[str]:
    """Output stems per input image: the file stem, numbered when two inputs share a stem."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{k:02d}_{s}" for k, s in enumerate(stems)]


def _full_size_mask(mask: torch.Tensor, image_wh: tuple[int, int]):
    """The ``(1, R, R)`` mask of the centre-cropped image as an 'L' PNG of the original image size (zero outside
    the crop), so it can be passed back as ``--mask`` with its image."""
    from PIL import Image

    from .imaging import center_crop_box, to_pil

    w, h = image_wh
    left, top, right, bottom = center_crop_box(w, h)
    side = right - left
    m = F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=(side, side), mode="bilinear",
                      align_corners=False)[0, 0]
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(to_pil((m >= 0.5).float()), (left, top))
    return canvas


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    return out


def _image_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """(w, h) of each image; a missing or unreadable file is a one-line error."""
    from .imaging import image_size

    return [image_size(p) for p in paths]


def _mask_files(out_dir: Path, stem: str, image, mask, attention, full_size) -> dict:
    from .imaging import heat_overlay, mask_overlay

    return {out_dir / f"{stem}_mask.png": _full_size_mask(mask, full_size),
            out_dir / f"{stem}_overlay.png": mask_overlay(image, mask),
            out_dir / f"{stem}_attention.png": heat_overlay(image, attention)}


def _grid_file(out_dir: Path, names: list[str], images, masks, attentions) -> dict:
    """``grid.png``: the masks over their images (top row) and the token's attention (bottom row), one column per
    image, labelled with its name."""
    from .imaging import grid, heat_overlay, mask_overlay

    cells = [mask_overlay(im, m) for im, m in zip(images, masks)] + [heat_overlay(im, a) for im, a in
                                                                      zip(images, attentions)]
    return {out_dir / "grid.png": grid(cells, rows=2, labels=list(names) * 2, cell=max(256, images[0].shape[-1]))}


def cmd_match(args) -> None:
    from .cli import dataclass_values
    from .imaging import image_size, load_image, load_mask, save_png
    from .models import load_backbone

    # 1. Check every input before the model loads and before anything is written.
    cfg = MatchConfig(**dataclass_values(args, MatchConfig))
    mask_cfg = MaskConfig(**dataclass_values(args, MaskConfig))
    cfg.check()
    mask_cfg.check()
    out_dir = _out_dir(args.out)
    targets = list(args.target or [])
    training = args.source is not None or args.mask is not None
    if args.matcher and training:
        raise InputError("give either --matcher (a trained w*) or --source/--mask/--concept (train w*), not both")
    if not args.matcher and not training:
        raise InputError("give --matcher FILE, or --concept, --source and --mask to train w*")
    if training and not (args.source and args.mask and args.concept):
        raise InputError("training w* needs --concept, --source and --mask")
    if not targets and not training:
        raise InputError("give at least one --target image")
    target_sizes = _image_sizes(targets)
    matcher_out = Path(args.save_matcher) if args.save_matcher else out_dir / "matcher.safetensors"
    if training:
        if matcher_out.suffix != ".safetensors" or matcher_out.is_dir():
            raise InputError(f"{matcher_out}: the matcher file must be a .safetensors file name")
        from .concept import Concept

        concept = Concept.load(args.concept)
        load_mask(args.mask, 256, image_size(args.source))
        model = args.model or concept.meta["base_model"]
    else:
        matcher = Matcher.load(args.matcher, args.concept)
        model = args.model or matcher.token.meta["base_model"]

    # 2. Model; w* (trained, or loaded).
    backbone = load_backbone(model, args.device, args.dtype)
    size = backbone.resolution
    mask_cfg.check(backbone.training_scheduler().config.num_train_timesteps)
    if training:
        image = load_image(args.source, size)
        mask = load_mask(args.mask, size, image_size(args.source))
        matcher = learn_matcher(backbone, concept, image, mask, cfg, concept_path=args.concept,
                                progress=not args.quiet)
    else:
        matcher.token.check_base(backbone, args.matcher)
        if matcher.parent is not None:
            matcher.parent.check_base(backbone, "concept")

    # 3. Masks, all computed before any file is written.
    files, shown = {}, []
    names = _output_names(targets)
    for path, stem, wh in zip(targets, names, target_sizes):
        image = load_image(path, size)
        attention = matcher_attention(backbone, matcher, image, mask_cfg)
        mask = attention_to_mask(attention, size, mask_cfg)
        files.update(_mask_files(out_dir, stem, image, mask, attention, wh))
        shown.append((image, mask, attention))
    if shown:
        files.update(_grid_file(out_dir, names, *zip(*shown)))
    if training:
        matcher.save(matcher_out)
        print(f"{matcher_out}  token={matcher.tokens[0]}  prompt={matcher.prompt!r}")
    for path, image in files.items():
        save_png(image, path)
        print(path)


def cmd_discover(args) -> None:
    from .cli import dataclass_values
    from .imaging import load_image, save_png
    from .learn import make_config
    from .models import DEFAULT_MODEL, load_backbone

    # 1. Check every input before the model loads.
    cfg = DiscoverConfig(**dataclass_values(args, DiscoverConfig))
    if args.no_learn:
        cfg = replace(cfg, learn_concept=False)
    mask_cfg = MaskConfig(**dataclass_values(args, MaskConfig))
    cfg.check()
    mask_cfg.check()
    learn_values = {k[len("learn_"):]: v for k, v in dataclass_values(args, _learn_options()).items()}
    learn_cfg = make_config(learn_values.pop("recipe", None) or "paper", object_class=cfg.object_class,
                            **learn_values)
    learn_cfg.check(1)
    out_dir = _out_dir(args.out)
    paths = list(args.image)
    if len(paths) < 2:
        raise InputError(f"discover needs at least 2 images that share the pattern, got {len(paths)}")
    sizes = _image_sizes(paths)
    if len(set(sizes)) > 1:
        listing = ", ".join(f"{Path(p).name} {w}x{h}" for p, (w, h) in zip(paths, sizes))
        raise InputError(f"the images must all have the same size ({listing}); crop or resize them first")

    # 2. Discovery (and in-context learning); nothing is written before it all succeeded.
    backbone = load_backbone(args.model or DEFAULT_MODEL, args.device, args.dtype)
    size = backbone.resolution
    images = [load_image(p, size) for p in paths]
    result = discover(backbone, images, cfg, mask_cfg, learn_cfg, progress=not args.quiet)
    files = {}
    for path, stem, image, mask, attention in zip(paths, _output_names(paths), images, result.masks, result.maps):
        files.update(_mask_files(out_dir, stem, image, mask, attention, sizes[0]))
    files.update(_grid_file(out_dir, _output_names(paths), images, result.masks, result.maps))
    matcher_path = out_dir / "pattern.safetensors"
    result.matcher.save(matcher_path)
    print(f"{matcher_path}  token={result.matcher.tokens[0]}  (w* + K/V: clic match --matcher {matcher_path})")
    if result.concept is not None:
        concept_path = out_dir / "concept.safetensors"
        result.concept.save(concept_path)
        print(f"{concept_path}  tokens={' '.join(result.concept.tokens)}")
    for path, image in files.items():
        save_png(image, path)
        print(path)


@functools.lru_cache(maxsize=None)
def _learn_options():
    """The in-context learning options of ``clic discover``: LearnConfig's, as ``--learn-steps`` etc."""
    from .learn import LearnConfig

    return _prefixed(LearnConfig, "learn_", skip=("object_class",))


def register_cli(subparsers, add_model_options) -> None:
    from .cli import add_dataclass_options

    p = subparsers.add_parser(
        "match", help="find the region of a learned concept on other images with a token w* (paper sec. 3.3)",
        description="Automatic target masks: learn w* (initialised from v*) with l_att alone on the source image "
                    "and mask, prompt 'a <w*> region of a OBJECT', on the UNet with the concept applied; then mark "
                    "each target where w*'s cross-attention is high. Or apply a w* saved before (--matcher). "
                    "Writes per target STEM_mask.png (at the target's size), STEM_overlay.png and "
                    "STEM_attention.png (at the model resolution, centre-cropped).")
    p.add_argument("--concept", default=None, help="concept file made by `clic learn` (needed to train w*; with "
                                                   "--matcher: default, the path recorded in the matcher)")
    p.add_argument("--source", default=None, help="source image I_s the concept was learned on")
    p.add_argument("--mask", default=None, help="its mask M_s (white = RoI)")
    p.add_argument("--matcher", default=None, help="a w* file made before by `clic match` or `clic discover`")
    p.add_argument("--target", action="append", default=None,
                   help="image to find the region on (repeat for several)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-matcher", default=None,
                   help="where the trained w* goes (default: OUT/matcher.safetensors)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    add_dataclass_options(p, MatchConfig)
    add_dataclass_options(p, MaskConfig)
    p.set_defaults(func=cmd_match)

    p = subparsers.add_parser(
        "discover", help="find the pattern several images share and learn it (paper sec. 3.3, fig. 5)",
        description="Automatic source masks: learn w* and the cross-attention K/V with the plain diffusion loss on "
                    "all images (prompt 'an OBJECT with <w*> style'), take w*'s cross-attention on each image as "
                    "its mask, then learn the concept in context with those masks (--learn-* options, as in "
                    "`clic learn`). Writes STEM_mask.png, STEM_overlay.png, STEM_attention.png per image, "
                    "pattern.safetensors (w* + K/V, for `clic match --matcher`) and concept.safetensors.")
    p.add_argument("--image", action="append", required=True,
                   help="an image of the object with the pattern (repeat: at least 2, all of the same size)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-learn", action="store_true", help="only find the masks; no in-context learning")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    add_dataclass_options(p, DiscoverConfig, skip=("learn_concept",))
    add_dataclass_options(p, MaskConfig)
    add_dataclass_options(p, _learn_options())
    p.set_defaults(func=cmd_discover)
