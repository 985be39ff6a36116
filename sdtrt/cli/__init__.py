"""sdtrt: Stable Diffusion img2img on TensorRT, ONNX Runtime and PyTorch.

Start with `sdtrt img2img` (the seed notebook's run on the embedded tiny model), then
`sdtrt export` a model to ONNX, `sdtrt build` TensorRT engines from it, `sdtrt check` a
backend against PyTorch and `sdtrt bench` them side by side. Folders optimum exported run
as they are (`sdtrt adopt` stores their manifest). `sdtrt COMMAND --help` lists each
command's options with their defaults."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from sdtrt.cli.bench import add_bench
from sdtrt.cli.graphs import add_adopt, add_build, add_check, add_export
from sdtrt.cli.img2img import add_img2img
from sdtrt.cli.serve import add_bench_serve, add_serve
from sdtrt.errors import EngineBuildError, SdtrtError
from sdtrt.source import expand_home


def build_parser() -> argparse.ArgumentParser:
    from sdtrt import __version__

    parser = argparse.ArgumentParser(
        prog="sdtrt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_img2img,
    add_export,
    add_build,
    add_check,
    add_bench,
    add_adopt,
    add_serve,
    add_bench_serve,
]


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``docker stop``, a job scheduler's time limit). A
    BaseException, as KeyboardInterrupt is, so that nothing catches it on the way out."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a command as Ctrl-C does, through its cleanup: a half-written export,
    engine or cache entry is removed rather than left beside its destination (the default
    action kills the process where it stands). In the main thread only; the handler that
    was there before is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# The options that name files or folders (options.expand_home says why).
_PATH_OPTIONS = (
    "model", "config", "reference", "image", "out", "json", "plot", "profile", "engine_dir",
    "folder",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in _PATH_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, expand_home(getattr(args, name)))
    # Our INFO lines, but only the warnings of the exporters' chatty loggers.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdtrt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with terminate_as_interrupt():
            return int(args.handler(args))
    except EngineBuildError as exc:  # not the user's input: the graph or TensorRT failed
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 1
    except SdtrtError as exc:
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk (an SD export takes gigabytes) is the machine's state, not a bug:
        # one line, as for bad input. Every writer cleans up its temporary files.
        where = f" (writing {exc.filename})" if exc.filename else ""
        print(
            f"sdtrt: error: {exc.strerror}{where}; nothing half-written was kept: free some "
            "space, or write elsewhere, and run again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("sdtrt: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
