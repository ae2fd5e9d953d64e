"""The checks at the edge (the commands and the web page), made before any model loads, so that a bad input costs
nothing and ends in one line:

- input files: present, a regular file (not a folder, FIFO or device), readable; images: a readable header and at
  most :data:`clic.imaging.MAX_PIXELS` pixels (read from the header: nothing is decoded);
- outputs: a file name where a file goes, a folder where a folder goes, a place this process can write (tried,
  not guessed from permission bits), and never one of the inputs;
- devices (``--device``: one this machine has, else the alternatives), ports, sizes;
- one run per output: :func:`exclusive` holds a lock, and a second run writing the same output is refused.

Option values (types, finite numbers, ranges) are checked by the configs themselves (:mod:`clic.checks`), concept
files when they are read, manifests by their loader: the library guards what it relies on, whoever calls it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ClicError, InputError
from ..fileio import readable_file
from ..imaging import probe_image
from ..models import check_device

try:
    import fcntl
except ImportError:       # not on Windows: runs there are not locked
    fcntl = None

#: --size of `clic evaluate` (pixels a side)
SIZE_RANGE = (16, 4096)

Inputs = dict[str, Iterable]     # {"--image": [paths], ...}: the files a command reads, by option


# ---------------------------------------------------------------------------------------------- inputs


def input_file(path, what: str = "file") -> Path:
    return readable_file(path, what)


def image_file(path) -> tuple[int, int]:
    """(width, height) of an input image, from its header (readable, not too large)."""
    return probe_image(path)



# ---------------------------------------------------------------------------------------------- outputs


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path, out: Path) -> None:
    """``out`` can be made inside ``folder`` (a folder that may not exist yet): its nearest existing ancestor is a
    folder where this process can create a file (tried with a nameless temporary file: permission bits do not tell,
    e.g. for root or on a read-only mount)."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise InputError(f"{out}: {base} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise InputError(f"{out}: cannot write in {base} ({exc.strerror or exc})") from None


def _same_file(a: Path, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _not_an_input(out: Path, inputs: Inputs, shown: Path | None = None) -> None:
    for option, paths in inputs.items():
        for p in paths or []:
            if p is not None and _same_file(out, p):
                raise InputError(f"{shown or out}: it would overwrite the input {p} ({option}); choose another output")


def output_file(path, suffix: str | None = None, inputs: Inputs | None = None) -> Path:
    """``path`` as an output file: not a folder, the right suffix, in a place this process can write, not an input."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name")
    if suffix and out.suffix != suffix:
        raise InputError(f"{out}: the output file must end in {suffix}")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    _not_an_input(out, inputs or {})
    _writable(out.parent, out)
    return out


def output_folder(path, names: Iterable[str] = (), inputs: Inputs | None = None) -> Path:
    """``path`` as an output folder (made when the outputs are written): not a file, in a place this process can
    write; none of the files ``names`` it will hold is an input."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    for name in names:
        _not_an_input(out / name, inputs or {}, out)
    _writable(out, out)
    return out


# ---------------------------------------------------------------------------------------------- one run per output


@contextlib.contextmanager
def exclusive(path) -> Iterator[None]:
    """Hold a lock on the output ``path`` (a file or a folder) for the body; an :class:`InputError` at once if another
    run holds it. The lock is a hidden file next to the output (``.NAME.lock``), removed afterwards."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot write in {lock.parent} ({exc.strerror})") from None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"{path}: another clic run is writing it (it holds {lock}); wait for it, or choose "
                                 "another output") from None
            raise
        # the file may have been removed by the run that held it, between our open and our lock: then lock anew
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# ---------------------------------------------------------------------------------------------- options


def device(name: str) -> str:
    """An argparse ``type`` for ``--device``: a device this machine has (one line naming the alternatives)."""
    if name not in ("auto",):
        try:
            check_device(name)
        except ClicError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def device_or_meta(name: str) -> str:
    """``--device`` of ``clic bench``: :func:`device`, or ``meta`` (a model built without values: counts only)."""
    return name if name == "meta" else device(name)


def size(value: int | None, option: str, bounds: tuple[int, int] = SIZE_RANGE) -> int | None:
    if value is not None and not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{option} must be in {bounds[0]}..{bounds[1]} pixels, got {value}")
    return value


def free_port(host: str, port: int | None) -> None:
    """``port`` in 1..65535 and free on ``host`` (None: the server picks a free one)."""
    if port is None:
        return
    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as servers do: a closing port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise InputError(f"--port {port} on {host}: {reason}; choose another, or leave --port out for the next "
                             "free one") from None
