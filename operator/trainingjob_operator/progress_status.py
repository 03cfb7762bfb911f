"""``status.progress`` and ``status.goodput`` from the trainer's progress object (pure).

The trainer's global rank 0 writes ``_tj/progress.json``
(:class:`trainingjob_trainer.contract.Progress`); the operator reads it in the
snapshot listing's pass (:mod:`.snapshots`) and :func:`update` folds it into
the status reconcile computed. No clock is read: every figure is as of the
progress object's own ``updatedAt``, so a pass with the same object changes
nothing, and the status is written only when a new object was read.

Terms (docs/architecture.md, "Progress and goodput", defines them for users):

* an attempt's **active seconds** ``A = wallSeconds - stalledSeconds``: time
  since its first step boundary not blocked in snapshot code;
* its **seconds per step** ``c = A / (step - startStep - 1)``: the steps
  completed after that first boundary;
* while it runs, ``A`` is **productive** and ``stalledSeconds`` is lost;
* when it has ended (at ``lastDisruption.at``, or at its last progress when
  no disruption ended it) and the next attempt that trains has reported its
  first step, the steps that attempt resumed past (``k = next startStep -
  startStep - 1``) stay productive, ``min(k * c, A_end)``; the rest of the
  ended attempt's active time ``A_end`` (its last ``A``, or the time from its
  first boundary to its end less its stalls, whichever is longer) is
  **re-done** work; the time from the disruption to the next attempt's first
  step is **recovery**. Lost = re-done + recovery + stalled; goodput percent
  = productive / (productive + lost).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Mapping

from trainingjob_trainer import contract

from .classify import parse_time

#: A progress object larger than this is not read (it is a few hundred bytes).
MAX_PROGRESS_BYTES = 64 * 1024
#: A progress object whose first step is this long before the attempt's gang was
#: created belongs to an earlier job of the same name (clock skew allowance).
CLOCK_SKEW_SECONDS = 30.0
#: Largest step or total accepted (JSON integers past this lose precision).
MAX_STEP = 2**53
#: Largest seconds figure accepted, and the furthest ETA shown (about 30 years).
MAX_SECONDS = 1e9
_TERMINAL = ("Succeeded", "Failed")
_SECONDS = ("productiveSeconds", "redoneSeconds", "recoverySeconds", "stalledSeconds")


def _finite(x: float | None, *, allow_none: bool = True) -> bool:
    if x is None:
        return allow_none
    return math.isfinite(x) and 0 <= x <= MAX_SECONDS


def _aware_time(value: str | None) -> bool:
    t = parse_time(value)
    return t is not None and t.tzinfo is not None


def usable(p: contract.Progress | None) -> contract.Progress | None:
    """``p`` if every figure is in range (non-negative, finite, parseable times), else ``None``.

    The object is written by the job's own code path in the pods: nothing in
    it may make the status unwritable (NaN, negative numbers, huge integers).
    """
    if p is None:
        return None
    ints_ok = all(0 <= v < MAX_STEP for v in (p.attempt, p.step, p.start_step)) and p.start_step <= p.step
    total_ok = p.total_steps is None or 0 < p.total_steps < MAX_STEP
    floats_ok = all(_finite(v, allow_none=False) for v in (p.wall_seconds, p.stalled_seconds)) \
        and _finite(p.steps_per_second)
    times_ok = _aware_time(p.updated_at) and (p.first_step_at is None or _aware_time(p.first_step_at))
    return p if ints_ok and total_ok and floats_ok and times_ok else None


def _iso(t: dt.datetime) -> str:
    """RFC 3339 UTC, rounded to the nearest second."""
    t = t.astimezone(dt.timezone.utc) + dt.timedelta(microseconds=500_000)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_view(p: contract.Progress) -> dict[str, Any]:
    """``status.progress`` for progress object ``p`` (percent and ETA where the total is known)."""
    view: dict[str, Any] = {
        "attempt": p.attempt, "step": p.step, "startStep": p.start_step, "updatedAt": p.updated_at,
        "wallSeconds": round(p.wall_seconds, 1), "stalledSeconds": round(p.stalled_seconds, 1),
    }
    if p.first_step_at:
        view["firstStepAt"] = p.first_step_at
    if p.steps_per_second is not None:
        view["stepsPerSecond"] = round(p.steps_per_second, 4)
    if p.total_steps:
        view["totalSteps"] = p.total_steps
        view["percent"] = round(min(100.0, 100.0 * p.step / p.total_steps), 1)
        left = max(0, p.total_steps - p.step)
        updated = parse_time(p.updated_at)
        assert updated is not None  # usable() checked it
        if left == 0:
            view["eta"] = _iso(updated)
        elif p.steps_per_second and left / p.steps_per_second <= MAX_SECONDS:
            view["eta"] = _iso(updated + dt.timedelta(seconds=round(left / p.steps_per_second)))
    return view


@dataclass(frozen=True)
class Run:
    """What the operator last read of one attempt (a ``status.progress``)."""

    start_step: int
    step: int
    wall_seconds: float
    stalled_seconds: float
    first_step_at: dt.datetime | None

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> "Run | None":
        try:
            return cls(start_step=int(view["startStep"]), step=int(view["step"]),
                       wall_seconds=float(view["wallSeconds"]), stalled_seconds=float(view["stalledSeconds"]),
                       first_step_at=parse_time(view.get("firstStepAt")))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def active_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.stalled_seconds)


def ended_attempt_seconds(run: Run | None, *, ended_at: dt.datetime | None, next_start_step: int | None,
                          next_first_step_at: dt.datetime | None) -> dict[str, float]:
    """Productive, re-done, recovery and stalled seconds of one ended attempt (see the module doc).

    Args:
        run: The attempt's last progress the operator read (``None``: it
            never reported one; its work is then unknown and not counted).
        ended_at: When a disruption ended it (``None``: no disruption, e.g.
            a suspension or the job's end: no recovery is counted).
        next_start_step: The step the next attempt that trained resumed from
            (``None``: no attempt followed; every step it ran is kept).
        next_first_step_at: That attempt's first step boundary.
    """
    out = dict.fromkeys(_SECONDS, 0.0)
    if ended_at is not None and next_first_step_at is not None:
        out["recoverySeconds"] = max(0.0, (next_first_step_at - ended_at).total_seconds())
    if run is None:
        return out
    active = run.active_seconds
    if ended_at is not None and run.first_step_at is not None:
        active = max(active, (ended_at - run.first_step_at).total_seconds() - run.stalled_seconds)
    out["stalledSeconds"] = run.stalled_seconds
    if next_start_step is None:
        out["productiveSeconds"] = run.active_seconds
        return out
    done = run.step - run.start_step - 1
    kept = max(0, next_start_step - run.start_step - 1)
    per_step = run.active_seconds / done if done > 0 else None
    productive = min(active, kept * per_step) if per_step is not None else 0.0
    out["productiveSeconds"] = productive
    out["redoneSeconds"] = max(0.0, active - productive)
    return out


def goodput_view(ended: Mapping[str, float], live: Run | None) -> dict[str, Any]:
    """``status.goodput`` from the ended attempts' sums and the running attempt's last progress."""
    productive = float(ended.get("productiveSeconds", 0.0)) + (live.active_seconds if live else 0.0)
    stalled = float(ended.get("stalledSeconds", 0.0)) + (live.stalled_seconds if live else 0.0)
    redone, recovery = float(ended.get("redoneSeconds", 0.0)), float(ended.get("recoverySeconds", 0.0))
    lost = redone + recovery + stalled
    view: dict[str, Any] = {
        "productiveSeconds": round(productive, 1), "lostSeconds": round(lost, 1),
        "redoneSeconds": round(redone, 1), "recoverySeconds": round(recovery, 1), "stalledSeconds": round(stalled, 1),
    }
    if productive + lost > 0:
        view["percent"] = round(100.0 * productive / (productive + lost), 1)
    return view


def _accepted(p: contract.Progress | None, status: Mapping[str, Any]) -> contract.Progress | None:
    """``p`` if it can be this job's: a usable object whose first step is not before its attempt's gang."""
    p = usable(p)
    if p is None:
        return None
    started = parse_time(status.get("attemptStartTime")) if p.attempt == status.get("attempt") else None
    first = parse_time(p.first_step_at)
    if started is not None and first is not None and (started - first).total_seconds() > CLOCK_SKEW_SECONDS:
        return None  # left by an earlier job of the same namespace/name
    return p


def update(status: dict[str, Any], *, progress: contract.Progress | None) -> None:
    """Fold a progress object read from S3 into ``status`` (in place; idempotent).

    Only the current attempt's object is shown in ``status.progress``; when
    the attempt moves on, the ended attempt's last progress waits in
    ``status.goodputLedger.endedAttempt`` until the next attempt that trains
    reports its first step (what it resumed from, and when), and is then added
    to the sums in ``status.goodputLedger.endedAttempts``.

    Args:
        status: The status reconcile computed (``attempt``, ``phase``,
            ``lastDisruption``, ``attemptStartTime`` are read).
        progress: The object in S3 (``None``: absent or unreadable).
    """
    attempt = int(status.get("attempt") or 0)
    ledger = status.get("goodputLedger") or {}
    ended = dict(ledger.get("endedAttempts") or {})
    pending = copy.deepcopy(ledger["endedAttempt"]) if ledger.get("endedAttempt") else None
    shown = status.get("progress")
    if shown and shown.get("attempt") != attempt:
        status.pop("progress")
        if pending is None:  # the attempt that trained last ended: keep it for the fold
            last = status.get("lastDisruption") or {}
            pending = {"attempt": shown.get("attempt"), "run": shown}
            if last.get("attempt") == shown.get("attempt") and last.get("at"):
                pending["endedAt"] = last["at"]
    p = _accepted(progress, status)
    if p is not None and pending is not None and p.attempt == pending.get("attempt"):
        pending["run"] = progress_view(p)  # the ended attempt's last write, read late
    if p is not None and p.attempt == attempt:
        if pending is not None:
            _fold(ended, pending, next_start_step=p.start_step, next_first_step_at=parse_time(p.first_step_at))
            pending = None
        status["progress"] = progress_view(p)
    if pending is not None and status.get("phase") in _TERMINAL:
        _fold(ended, pending, next_start_step=None, next_first_step_at=None)
        pending = None
    live = Run.from_view(status["progress"]) if status.get("progress") else None
    if live is None and not ended and pending is None:
        status.pop("goodput", None)
        status.pop("goodputLedger", None)
        return
    status["goodput"] = goodput_view(ended, live)
    status["goodputLedger"] = {"endedAttempts": {k: round(float(ended.get(k, 0.0)), 3) for k in _SECONDS}}
    if pending is not None:
        status["goodputLedger"]["endedAttempt"] = pending


def _fold(ended: dict[str, Any], pending: Mapping[str, Any], *, next_start_step: int | None,
          next_first_step_at: dt.datetime | None) -> None:
    run = Run.from_view(pending["run"]) if pending.get("run") else None
    add = ended_attempt_seconds(run, ended_at=parse_time(pending.get("endedAt")), next_start_step=next_start_step,
                                next_first_step_at=next_first_step_at)
    for k, v in add.items():
        ended[k] = float(ended.get(k, 0.0)) + v
