"""SIGTERM -> an in-band flag every rank agrees on at the next step boundary.

A pod that is preempted gets SIGTERM (its workers get it from torchrun, see
:mod:`trainingjob_trainer.launch`); the other pods do not. Each rank's
:class:`PreemptionWatcher` records the signal locally, and at every step
boundary the ranks all-reduce (MAX) a tiny integer vector, so all of them
learn at the same step that one was signalled and save together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

from trainingjob_trainer import _dist, contract

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank after the emergency snapshot is committed.

    A ``SystemExit`` whose code is the contract's
    :data:`contract.EXIT_PREEMPTED_AFTER_SNAPSHOT`, so a training script that
    does not catch it exits with the right code.

    Attributes:
        step: The step the emergency snapshot holds.
        snapshot: Its URI.
    """

    def __init__(self, *, step: int, snapshot: str) -> None:
        super().__init__(contract.EXIT_PREEMPTED_AFTER_SNAPSHOT)
        self.step = step
        self.snapshot = snapshot


class PreemptedDuringRestore(SystemExit):
    """Raised at once when SIGTERM arrives while a snapshot is being restored.

    Nothing can be saved yet (the state is half loaded) and nothing is lost
    (no step ran since that snapshot), so the rank exits right away with
    ``128 + SIGTERM``, the code of a process ended by SIGTERM, instead of
    finishing a restore that may take longer than the grace period.

    Attributes:
        snapshot: The snapshot that was being restored.
    """

    def __init__(self, *, snapshot: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.snapshot = snapshot


class PreemptionWatcher:
    """Installs a SIGTERM handler and answers "did any rank get SIGTERM?".

    Args:
        signals: Signals that mean "preempted" (SIGTERM by default).
        install: Install the handlers now (main thread only).
    """

    def __init__(self, *, signals: tuple[int, ...] = (signal.SIGTERM,), install: bool = True) -> None:
        self._event = threading.Event()
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._raise: Callable[[], BaseException] | None = None
        if install:
            self.install()

    def install(self) -> None:
        """Install the handlers (idempotent)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionWatcher: not in the main thread, SIGTERM is not watched")
            return
        for sig in self._signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._event.set()
        if self._raise is not None:
            raise self._raise()

    @contextlib.contextmanager
    def raising(self, make_error: Callable[[], BaseException]) -> Iterator[None]:
        """While active, a signal raises ``make_error()`` in the main thread at once.

        For phases with no step boundary to wait for (a long restore). If this
        rank was signalled already, raises on entry.
        """
        if self.local_flag:
            raise make_error()
        self._raise = make_error
        try:
            yield
        finally:
            self._raise = None

    def trigger(self) -> None:
        """Mark this rank as preempted (what the signal handler does)."""
        self._event.set()

    @property
    def local_flag(self) -> bool:
        """Whether THIS rank was signalled."""
        return self._event.is_set()


def write_termination_message(msg: contract.TerminationMessage, *, path: str | None = None) -> str | None:
    """Write ``msg`` where the contract says (only on local rank 0 of a node).

    Args:
        msg: The message.
        path: Override of ``$TJ_TERMINATION_MESSAGE_PATH``.

    Returns:
        The path written, or ``None`` when no path is configured or this is not
        local rank 0.
    """
    path = path or os.environ.get(contract.ENV_TERMINATION_MESSAGE_PATH)
    if not path or _dist.local_rank() != 0:
        return None
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(contract.format_termination_message(msg))
        os.replace(tmp, path)
    except OSError:  # e.g. /dev/termination-log cannot be renamed over
        with open(path, "w") as f:
            f.write(contract.format_termination_message(msg))
    return path
