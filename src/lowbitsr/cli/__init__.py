"""The ``lowbitsr`` command line: parses arguments and calls the library (no logic of its own).

Every user error (bad path, corrupt image, wrong checkpoint, bad config) is printed as one line
``lowbitsr: error: ...`` with exit status 2.

Modules: :mod:`.parser` (:func:`build_parser`), :mod:`.commands` (one function per
sub-command); :func:`main` here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import LowbitsrError
from ..specs import parse_dataset_spec
from .commands import _for_cli, _leave_process_group
from .parser import build_parser

__all__ = ["build_parser", "main", "parse_dataset_spec"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbitsr`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    flags: frozenset[str] = args.cli_flags
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
            from ..distributed import init_from_env

            if not init_from_env(getattr(args, "device", "cpu")).is_main:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone prints
        status = int(args.func(args))
        _leave_process_group()
        return status
    except LowbitsrError as exc:
        print(f"lowbitsr: error: {_for_cli(str(exc), flags)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks above could not foresee (disk full, races, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lowbitsr: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lowbitsr: interrupted (a resumable checkpoint is kept for train/quantize)",
            file=sys.stderr,
        )
        return 130
