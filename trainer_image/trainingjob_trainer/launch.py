"""The pod entrypoint: run torchrun, forward SIGTERM, report per the contract.

Usage (what the operator puts in the container)::

    python -m trainingjob_trainer.launch [torchrun flags] -m acme.train --lr 3e-4
    python -m trainingjob_trainer.launch [torchrun flags] train.py --lr 3e-4

torchrun takes its settings from the ``PET_*`` env the operator sets, so no
flags are needed inside a pod. In a container SIGTERM reaches only PID 1 (this
launcher); it is forwarded to torchrun, which forwards it to its workers,
whose :class:`~trainingjob_trainer.preemption.PreemptionWatcher` raises the
in-band flag. Exit status:

* the workers wrote a ``PreemptedAfterSnapshot`` termination message ->
  :data:`contract.EXIT_PREEMPTED_AFTER_SNAPSHOT` (also on the node that did
  not get SIGTERM, whose torchrun sees its workers "fail");
* torchrun succeeded -> 0 (a ``Completed`` message if the job wrote none);
* SIGTERM without an emergency snapshot -> 128+SIGTERM with a
  ``PreemptedWithoutSnapshot`` message;
* anything else -> torchrun's code with an ``Error`` message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

from trainingjob_trainer import contract


def _termination_path() -> str | None:
    return os.environ.get(contract.ENV_TERMINATION_MESSAGE_PATH) or None


def _read_message(path: str | None) -> contract.TerminationMessage | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return contract.parse_termination_message(f.read())
    except OSError:
        return None


def _write_message(path: str | None, msg: contract.TerminationMessage) -> None:
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(contract.format_termination_message(msg))
    except OSError as e:
        print(f"[launch] cannot write termination message to {path}: {e}", file=sys.stderr, flush=True)


def _grace_seconds() -> float | None:
    try:
        return float(os.environ[contract.ENV_GRACE_PERIOD_SECONDS])
    except (KeyError, ValueError):
        return None


def _read_progress(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def decide_exit(
    *, torchrun_rc: int, message: contract.TerminationMessage | None, got_sigterm: bool,
    last_step: int | None = None,
) -> tuple[int, contract.TerminationMessage | None]:
    """The launcher's exit code and the message to write (``None``: keep the workers').

    ``last_step`` is the last step the workers reported completing; it goes
    into the message when the workers wrote none (they were killed, or died
    in a collective when a peer node was lost). Pure function of what
    happened, so it is unit-tested without processes.
    """
    if message is not None and message.step is None and last_step is not None:
        message = contract.TerminationMessage(reason=message.reason, step=last_step, snapshot=message.snapshot,
                                              message=message.message)
    elif message is None and last_step is not None and torchrun_rc != 0:
        message = contract.TerminationMessage(reason=contract.TERM_REASON_ERROR, step=last_step)
    if message is not None and message.reason == contract.TERM_REASON_PREEMPTED:
        return contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, None
    if torchrun_rc == 0:
        if message is None:
            return contract.EXIT_OK, contract.TerminationMessage(reason=contract.TERM_REASON_COMPLETED)
        return contract.EXIT_OK, None
    if got_sigterm:
        return 128 + signal.SIGTERM, contract.TerminationMessage(
            reason=contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT,
            step=message.step if message else None,
            message=f"SIGTERM before an emergency snapshot was committed (torchrun exit {torchrun_rc})",
        )
    return torchrun_rc or 1, contract.TerminationMessage(
        reason=contract.TERM_REASON_ERROR,
        step=message.step if message else None,
        message=f"torchrun exited with {torchrun_rc}" + (f": {message.message}" if message and message.message else ""),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchrun <argv>`` and return the contract exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m trainingjob_trainer.launch [torchrun flags] (-m module | script.py) [args]",
              file=sys.stderr)
        return 2
    path = _termination_path()
    if path and os.path.isfile(path):
        open(path, "w").close()  # a previous run's message must not be mistaken for ours
    progress = os.path.join(tempfile.gettempdir(), f"tj-progress-{os.getpid()}")
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv],
                             env={**os.environ, contract.ENV_PROGRESS_FILE: progress})
    got = {"sigterm": False}

    def before_sigkill() -> None:
        # The kubelet SIGKILLs at the end of the grace period: if the gang has
        # not committed its emergency snapshot by then, say so (with the step
        # reached) while we still can. A later message from the workers wins.
        msg = _read_message(path)
        if msg is None or msg.reason != contract.TERM_REASON_PREEMPTED:
            _write_message(path, contract.TerminationMessage(
                reason=contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT, step=_read_progress(progress),
                message="the grace period ended before an emergency snapshot was committed"))

    def forward(signum: int, frame: object) -> None:  # noqa: ARG001
        if signum == signal.SIGTERM and not got["sigterm"]:
            got["sigterm"] = True
            grace = _grace_seconds()
            if grace is not None:
                timer = threading.Timer(max(0.5, grace - 2.0), before_sigkill)
                timer.daemon = True
                timer.start()
        print(f"[launch] got signal {signum}, forwarding to torchrun (pid {child.pid})", flush=True)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    code, msg = decide_exit(torchrun_rc=rc, message=_read_message(path), got_sigterm=got["sigterm"],
                            last_step=_read_progress(progress))
    try:
        os.unlink(progress)
    except OSError:
        pass
    if msg is not None:
        _write_message(path, msg)
    print(f"[launch] torchrun exited {rc}; exiting {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
