"""Expected failures and the one way every command reports them: ``<command>: error: <one line>``.

An *expected* failure is bad input the user can fix (a config value, a data shard, a file argument, a
checkpoint); it subclasses :class:`MTPError`, whose class fixes the exit status. Anything else is a bug and
keeps its traceback. ``--debug`` (argparse commands) or ``HYDRA_FULL_ERROR=1`` (mtp-train) shows the
traceback of an expected failure too.

Exit statuses (README "Exit codes"):
    0   done
    1   a bug (traceback), or a rank that lost its peers after another rank failed
    2   bad configuration, arguments or input files (usage)
    3   training diverged (non-finite loss)
    4   bad training or validation data
    5   a checkpoint that is missing, corrupt or does not fit
    75  stopped on request (preemption) after saving: requeue and resume
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_DATA = 4
EXIT_CHECKPOINT = 5
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the launcher requeues, the run resumes


class MTPError(Exception):
    """An expected failure; the message is one line naming the thing and the fix."""

    exit_code = EXIT_USAGE


class UsageError(MTPError, ValueError):
    """A bad argument, config value or input file."""

    exit_code = EXIT_USAGE


class DataError(MTPError, RuntimeError):
    """Training or validation data that cannot be read (a shard, a sample, a URL)."""

    exit_code = EXIT_DATA


def one_line(message: str) -> str:
    """``message`` with its whitespace (newlines included) collapsed: an error is reported on one line."""
    return " ".join(str(message).split())


def debug_requested() -> bool:
    """Whether the environment asks for tracebacks (``HYDRA_FULL_ERROR=1``); argparse commands also take
    ``--debug`` (:func:`reported`'s ``debug``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report(prog: str, error: BaseException) -> None:
    """Print the one error line of ``error`` for command ``prog`` on stderr."""
    print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr, flush=True)


def fail(prog: str, error: BaseException) -> NoReturn:
    """Report and exit: with the status an :class:`MTPError` carries, else as a usage error."""
    report(prog, error)
    sys.exit(error.exit_code if isinstance(error, MTPError) else EXIT_USAGE)


@contextmanager
def reported(prog: str, also: tuple[type[BaseException], ...] = (), debug: bool = False) -> Iterator[None]:
    """Run a command body: an :class:`MTPError` (or one of ``also``, reported as usage errors) ends it with
    one error line and its exit status, unless tracebacks were asked for (``debug``, :func:`debug_requested`)."""
    try:
        yield
    except (MTPError, *also) as e:
        if debug or debug_requested():
            raise
        fail(prog, e)
