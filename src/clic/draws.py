"""The random draws of learning and transfer: one seeded source that a caller can replace.

Every random number :func:`clic.learn.learn` and :func:`clic.transfer.transfer` use is asked of a :class:`Draws`
object, by name. The default, :class:`SeededDraws`, takes them from one CPU ``torch.Generator`` in the order they
are asked for (the names play no part), so a seed gives the same run on every device. Two other sources make the
same numbers reach two runs:

- :class:`RecordedDraws` wraps a source and keeps every draw under its name (``save`` writes them to a
  safetensors file, e.g. for another program to replay);
- :class:`ReplayedDraws` gives recorded draws back by name (from a :class:`RecordedDraws`, a dict, or a file).

So the paper and the official recipe can be compared on the same timesteps, noise, flips and posterior samples
(``scripts/compare_recipes.py``), or the draws of another implementation replayed into ours. The names:

========================  ======================================================================================
learning, per step ``S``
``S/image``               which source image (integer in [0, N))
``S/flip``                uniform in [0, 1): image and mask flipped horizontally if below ``flip_p``
``S/t``                   the timestep (integer in [0, num_train_timesteps))
``S/eps``                 the noise eps ``(1, C, h, w)``, shared by the context and RoI branches
``S/roi_prompt/J``        which RoI prompt of ``roi_prompts`` token J's row uses (only with several)
``S/z``                   posterior sample of the image's latent: x_0 = (mean + std z) * scale ``(1, C, h, w)``
``S/z_roi``               the same for the masked images of l_RoI ``(T, C, h, w)`` (``roi_input pixels``)
transfer, per seed
``initial``               the first Gaussian draw ``(1, C, h, w)``: the start noise, and the blending noise of
                          every step unless ``blend_noise`` is ``fresh``
``target``                posterior sample of the target's latent (``posterior sample``)
``S/blend``               the blending noise of step ``S`` (``blend_noise fresh``)
``S/variance``            DDIM's noise of step ``S`` (eta > 0); other stochastic samplers draw from ``generator``
========================  ======================================================================================

(``S`` is the step number as the loop counts it: 1.. for learning, the schedule index 0..N-1 for transfer.) Step
numbers in the names make a replay independent of the order and of draws a run does not need (the paper recipe
replays an official run's draws and ignores the posterior samples).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError
from .fileio import atomic_path


class Draws:
    """A source of named random draws. ``generator`` is what a checkpoint saves and restores (resuming a run)."""

    generator: torch.Generator

    def integer(self, name: str, high: int) -> int:
        """An integer in ``[0, high)``."""
        raise NotImplementedError

    def uniform(self, name: str) -> float:
        """A float in ``[0, 1)``."""
        raise NotImplementedError

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard Gaussian fp32 values of ``shape``, on the CPU."""
        raise NotImplementedError


class SeededDraws(Draws):
    """Draws from one CPU generator seeded with ``seed``, in the order asked for."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def integer(self, name: str, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def uniform(self, name: str) -> float:
        return float(torch.rand(1, generator=self.generator))

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)


class RecordedDraws(Draws):
    """``source``'s draws, each also kept in :attr:`record` under its name."""

    def __init__(self, source: Draws):
        self.source = source
        self.generator = source.generator
        self.record: dict[str, int | float | torch.Tensor] = {}

    def integer(self, name: str, high: int) -> int:
        self.record[name] = value = self.source.integer(name, high)
        return value

    def uniform(self, name: str) -> float:
        self.record[name] = value = self.source.uniform(name)
        return value

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = self.source.normal(name, shape)
        self.record[name] = value.clone()
        return value

    def save(self, path) -> Path:
        """The draws as a safetensors file (numbers as 0-d tensors: int64 for integers, float64 for uniforms)."""
        tensors = {}
        for name, value in self.record.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = value.contiguous()
            else:
                tensors[name] = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        return Path(path)


class ReplayedDraws(Draws):
    """Recorded draws given back by name; a draw that was not recorded is an :class:`InputError`."""

    def __init__(self, record: dict | RecordedDraws):
        self.record = dict(record.record if isinstance(record, RecordedDraws) else record)
        self.generator = torch.Generator("cpu").manual_seed(0)     # nothing is drawn from it

    @classmethod
    def load(cls, path) -> "ReplayedDraws":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: draws file not found")
        return cls(load_file(str(path)))

    def _get(self, name: str):
        if name not in self.record:
            raise InputError(f"no recorded draw named {name!r} (recorded: {len(self.record)} draws)")
        return self.record[name]

    def integer(self, name: str, high: int) -> int:
        value = int(self._get(name))
        if not 0 <= value < high:
            raise InputError(f"recorded draw {name!r} = {value} is outside [0, {high})")
        return value

    def uniform(self, name: str) -> float:
        return float(self._get(name))

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = torch.as_tensor(self._get(name)).float()
        if tuple(value.shape) != tuple(shape):
            raise InputError(f"recorded draw {name!r} has shape {tuple(value.shape)}, the run needs {tuple(shape)}")
        return value.clone()
