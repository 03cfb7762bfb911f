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
        make_error, self._raise = self._raise, None  # raise once, even if the signal comes twice
        if make_error is not None:
            raise make_error()

    @contextlib.contextmanager
    def raising(self, make_error: Callable[[], BaseException]) -> Iterator[None]:
        """While active, a signal raises ``make_error()`` in the main thread at once.

        For phases with no step boundary to wait for (a long restore). If this
        rank was signalled already, raises on entry.

        Python runs a signal handler in the main thread, when that thread
        next executes bytecode; a process-directed SIGTERM that the kernel
        hands to another thread (an S3 or upload thread) leaves a main thread
        blocked in a lock wait asleep until the wait ends, which in a restore
        is when the read finishes. So while this is active, a relay thread
        watches the signal wakeup fd (written by the C-level handler, whatever
        thread caught the signal) and re-sends the signal to the main thread
        with ``pthread_kill``, which interrupts its wait.
        """
        if self.local_flag:
            raise make_error()
        self._raise = make_error
        relay = _MainThreadRelay(self._signals, self._event) if _in_main_thread() else None
        try:
            yield
        finally:
            self._raise = None
            if relay is not None:
                relay.stop()

    def trigger(self) -> None:
        """Mark this rank as preempted (what the signal handler does)."""
        self._event.set()

    @property
    def local_flag(self) -> bool:
        """Whether THIS rank was signalled."""
        return self._event.is_set()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _MainThreadRelay:
    """Re-sends ``signals`` to the main thread until :meth:`stop` (see
    :meth:`PreemptionWatcher.raising`). Signal numbers arrive on the wakeup
    fd of :func:`signal.set_wakeup_fd`; a previous wakeup fd (asyncio's, say)
    gets every byte too."""

    def __init__(self, signals: tuple[int, ...], handled: threading.Event) -> None:
        self._signals = set(signals)
        self._handled = handled
        self._stopping = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._previous = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="tj-signal-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = os.read(self._r, 64)
            if self._stopping or not data:
                return
            if self._previous >= 0:
                try:
                    os.write(self._previous, data)
                except OSError:
                    pass
            # Not handled yet: the main thread did not get it (or has not run since).
            if any(b in self._signals for b in data) and not self._handled.is_set() and self._main is not None:
                signal.pthread_kill(self._main, next(b for b in data if b in self._signals))

    def stop(self) -> None:
        signal.set_wakeup_fd(self._previous)
        self._stopping = True
        os.write(self._w, b"\0")
        self._thread.join()
        os.close(self._r)
        os.close(self._w)


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
