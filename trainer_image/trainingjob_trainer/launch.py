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
* the workers wrote a ``SnapshotStorageError`` message (unknown bucket,
  refused credentials) -> :data:`contract.EXIT_SNAPSHOT_CONFIG_ERROR`;
* anything else -> torchrun's code with an ``Error`` message that carries
  the last lines of the workers' output (the cause, not "torchrun exited 1").

The emergency snapshot's time: torchrun SIGKILLs its workers
``--shutdown-timeout`` seconds after it forwards SIGTERM (30 s by default,
whatever the pod's grace period). The launcher sets
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` to the pod's grace period
(:data:`contract.ENV_GRACE_PERIOD_SECONDS`) minus :data:`EXIT_MARGIN_SECONDS`,
so the save has the whole grace period but the margin; a timeout the user set
(the flag, ``PET_SHUTDOWN_TIMEOUT`` or the variable) wins.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from typing import IO, Sequence

from trainingjob_trainer import contract


#: Seconds of the grace period kept back for the exit after the emergency
#: snapshot: torchrun's SIGKILL of stragglers, its exit, this launcher's
#: termination message. The save itself gets ``grace - EXIT_MARGIN_SECONDS``.
EXIT_MARGIN_SECONDS = 10
#: torchrun's own shutdown-timeout setting (flag, its ``PET_`` env, the variable).
TORCHRUN_SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
_SHUTDOWN_FLAGS = ("--shutdown-timeout", "--shutdown_timeout")
#: Output lines kept for the termination message of a failed run.
TAIL_LINES = 200
_CAUSE_LINES = 12
_CAUSE_CHARS = 3000


def shutdown_timeout(grace: float | None) -> int | None:
    """torchrun's worker shutdown timeout for a pod grace period of ``grace`` s.

    ``grace - EXIT_MARGIN_SECONDS``, but at least half the grace period when
    the grace period is shorter than twice the margin (and at least 1 s);
    ``None`` without a grace period (torchrun's default then applies).
    """
    if grace is None:
        return None
    return max(1, int(grace - EXIT_MARGIN_SECONDS), int(grace // 2)) if grace > 0 else 1


def torchrun_env(argv: Sequence[str], environ: dict[str, str]) -> dict[str, str]:
    """The env for torchrun: the shutdown timeout from the grace period unless the user set one."""
    env = dict(environ)
    user_set = any(a in _SHUTDOWN_FLAGS or a.split("=", 1)[0] in _SHUTDOWN_FLAGS for a in argv) \
        or "PET_SHUTDOWN_TIMEOUT" in env or TORCHRUN_SHUTDOWN_ENV in env
    timeout = shutdown_timeout(_grace_seconds(env))
    if not user_set and timeout is not None:
        env[TORCHRUN_SHUTDOWN_ENV] = str(timeout)
    return env


def cause_lines(lines: Sequence[str], *, limit: int = _CAUSE_LINES) -> str:
    """The last lines of the workers' output that say why the run failed.

    torchrun's own report (its traceback, ``ChildFailedError`` or
    ``SignalException``, and the failure table after it) and its warnings
    are dropped: they name the exit code, not the cause.
    """
    lines = [ln.rstrip() for ln in lines]
    for i, ln in enumerate(lines):
        if ln.startswith("Traceback") and any("torch/distributed/run.py" in x for x in lines[i + 1:i + 6]):
            lines = lines[:i]  # torchrun's own traceback and its failure table
            break
    kept = [ln for ln in lines if ln.strip() and not _NOISE.search(ln)]
    return "\n".join(kept[-limit:])[-_CAUSE_CHARS:]  # the end is the cause; the message must fit 4 KiB


_NOISE = re.compile(r"^\[launch\]|^W\d{4} .*torch/distributed/elastic")


def _tee(src: IO[bytes], tail: collections.deque) -> None:
    """Copy the child's output to ours line by line, keeping the last lines."""
    out = sys.stdout.buffer
    for raw in iter(src.readline, b""):
        out.write(raw)
        out.flush()
        tail.append(raw.decode(errors="replace"))
    src.close()


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


def _grace_seconds(environ: dict[str, str] | None = None) -> float | None:
    try:
        return float((os.environ if environ is None else environ)[contract.ENV_GRACE_PERIOD_SECONDS])
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
    last_step: int | None = None, output_tail: str = "",
) -> tuple[int, contract.TerminationMessage | None]:
    """The launcher's exit code and the message to write (``None``: keep the workers').

    ``last_step`` is the last step the workers reported completing; it goes
    into the message when the workers wrote none (they were killed, or died
    in a collective when a peer node was lost). ``output_tail`` (the cause's
    last lines, :func:`cause_lines`) goes into the message of a failure
    or of a preemption without snapshot. Pure function of what
    happened, so it is unit-tested without processes.
    """
    if message is not None and message.step is None and last_step is not None:
        message = dataclasses.replace(message, step=last_step)
    elif message is None and last_step is not None and torchrun_rc != 0:
        message = contract.TerminationMessage(reason=contract.TERM_REASON_ERROR, step=last_step)
    if message is not None and message.reason == contract.TERM_REASON_PREEMPTED:
        return contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, None
    if message is not None and message.reason == contract.TERM_REASON_SNAPSHOT_CONFIG_ERROR:
        return contract.EXIT_SNAPSHOT_CONFIG_ERROR, None
    if torchrun_rc == 0:
        if message is None:
            return contract.EXIT_OK, contract.TerminationMessage(reason=contract.TERM_REASON_COMPLETED)
        return contract.EXIT_OK, None
    tail = f"\n{output_tail}" if output_tail else ""
    if message is not None and message.reason == contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT and message.message:
        # The workers said why (a failed emergency save names its error).
        return 128 + signal.SIGTERM, dataclasses.replace(message, message=message.message + tail)
    if got_sigterm:
        return 128 + signal.SIGTERM, contract.TerminationMessage(
            reason=contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT,
            step=message.step if message else None,
            message=f"SIGTERM before an emergency snapshot was committed (torchrun exit {torchrun_rc})" + tail,
        )
    return torchrun_rc or 1, contract.TerminationMessage(
        reason=contract.TERM_REASON_ERROR,
        step=message.step if message else None,
        message=f"torchrun exited with {torchrun_rc}" + (f": {message.message}" if message and message.message else "")
        + tail,
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
    env = torchrun_env(argv, {**os.environ, contract.ENV_PROGRESS_FILE: progress})
    if TORCHRUN_SHUTDOWN_ENV in env:
        print(f"[launch] torchrun shutdown timeout {env[TORCHRUN_SHUTDOWN_ENV]}s "
              f"(grace period {os.environ.get(contract.ENV_GRACE_PERIOD_SECONDS, 'unset')}s)", flush=True)
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    tee = threading.Thread(target=_tee, args=(child.stdout, tail), daemon=True)
    tee.start()
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
    tee.join(timeout=5)
    code, msg = decide_exit(torchrun_rc=rc, message=_read_message(path), got_sigterm=got["sigterm"],
                            last_step=_read_progress(progress), output_tail=cause_lines(list(tail)) if rc else "")
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
