"""``python -m mtp_pretrain.torchrun ARGS``: torchrun (``torch.distributed.run``, same arguments) for the
project's launchers, with the failure of a rank reported as one line and passed through as the exit status.

torchrun ends a failed run with a ``ChildFailedError`` traceback and exit status 1 whatever the rank's
status was, hiding the difference between a bad config (2), bad data (4), a bad checkpoint (5) and a stop
after saving (75, the batch script's requeue signal). Here the rank's own ``<command>: error:`` line stays
the message; the launcher adds ``torchrun: error: rank R exited with status C (see its error line above)``
(or ``was killed by SIGNAL``) and exits with C (128 + N for a rank killed by signal N, as a shell reports
it). A signalled torchrun (scancel, Ctrl-C) stops its ranks and exits 128 + N with one line too. It also
tells its ranks its pid (processes.LAUNCHER_PID), so that a rank can tell that it died before the rank
armed its parent-death signal (processes.exit_with_launcher).
"""

from __future__ import annotations

import os
import signal
import sys

from mtp_pretrain.errors import EXIT_BUG
from mtp_pretrain.processes import LAUNCHER_PID


def exit_status(code: int) -> int:
    """A rank's exit status as a shell reports it: 128 + N for death by signal N."""
    return 128 - code if code < 0 else code


def failed_rank(failures: dict[int, int], order: dict[int, float]) -> int:
    """The rank whose status the launcher reports among ``failures`` (rank -> exit code): the first to fail
    (``order``: rank -> time) of those that reported an error of their own; a rank that exited 1 (a bug or,
    mostly, a peer that died) or was killed by a signal only when no rank did."""

    def key(rank: int) -> tuple[bool, float, int]:
        code = failures[rank]
        return (code == EXIT_BUG or code < 0, order.get(rank, 0.0), rank)

    return min(failures, key=key)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers inherit the agent's environment
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        rank = failed_rank(codes, {r: f.timestamp for r, f in e.failures.items()})
        code, status = codes[rank], exit_status(codes[rank])
        what = (
            f"was killed by {signal.Signals(-code).name} (status {status})"
            if code < 0
            else f"exited with status {status} (see its error line above)"
        )
        print(f"torchrun: error: rank {rank} {what}", file=sys.stderr, flush=True)
        sys.exit(status)
    except SignalException as e:  # torchrun was signalled (scancel, Ctrl-C): it stopped its ranks
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
