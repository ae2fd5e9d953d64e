"""Files in and out, safely.

Out: every output goes to a temporary file (:func:`atomic_path`) or folder (:func:`staged_folder`) next to its
place and is renamed when complete, so an error, a full disk or a kill never leaves a half-written output behind;
a write that fails is an :class:`~clic.errors.OutputError` naming the output.

In: :func:`readable_file` refuses what is not a readable regular file (a folder, a FIFO, a device) before anything
opens it; :func:`read_document` reads a small YAML or JSON document (size-limited, UTF-8, YAML without aliases,
whose expansion is how a 1 KB file becomes gigabytes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from safetensors import SafetensorError

from .errors import InputError, OutputError

#: the largest options file or benchmark manifest read (a manifest of thousands of cases is a few hundred KB)
MAX_DOCUMENT_BYTES = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once at import (os.umask can only be read by setting it, which is not thread-safe later on)
_FILE_MODE = 0o666 & ~_umask()
_FOLDER_MODE = 0o777 & ~_umask()


def _write_failed(path, exc: BaseException) -> OutputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    reason = re.sub(r" \(os error \d+\)$", "", reason.split("I/O error: ", 1)[-1])     # safetensors' wording
    return OutputError(f"{path}: not written ({reason})")


def _is_io_error(exc: SafetensorError) -> bool:
    """safetensors reports a failed write (a full disk) as a SafetensorError, not an OSError."""
    return "I/O error" in str(exc)


@contextlib.contextmanager
def _writes_to(path) -> Iterator[None]:
    """A failed write in the body (an OSError, or safetensors' I/O error) as one :class:`OutputError` naming
    ``path``."""
    try:
        yield
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    except SafetensorError as exc:
        if _is_io_error(exc):
            raise _write_failed(path, exc) from exc
        raise


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The file gets the permissions a plain ``open(path, "w")`` would give (mkstemp's are owner-only). A write that
    fails (a full disk, a read-only folder) is an :class:`OutputError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    try:
        with _writes_to(path):
            yield tmp
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_folder(path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the body succeeds, its contents go to ``path``: the
    whole folder is renamed into place if ``path`` does not exist, else each file replaces the one of its name (a
    rename each: no file is ever half there). On error the temporary folder goes, and ``path`` is as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    try:
        with _writes_to(path):
            yield tmp
            os.chmod(tmp, _FOLDER_MODE)
            try:
                os.rename(tmp, path)             # the common case, a new folder: one atomic rename
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    raise
                _merge(tmp, path)
    except OutputError as exc:          # a file inside: named by its place in the folder, not the temporary one
        raise OutputError(str(exc).replace(str(tmp), str(path), 1)) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge(entry, target)
        else:
            os.replace(entry, target)


# ---------------------------------------------------------------------------------------------- inputs


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def readable_file(path, what: str = "file", error: type[Exception] = InputError) -> Path:
    """``path`` if it is a regular file this process can read; else ``error`` saying what it is instead (missing, a
    folder, a FIFO or device, unreadable). Nothing is opened: a FIFO would block, /dev/zero never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {_kind(mode)}, not a {what}")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: cannot be read (permission denied)")
    return path


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``, ``<<: *name``): a few nested aliases expand a 1 KB file into
    gigabytes, and nothing this package reads needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_document(path, what: str = "file", error: type[Exception] = InputError,
                  max_bytes: int = MAX_DOCUMENT_BYTES):
    """The data of a JSON (``.json``) or YAML (any other suffix) file of at most ``max_bytes`` of UTF-8 text; any
    problem is one ``error`` naming the file."""
    path = readable_file(path, what, error)
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{path}: a {what} is at most {max_bytes // 1024} KB; this one is larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        return json.loads(text) if kind == "JSON" else yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise error(f"{path}: not valid {kind} ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise error(f"{path}: {kind} nested too deeply") from None
