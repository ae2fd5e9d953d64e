"""The library's own guards, in one place: what must hold whoever calls it (the commands, the web page, a benchmark
manifest, a Python user).

- :func:`check_options`: a config's values have their declared types, every float is finite, integers are in range
  (seeds fit a 64-bit generator, image counts are bounded). The configs' own ``check`` methods call it first.
- :func:`check_concept_file`: a concept file's metadata and tensors (names, shapes, dtypes, finite values) before
  anything uses them.
- :class:`FiniteWatch` and :func:`check_finite`: NaN or inf never reaches an image; a sampling loop stops with an
  error naming the first step where its latents stopped being finite. The watch keeps its flag on the device, so
  the loop never waits for it between steps (one read at the end).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing

import torch

from .errors import ConceptFileError, InputError, NonFiniteError

#: seeds seed torch's CPU generator, a Mersenne Twister that keeps the low 32 bits of its seed (it takes 64-bit
#: and negative seeds, but 2^32 + 1 and 2^63 + 1 draw what 1 draws): larger seeds are refused, not silently repeated
MAX_SEED = 2**32 - 1
#: any other integer option (a count, a step) fits a signed 64-bit integer
MAX_INT = 2**63 - 1
#: images a sampling call makes (each is written, and all of them go into one grid)
MAX_IMAGES = 256
SEEDS = ("seed", "seeds", "map_seed")
#: string options that may also be given as a number (a fixed level, or 'otsu')
NUMERIC_STRINGS = frozenset({"threshold"})


# ---------------------------------------------------------------------------------------------- options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fits(value, hint, name: str) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a, name) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_fits(v, args[0], name) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:                    # numpy's integers and floats too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) or (name in NUMERIC_STRINGS and _fits(value, float, name))
    return True


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_options(cfg) -> None:
    """Types, finiteness and ranges of the values of a config dataclass; an :class:`InputError` naming the option."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints.get(f.name)
        if hint is not None and not _fits(value, hint, f.name):
            raise InputError(f"{_flag(f.name)} must be {_type_name(hint)}, got {value!r}")
        values = value if isinstance(value, (tuple, list)) else [value]
        if f.name in SEEDS and any(not 0 <= v <= MAX_SEED for v in values):
            raise InputError(f"{_flag(f.name)} must be in 0..{MAX_SEED} (2^32 - 1: torch's CPU generator keeps 32 bits "
                             f"of a seed, a larger one would repeat a smaller one's draws), got {value}")
        for v in values:
            if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(v):
                raise InputError(f"{_flag(f.name)} must be a finite number, got {v}")
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and not -MAX_INT <= v <= MAX_INT \
                    and f.name not in SEEDS:
                raise InputError(f"{_flag(f.name)} is out of range (at most 2^63 - 1 in size), got {v}")
    seeds, num = getattr(cfg, "seeds", None), getattr(cfg, "num", None)
    if seeds is not None:
        count = num if num is not None else len(seeds)
        if count > MAX_IMAGES:
            raise InputError(f"{count} images asked for; at most {MAX_IMAGES} per call (--num or --seeds)")
        if num is not None and seeds and int(seeds[0]) + num - 1 > MAX_SEED:
            raise InputError(f"--seeds {seeds[0]} with --num {num} goes past the largest seed, {MAX_SEED}")


# ---------------------------------------------------------------------------------------------- concept files

_LAYER_KEY = re.compile(r"attn\.(.+)\.(to_k|to_v|to_q|to_out\.0)\.(weight|bias)")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: metadata keys every concept file has, and their types (others are optional, typed when present)
_REQUIRED_META = {"format": str, "tokens": list, "base_model": str}
_OPTIONAL_META = {"base_config_hash": str, "base_weight_stats": list, "prompt": str, "roi_prompt": str,
                  "object_class": str, "method": str, "initializer": str, "config": dict, "final_losses": dict,
                  "role": str, "parent": dict, "embedding_dims": list}


def check_concept_file(name, meta, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """A concept file's parsed metadata ``meta`` and its tensors, checked before use: a :class:`ConceptFileError`
    naming the file ``name`` and the first problem."""
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(meta), "a number")
        raise ConceptFileError(f"{name}: the clic metadata is {kind}, not a JSON object")
    if meta.get("format") != fmt:
        raise ConceptFileError(f"{name}: unsupported concept format {meta.get('format')!r} (expected {fmt})")
    for key, kind in {**_REQUIRED_META, **_OPTIONAL_META}.items():
        if key not in meta and key in _REQUIRED_META:
            raise ConceptFileError(f"{name}: metadata without {key!r}")
        if key in meta and not isinstance(meta[key], kind) and (key in _REQUIRED_META or meta[key] is not None):
            raise ConceptFileError(f"{name}: metadata {key!r} must be a {kind.__name__}, got {meta[key]!r}"[:300])
    tokens = meta["tokens"]
    if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens) or len(set(tokens)) != len(tokens):
        raise ConceptFileError(f"{name}: metadata 'tokens' must be distinct non-empty strings, got {tokens!r}"[:300])
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in meta.get("base_weight_stats") or []):
        raise ConceptFileError(f"{name}: metadata 'base_weight_stats' must be finite numbers")
    if "token_embeddings" not in tensors:
        raise ConceptFileError(f"{name}: no 'token_embeddings' tensor")
    for key, value in tensors.items():
        match = _LAYER_KEY.fullmatch(key)
        if key != "token_embeddings" and match is None:
            raise ConceptFileError(f"{name}: unknown tensor {key!r} (a concept holds 'token_embeddings' and "
                                   "'attn.<layer>.<to_k|to_v|to_q|to_out.0>.<weight|bias>')")
        if value.dtype not in _FLOATS:
            raise ConceptFileError(f"{name}: tensor {key!r} is {value.dtype}, not a float tensor")
        dims = 1 if match is not None and match.group(3) == "bias" else 2
        if value.ndim != dims or 0 in value.shape:
            raise ConceptFileError(f"{name}: tensor {key!r} has shape {tuple(value.shape)}; expected {dims} "
                                   "non-empty dimension(s)")
        if not bool(torch.isfinite(value).all()):
            raise ConceptFileError(f"{name}: tensor {key!r} holds NaN or inf values")
    rows = tensors["token_embeddings"].shape[0]
    if rows != len(tokens):
        raise ConceptFileError(f"{name}: {rows} embeddings for {len(tokens)} tokens")
    dims = meta.get("embedding_dims")
    width = tensors["token_embeddings"].shape[-1]
    if dims is not None and (not all(type(d) is int and d > 0 for d in dims) or sum(dims) != width):
        raise ConceptFileError(f"{name}: metadata 'embedding_dims' {dims!r} does not add up to the embeddings' width "
                               f"{width}"[:300])


# ---------------------------------------------------------------------------------------------- sampling


def _any_bad(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).any()


class FiniteWatch:
    """The first step at which a loop's tensor held NaN or inf, tracked on the tensor's device: :meth:`see` after
    each step costs no wait for the device, :meth:`check` reads it once and raises a :class:`NonFiniteError`.

    Args:
        what: what is watched, for the message (e.g. "the transfer's latents").
        hint: what to try, for the message.
    """

    def __init__(self, what: str, hint: str = ""):
        self.what, self.hint = what, hint
        self.first: torch.Tensor | None = None      # 1 + the first bad step; 0 while all are finite

    def see(self, x: torch.Tensor, step: int) -> None:
        bad = _any_bad(x)
        if self.first is None:
            self.first = torch.zeros((), dtype=torch.long, device=x.device)
        self.first = torch.where((self.first == 0) & bad, step + 1, self.first)

    def on(self, device) -> "FiniteWatch":
        """The flag allocated on ``device`` now: before a step that updates it is recorded as a CUDA graph (a flag
        made inside the recording would be reset by every replay)."""
        if self.first is None:
            self.first = torch.zeros((), dtype=torch.long, device=device)
        return self

    def see_recorded(self, x: torch.Tensor, step: torch.Tensor) -> None:
        """:meth:`see` inside a step recorded as a CUDA graph (after :meth:`on`): ``step`` is a 0-d device tensor
        that holds the step number at each replay, and the flag is updated in place."""
        self.first.copy_(torch.where((self.first == 0) & _any_bad(x), step + 1, self.first))

    def check(self) -> None:
        first = int(self.first.cpu()) if self.first is not None else 0     # the one read
        if first:
            raise NonFiniteError(f"{self.what} became NaN or inf at denoising step {first - 1}; stopped before "
                                 f"any image was made{f' ({self.hint})' if self.hint else ''}")


def check_finite(x: torch.Tensor, what: str, hint: str = "") -> None:
    """A :class:`NonFiniteError` if ``x`` holds NaN or inf (one read of the device)."""
    if bool(_any_bad(x).cpu()):
        raise NonFiniteError(f"{what} hold NaN or inf; stopped before any image was made"
                             f"{f' ({hint})' if hint else ''}")
