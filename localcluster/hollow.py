"""Hollow containers: pods on a hollow node run no process (kubemark's hollow
kubelet, KWOK).

A hollow container follows a schedule read from the pod's annotations under
the reserved :data:`PREFIX`:

* :data:`RUN_SECONDS` — exits this many seconds after it started (absent: it
  runs until the pod is deleted or its node is lost);
* :data:`EXIT_CODE` — the exit code of that exit (default 0);
* :data:`TERMINATION_MESSAGE` — the termination message it leaves (at most
  :data:`trainingjob_trainer.contract.TERMINATION_MESSAGE_MAX_BYTES` bytes, as
  the kubelet truncates the file);
* :data:`IGNORE_SIGTERM` — ``"true"``: SIGTERM is ignored, so a graceful
  deletion ends in SIGKILL (exit 137) after the grace period; otherwise the
  "process" honours SIGTERM at once and exits with
  :data:`SIGTERM_EXIT_CODE` (default 143, 128 + SIGTERM).

It has the same interface as :class:`localcluster.nodeagent.Container`
(``poll``, ``terminate``, ``kill``, ``reap``, ``exit_status``, ...), so the
agent's deletion, preemption, eviction and node-loss paths treat both alike.
"""

from __future__ import annotations

import itertools
import signal
import time
from dataclasses import dataclass
from typing import Mapping

from trainingjob_trainer import contract

from localcluster.controlplane import now_rfc3339
from localcluster.kube import Obj

#: The reserved annotation prefix of the stand-in.
PREFIX = "localcluster.trainingjob.dev/"
RUN_SECONDS = PREFIX + "hollow-run-seconds"
EXIT_CODE = PREFIX + "hollow-exit-code"
TERMINATION_MESSAGE = PREFIX + "hollow-termination-message"
IGNORE_SIGTERM = PREFIX + "hollow-ignore-sigterm"
SIGTERM_EXIT_CODE = PREFIX + "hollow-sigterm-exit-code"
#: ``nodeInfo.containerRuntimeVersion`` of a hollow node.
RUNTIME_VERSION = "localcluster://hollow"

_ids = itertools.count(1)


class ScheduleError(ValueError):
    """A hollow annotation does not parse (the pod stays Pending with this message)."""


def _number(annotations: Mapping[str, str], key: str, default: float | None, kind: type) -> float | None:
    raw = annotations.get(key)
    if raw is None:
        return default
    try:
        value = kind(str(raw).strip())
    except ValueError:
        raise ScheduleError(f"annotation {key}={raw!r}: not a{'n integer' if kind is int else ' number'}") from None
    if value < 0:
        raise ScheduleError(f"annotation {key}={raw!r}: must not be negative")
    return value


@dataclass(frozen=True)
class Schedule:
    """What a hollow container does, parsed from its pod's annotations."""

    run_seconds: float | None = None
    exit_code: int = 0
    message: str = ""
    ignore_sigterm: bool = False
    sigterm_exit_code: int = 128 + signal.SIGTERM

    @classmethod
    def from_pod(cls, pod: Obj) -> "Schedule":
        """Parse the schedule; raises :class:`ScheduleError` on a malformed annotation."""
        ann = (pod.get("metadata") or {}).get("annotations") or {}
        message = str(ann.get(TERMINATION_MESSAGE, ""))
        data = message.encode("utf-8")[: contract.TERMINATION_MESSAGE_MAX_BYTES]
        return cls(
            run_seconds=_number(ann, RUN_SECONDS, None, float),
            exit_code=int(_number(ann, EXIT_CODE, 0, int) or 0),
            message=data.decode("utf-8", "ignore"),
            ignore_sigterm=str(ann.get(IGNORE_SIGTERM, "")).lower() == "true",
            sigterm_exit_code=int(_number(ann, SIGTERM_EXIT_CODE, 128 + signal.SIGTERM, int) or 0),
        )


@dataclass
class HollowContainer:
    """A container of a hollow node: a clock and a schedule, no process."""

    uid: str
    namespace: str
    pod: str
    node: str
    name: str
    schedule: Schedule
    started_at: str
    started: float  # time.monotonic() at start
    term_sent_at: float | None = None
    killed: bool = False
    exit_status: Obj | None = None
    running_reported: bool = False
    container_id: str = ""

    @classmethod
    def start(cls, *, pod: Obj, schedule: Schedule) -> "HollowContainer":
        md, spec = pod["metadata"], pod.get("spec") or {}
        ctr = (spec.get("containers") or [{}])[0]
        return cls(
            uid=md.get("uid", ""), namespace=md.get("namespace", "default"), pod=md["name"], node=spec["nodeName"],
            name=ctr.get("name") or "main", schedule=schedule, started_at=now_rfc3339(), started=time.monotonic(),
            container_id=f"localcluster://hollow-{next(_ids)}",
        )

    def _exit(self, exit_code: int, *, sig: int | None = None, message: str = "") -> None:
        state: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": self.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": self.container_id,
        }
        if sig is not None:
            state["signal"] = sig
        if message:
            state["message"] = message
        self.exit_status = state

    def poll(self) -> int | None:
        """The exit code once the schedule (or a signal) ended it, else None."""
        run = self.schedule.run_seconds
        if self.exit_status is None and run is not None and time.monotonic() - self.started >= run:
            self._exit(self.schedule.exit_code, message=self.schedule.message)
        return None if self.exit_status is None else int(self.exit_status["exitCode"])

    def terminate(self) -> None:
        """SIGTERM: exits at once unless the schedule ignores it."""
        if self.term_sent_at is not None:
            return
        self.term_sent_at = time.monotonic()
        if self.exit_status is None and not self.schedule.ignore_sigterm:
            self._exit(self.schedule.sigterm_exit_code, message=self.schedule.message)

    def kill(self) -> None:
        """SIGKILL: exit 137 (unless it had exited already)."""
        self.killed = True
        if self.exit_status is None:
            self._exit(128 + signal.SIGKILL, sig=signal.SIGKILL)

    def reap(self) -> None:
        """Nothing to wait for: there is no process."""
