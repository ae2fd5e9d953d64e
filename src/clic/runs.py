"""A training run on disk, shared by every trainer (:func:`clic.learn.learn`, RealFill's
:func:`clic.baselines.realfill.learn_realfill`): the resumable checkpoint next to the output, the JSON-lines log of
the loss terms, the progress bar, and the loss values read back from the device.

    <out>.ckpt         every ``checkpoint_every`` steps: the trained tensors, the optimiser state, the RNG state and
                       the config the run was made with (safetensors); removed when the run is complete
    <log>.jsonl        one record per step: ``{"step": ..., "loss": ..., <loss terms>}``

A run resumed from its checkpoint ends as the uninterrupted one would (same tensors, same log). On a GPU the loop
does not wait for the device at every step: the loss values of a few steps stay on the device and are read in one
copy (:meth:`Run.read`), then checked finite; a non-finite loss stops the run with a :class:`TrainingError` that
names the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import OutputError, TrainingError
from .fileio import atomic_path

log = logging.getLogger(__name__)


def checkpoint_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".ckpt")


def save_checkpoint(path: Path, step: int, params: list[torch.Tensor], optimizer, generator, config_json: str) -> None:
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = generator.get_state()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step), "config": config_json})


def load_checkpoint(path: Path, params: list[torch.Tensor], optimizer, generator, config_json: str) -> int:
    """Restore parameters, optimiser and RNG state from ``path``; returns the step it was written after."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"{path}: unreadable checkpoint ({exc})") from exc
    if (meta or {}).get("config") != config_json:
        raise TrainingError(f"{path}: checkpoint was made with other options; remove it or use the same options")
    try:
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"].to(p.device))
        state = optimizer.state_dict()
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = value.to(params[int(i)].device) if name != "step" else value
        state["state"] = opt_state
        optimizer.load_state_dict(state)
        generator.set_state(tensors["rng"])
        return int(meta["step"])
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"{path}: the checkpoint does not fit this run ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); remove it") from exc


def read_log(path) -> list[dict]:
    """The records of a JSON-lines log. A last line cut short (the run was killed while writing it) is dropped: the
    checkpoint the run resumes from comes before it; any other line that is not a record is an error."""
    lines = Path(path).read_text(errors="replace").splitlines()
    records = []
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except ValueError:
            if k == len(lines) - 1:
                log.warning("%s: its last line is cut short (the run was stopped while writing it); dropped", path)
                break
            raise TrainingError(f"{path}: line {k + 1} is not a log record; remove the log, or run without "
                                "--resume") from None
        records.append(record)
    return records


def reads_losses(step: int, start: int, last: int, every: int) -> bool:
    """Whether a loop reads the loss values back after ``step`` (and reports the steps since the last read): the
    first step of a run (its loss at once, and its time apart), every ``every`` steps, and the last."""
    return step == start + 1 or step == last or (step - start) % every == 0


class Run:
    """One training run of ``steps`` steps: ``with Run(...) as run: for step in run.steps(): ...``.

    Args:
        out_path: the output file; names the checkpoint ``<out>.ckpt`` (None: no checkpoint).
        log_path: the JSON-lines log (None: none).
        resume: continue from the checkpoint if there is one: ``params``, ``optimizer`` and ``generator`` are
            restored and the log is rewritten up to the checkpoint's step.
        config_json: what the checkpoint must have been made with to be resumed.
        checkpoint_every: steps between checkpoints (0: none).
        terms: the names of the loss values a step adds (:meth:`add`), the first is the total.
        sync_every: steps between reads of the loss values (:func:`reads_losses`).
        callback: called as ``callback(step, record)`` for every step, when its values are read.
    """

    def __init__(self, out_path, log_path, resume: bool, params: list[torch.Tensor], optimizer, generator,
                 config_json: str, steps: int, checkpoint_every: int = 0, terms: tuple[str, ...] = ("loss",),
                 sync_every: int = 1, desc: str = "learning", progress: bool = True,
                 callback: Callable[[int, dict], None] | None = None):
        self.params, self.optimizer, self.generator, self.config_json = params, optimizer, generator, config_json
        self.total, self.checkpoint_every, self.terms, self.sync_every = steps, checkpoint_every, terms, sync_every
        self.callback = callback
        self.ckpt = checkpoint_path(out_path) if out_path else None
        self.start, self.history = 0, []
        if resume and self.ckpt is not None and self.ckpt.is_file():
            self.start = load_checkpoint(self.ckpt, params, optimizer, generator, config_json)
            log.info("resumed from %s at step %d", self.ckpt, self.start)
            if log_path and Path(log_path).is_file():
                self.history = [r for r in read_log(log_path) if r["step"] <= self.start]
        self.log_path, self.log_file = log_path, None
        if log_path:
            try:
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                self.log_file = open(log_path, "w")
                for record in self.history:
                    self.log_file.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise self._log_failed(exc) from exc
        self.bar = tqdm(total=steps, initial=self.start, disable=not progress, desc=desc, unit="step")
        self.last_good: Path | None = None
        self.pending: list[tuple[int, dict, torch.Tensor]] = []   # (step, record so far, loss values on the device)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.log_file:
            self.log_file.close()

    def steps(self) -> range:
        return range(self.start + 1, self.total + 1)

    # -- the loss values --------------------------------------------------------------------------------------
    def add(self, step: int, values: torch.Tensor, **record) -> None:
        """A step's loss values (``terms``, one tensor on the device), kept until the next :meth:`read`."""
        self.pending.append((step, record, values))

    def read_due(self, step: int) -> bool:
        return reads_losses(step, self.start, self.total, self.sync_every)

    def read(self) -> list[dict]:
        """The pending steps' records, their loss values read in one copy; a :class:`TrainingError` at a non-finite
        loss."""
        if not self.pending:
            return []
        rows = torch.stack([v for _, _, v in self.pending]).cpu().tolist()
        records = []
        for (step, record, _), row in zip(self.pending, rows):
            records.append({"step": step, **record, **dict(zip(self.terms, row))})
            self.check_finite(records[-1][self.terms[0]], step)
        self.pending.clear()
        return records

    def _log_failed(self, exc: OSError) -> OutputError:
        where = f"the last good checkpoint is {self.last_good}" if getattr(self, "last_good", None) else \
            "no checkpoint was written yet"
        return OutputError(f"{self.log_path}: cannot write the log ({exc.strerror or exc}); {where}")

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
            raise TrainingError(f"loss became {loss} at step {step}; {where} (try a lower --lr)")

    def report(self, records: list[dict]) -> None:
        """After the optimiser step: keep the records in the history and the log, advance the progress bar, call
        the callback."""
        for record in records:
            self.history.append(record)
            if self.log_file:
                try:
                    self.log_file.write(json.dumps(record) + "\n")
                    self.log_file.flush()
                except OSError as exc:
                    raise self._log_failed(exc) from exc
            self.bar.update(1)
            self.bar.set_postfix({k: f"{record[k]:.4f}" for k in self.terms[1:] or self.terms})
            if self.callback:
                self.callback(record["step"], record)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_due(self, step: int) -> bool:
        return self.ckpt is not None and bool(self.checkpoint_every) and step % self.checkpoint_every == 0 \
            and step < self.total

    def save_checkpoint(self, step: int) -> None:
        save_checkpoint(self.ckpt, step, self.params, self.optimizer, self.generator, self.config_json)
        self.last_good = self.ckpt

    def finish(self) -> None:
        """The run is complete (its output written): the checkpoint goes."""
        if self.ckpt is not None and self.ckpt.is_file():
            self.ckpt.unlink()
