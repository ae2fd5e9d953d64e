"""What the commands share: the one bridge from a config dataclass to ``--options`` (help text from the field's
metadata, the selected recipe's value as the default shown, speed options in a group of their own), the model
options, reading the source images and masks, and writing a folder of outputs (whole or not at all). The checks of
paths and devices are :mod:`clic.cli.validate`'s."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import torch

from ..config import SPEED, flag
from ..errors import ClicError, InputError
from ..fileio import staged_folder
from ..imaging import image_size, load_image, load_mask
from .validate import device


class UsageError(ClicError):
    """A command line argparse refuses (unknown option, missing argument, bad choice)."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as :class:`UsageError` (one line and exit code 2, as every other error)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------- configs


def add_config_options(parser: argparse.ArgumentParser, cls, defaults=None, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of the dataclass ``cls`` (but ``recipe`` and ``skip``), help text from the field's
    metadata with the default of ``defaults`` (a ``cls`` instance: the selected recipe's values; default ``cls()``).
    The parsed defaults stay None, so that only what the user said overrides the recipe. Speed options (metadata
    group ``speed``) go into a group of their own."""
    hints = typing.get_type_hints(cls)
    defaults = defaults if defaults is not None else cls()
    speed = None
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "recipe":
            continue
        target = parser
        if f.metadata.get("group") == SPEED:
            if speed is None:
                speed = parser.add_argument_group("speed and memory (same results up to float rounding)")
            target = speed
        help_text = (f.metadata.get("help", "") + _default_note(f.metadata.get("help", ""),
                                                              getattr(defaults, f.name))).replace("%", "%%")
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            target.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif origin is tuple:
            target.add_argument(flag(f.name), nargs="+", default=None, type=args[0] if args else str, help=help_text)
        else:
            base = args[0] if args and origin is not None else hint
            target.add_argument(flag(f.name), type=base, default=None, choices=f.metadata.get("choices"),
                                help=help_text)


def _default_note(help_text: str, value) -> str:
    """`` (default: VALUE)`` after a help text, unless the text says its default in words (then a None value means
    what the text says)."""
    if value is None or "default" in help_text.lower():
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, tuple):
        value = " ".join(str(v) for v in value)
    elif value == "":
        value = "''"
    return f" (default: {value})"


def config_values(args: argparse.Namespace, cls) -> dict:
    """The options of ``cls`` given on the command line (lists become tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "recipe":
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def peek_recipe(argv: list[str] | None, default: str = "paper") -> str:
    """The ``--recipe`` a command line selects, read before the full parser is built (its options show the selected
    recipe's values in ``--help``)."""
    argv = list(argv or [])
    for k, arg in enumerate(argv):
        if arg == "--recipe" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return default


def add_recipe_option(parser: argparse.ArgumentParser, choices: tuple[str, ...], what: str) -> None:
    parser.add_argument("--recipe", default=None, choices=choices,
                        help=f"the preset of the {what} options: {', '.join(choices)} (see `clic baselines list`); "
                             "explicit options override it, and `--recipe NAME --help` shows its values "
                             "(default: paper)")


def add_model_options(parser: argparse.ArgumentParser, model_default: str) -> None:
    parser.add_argument("--model", default=None, help=f"hub id or local diffusers folder (default: {model_default})")
    add_device_option(parser)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="precision of the frozen parts; trainable parameters stay fp32 (default: fp32)")


def add_device_option(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--device", default=None, type=device,
                        help=help_text or "cuda, mps or cpu (default: the first available, in that order)")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------- outputs


def write_folder(folder: Path, files: dict, show: bool = True) -> None:
    """Write ``{name: PIL image, or a function writing the file at the path it is given}`` into ``folder`` as one
    step: into a temporary folder first, moved into place when all are written (a full disk leaves nothing), then
    print each path."""
    with staged_folder(folder) as tmp:
        for name, item in files.items():
            if callable(item):
                item(tmp / name)
            else:
                item.save(tmp / name, format="PNG")
    if show:
        for name in files:
            print(Path(folder) / name)


# ---------------------------------------------------------------------------------------------- inputs


def source_groups(images: list[str], masks: list[str]) -> list[tuple[str, list[str]]]:
    """``(image, its masks)``: one image with one mask per concept token, or one mask per image of one concept."""
    if len(images) == 1 and len(masks) >= 1:
        return [(images[0], list(masks))]                  # one image, one or several concepts
    if len(images) == len(masks):
        return [(image, [mask]) for image, mask in zip(images, masks)]     # several images of one concept
    raise InputError(f"got {len(images)} images and {len(masks)} masks: give one mask per image, "
                     "or several masks for a single image (one concept each)")


def check_sources(groups: list[tuple[str, list[str]]], threshold: float | None, fit: str = "crop") -> None:
    """Read every image and mask once at a small size: fail fast, before the model loads (also: :func:`check_target`)."""
    for image_path, masks in groups:
        for mask_path in masks:
            load_mask(mask_path, 256, image_size(image_path), threshold, fit=fit)


def check_target(target: str, mask: str | None, threshold: float, fit: str = "crop") -> None:
    """The target image and its mask (None: found later), read at a small size before the model loads."""
    size = image_size(target)
    if mask is not None:
        load_mask(mask, 256, size, threshold, fit=fit)


def load_sources(groups: list[tuple[str, list[str]]], size: int, threshold: float | None, fit: str = "crop"
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The images ``(3, R, R)`` and their masks ``(n_tokens, R, R)`` at the model resolution (``fit``: see
    :func:`clic.imaging.load_image`; ``threshold`` None keeps the masks' soft values)."""
    pixels, masks = [], []
    for image_path, mask_paths in groups:
        pixels.append(load_image(image_path, size, fit))
        masks.append(torch.cat([load_mask(m, size, image_size(image_path), threshold, fit=fit) for m in mask_paths]))
    return pixels, masks
