"""The ``clic`` command: one module per sub-command, each parsing its options into the library's config dataclasses
(:mod:`clic.cli.options` is the one bridge), calling the Python API and writing the outputs. This package is the
only place that knows argparse, prints and writes output folders; library errors
(:class:`clic.errors.ClicError`), and a full disk or a read-only place met anywhere, become one line on stderr and
exit code 2. Inputs and outputs are checked before any model loads (:mod:`clic.cli.validate`). The library never
imports it.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging

from .. import __version__
from ..errors import ClicError
from . import (baselines, bench, benchmark, demo, discover, evaluate, export, generate, info, learn, make_model,
               match, realfill, transfer, ui)
from .options import Parser

#: the sub-commands, in the order ``clic --help`` lists them
COMMANDS = (learn, transfer, generate, match, discover, export, info, make_model, baselines, realfill, benchmark,
            evaluate, bench, demo, ui)


def build_parser(argv: list[str] | None = None) -> Parser:
    """The ``clic`` parser; ``argv`` lets a command show the values of the recipe it selects in ``--help``."""
    parser = Parser(
        prog="clic", description="CLiC: learn a local visual concept in the context of its object, from one image "
                                 "and a mask, then transfer it to other objects or generate new ones.")
    parser.add_argument("--version", action="version", version=f"clic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, argv)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    """No weight-loading progress bars or library chatter on stderr: errors stay one line."""
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


#: write and read failures of the machine, not of clic (the library reports its own outputs as OutputError)
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _error(message: str) -> int:
    print(f"clic: error: {' '.join(message.splitlines())}", file=sys.stderr)     # always one line
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        _quiet_libraries(args.verbose)
        args.func(args)
        sys.stdout.flush()                     # inside the try: a reader gone away shows up here (below)
    except BrokenPipeError:
        # the reader of our output went away (`clic info c.safetensors | head`): stop quietly, as Unix tools do;
        # stdout goes to /dev/null so that Python's own flush at exit does not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ClicError as exc:
        return _error(str(exc))
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        return _error(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}")
    except MemoryError:
        return _error("out of memory: an input or option asks for more than this machine has")
    except KeyboardInterrupt:
        print("clic: interrupted", file=sys.stderr)
        return 130
    return 0
