"""The one pure reconcile: (job, observed world) -> plan.

Level-triggered: the plan is computed only from the TrainingJob (spec and the
status the operator wrote before), the pods and services that exist, the
nodes, and what S3 says about snapshots. It performs no I/O. The handlers
gather :class:`Observed`, call :func:`reconcile`, write ``plan.status`` (only
when it changed), then execute ``plan.actions``; status goes FIRST, so a
decision (a counted preemption, a new attempt number) is recorded before the
world is changed and a crash between the two repeats the actions, never the
decision. Running reconcile again on the result changes nothing more: the
status is the same and the actions are idempotent (creates of deterministic
names, deletes of what is already going).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainingjob_trainer import contract

from . import builders, progress_status, snapshot_requests
from .classify import (
    FAIL_JOB, FAILURE, PERMANENT_WAITING_REASONS, PREEMPTION, SUCCESS, TRANSIENT, WAITING_REASONS, NodeView, Outcome,
    PodView, classify, node_suspect, parse_time, short_text,
)
from .conditions import get_condition, set_condition
from .model import JobSpec, SpecError, parse_spec, validate

# Phases
PENDING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed",
)
TERMINAL = (SUCCEEDED, FAILED)
#: A job with ``spec.snapshot.progressSeconds`` is looked at once per that period, at most this often
#: (the snapshot listing's own minimum reuse: ``snapshots.SnapshotReader.min_interval``).
PROGRESS_MIN_REFRESH_SECONDS = 3.0

# Reasons (CamelCase constants, used in status, conditions and Events)
R_INVALID_SPEC = "InvalidSpec"
R_CREATING = "CreatingGang"
R_GANG_CREATED = "GangCreated"
#: The storage fence of an attempt could not be written before its pods (handlers, issue 11 item 4).
R_FENCE_NOT_WRITTEN = "FenceNotWritten"
R_RUNNING = "AllWorkersReady"
R_WAITING_WORKERS = "WaitingForWorkers"
R_SUCCEEDED = "AllWorkersSucceeded"
R_PREEMPTED = "Preempted"
R_FAILED_RESTART = "WorkerFailed"
R_FENCING = "FencingPreviousAttempt"
R_BACKOFF = "BackoffBeforeRestart"
R_PREEMPTION_BUDGET = "PreemptionBudgetExhausted"
R_FAILURE_BUDGET = "FailureBudgetExhausted"
R_SUSPENDED = "Suspended"
R_RESUMED = "Resumed"
R_SECRET_MISSING = "CredentialsSecretNotReady"
R_SNAPSHOT_STALLED = "NoNewSnapshot"
R_SNAPSHOT_OK = "SnapshotsCurrent"
R_CREATE_FAILED = "CreateFailed"

R_TRANSIENT = "TransientRestart"
R_UNSCHEDULABLE = "Unschedulable"
R_SERVICE_RECREATED = "ServiceRecreated"
R_SUSPENDED_BY_QUEUE = "SuspendedByKueue"
R_FENCING_STUCK = "FencingStuck"
R_FENCING_DONE = "PreviousAttemptGone"
R_NODE_NOT_READY = "NodeNotReady"
R_WORKERS_NOT_READY = "WorkersNotReady"

_CAMEL = re.compile(r"[A-Z][A-Za-z0-9]*")
#: How long a restart waits for an unreadable snapshot folder before starting
#: the new gang anyway (the trainer then picks the latest complete snapshot).
SNAPSHOT_STATUS_WAIT_SECONDS = 60


@dataclass(frozen=True)
class SnapshotState:
    """What the operator read from the job's S3 folder."""

    latest: Mapping[str, Any] | None = None  # uri, epoch, step, savedAt, bytes, seconds, emergency
    count: int = 0
    #: Seconds between the two newest complete snapshots (the expected interval).
    interval_seconds: float | None = None
    #: The gang attempt that wrote ``latest`` (from its commit marker).
    latest_attempt: int | None = None
    error: str | None = None
    #: The trainer's ``_tj/progress.json`` as last read (``None``: absent or unreadable).
    progress: contract.Progress | None = None
    #: Its ETag: it is read again only when the listing shows another one.
    progress_etag: str | None = None
    #: The snapshot-request and ack objects (``_tj/``) of the same listing.
    live: snapshot_requests.LiveState | None = None


@dataclass(frozen=True)
class CreateError:
    """The API server refused a pod or Service the last plan asked for."""

    kind: str
    name: str
    status: int
    #: ``the API server rejected Pod x: 422 Invalid: ...`` (credentials masked).
    message: str
    #: The attempt the refused object belonged to.
    attempt: int


@dataclass(frozen=True)
class Observed:
    """The world as the handlers saw it, for one job."""

    now: dt.datetime
    pods: tuple[Mapping[str, Any], ...] = ()
    services: tuple[Mapping[str, Any], ...] = ()
    nodes: Mapping[str, NodeView] | None = None
    snapshots: SnapshotState | None = None
    #: ``None`` when the credentials Secret is fine (or not used), else why not.
    secret_problem: str | None = None
    #: Final states of this job's pods (current and previous attempt) as the watch
    #: showed them, also of pods deleted since: the step each rank reached.
    finished_pods: tuple[Mapping[str, Any], ...] = ()
    #: The API server's refusal of the last create, if it has not succeeded since.
    create_error: CreateError | None = None
    #: Reclaim taints per node (``None``: nodes not watched), and what counts as a warning.
    node_warnings: Mapping[str, tuple[str, ...]] | None = None
    reclaim: snapshot_requests.ReclaimConfig = snapshot_requests.ReclaimConfig()
    #: Why the last write of the snapshot-request object failed, if it did.
    request_error: str | None = None


@dataclass(frozen=True)
class Action:
    verb: str  # "create" | "delete"
    kind: str  # "Pod" | "Service"
    name: str
    body: Mapping[str, Any] | None = None
    reason: str = ""
    #: Delete with gracePeriodSeconds=0: the pod's node is lost, no kubelet
    #: will ever finish a graceful deletion (what `kubectl delete --force` does).
    force: bool = False


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    #: The snapshot-request object to write into the job's S3 folder (after the status).
    request_write: contract.SnapshotRequest | None = None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _attempt_of(obj: Mapping[str, Any]) -> int:
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(contract.LABEL_ATTEMPT))
    except (TypeError, ValueError):
        return -1


class _Ctx:
    """Mutable scratch state of one reconcile pass."""

    def __init__(self, body: Mapping[str, Any], observed: Observed) -> None:
        self.body = body
        self.obs = observed
        self.now = observed.now
        self.old = body.get("status") or {}
        self.status: dict[str, Any] = {k: copy.deepcopy(v) for k, v in self.old.items() if k != "kopf"}
        self.plan = Plan(status=self.status)
        meta = body["metadata"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.uid: str = meta.get("uid", "")

    # -- helpers ---------------------------------------------------------
    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def condition(self, type_: str, status: bool | str, reason: str, message: str = "") -> None:
        set_condition(self.status, type_, status, reason, message, now=_iso(self.now),
                      generation=self.body["metadata"].get("generation"))

    def set_phase(self, phase: str, reason: str, message: str, *, event_type: str | None = None) -> None:
        changed = (self.old.get("phase"), self.old.get("reason")) != (phase, reason)
        self.status["phase"] = phase
        self.status["reason"] = reason
        self.status["message"] = message
        if changed and event_type:
            self.event(event_type, reason, message)

    def requeue(self, seconds: float) -> None:
        cur = self.plan.requeue_after
        self.plan.requeue_after = seconds if cur is None else min(cur, seconds)

    def node_lost(self, pod: Mapping[str, Any], threshold: int) -> bool:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or self.obs.nodes is None:
            return False
        view = self.obs.nodes.get(node)
        if view is None:
            return True
        return not view.ready and (self.now - (view.since or self.now)).total_seconds() >= threshold

    def delete_pods(self, pods: list[Mapping[str, Any]], reason: str, *, lost_after: int | None = None) -> None:
        for p in pods:
            force = lost_after is not None and self.node_lost(p, lost_after)
            if force or not (p.get("metadata") or {}).get("deletionTimestamp"):
                self.plan.actions.append(Action("delete", "Pod", p["metadata"]["name"], reason=reason, force=force))

    def delete_services(self, keep_attempt: int | None) -> None:
        for s in self.obs.services:
            if keep_attempt is None or _attempt_of(s) != keep_attempt:
                if not (s.get("metadata") or {}).get("deletionTimestamp"):
                    self.plan.actions.append(Action("delete", "Service", s["metadata"]["name"], reason="Cleanup"))


def reconcile(body: Mapping[str, Any], observed: Observed) -> Plan:
    """Compute the plan for one TrainingJob. Pure: no I/O, no clock."""
    plan = _lifecycle(body, observed)
    if not body["metadata"].get("deletionTimestamp"):
        snaps = observed.snapshots
        progress_status.update(plan.status, progress=snaps.progress if snaps else None)
    return plan


def _lifecycle(body: Mapping[str, Any], observed: Observed) -> Plan:
    """The plan of the job's lifecycle (phases, gangs, restarts); progress and goodput follow it."""
    c = _Ctx(body, observed)
    if body["metadata"].get("deletionTimestamp"):
        return c.plan  # ownerReferences garbage-collect the gang
    c.status["observedGeneration"] = body["metadata"].get("generation", c.status.get("observedGeneration"))
    try:
        spec = parse_spec(body.get("spec"))
        errors = validate(c.name, spec)
    except SpecError as e:
        spec, errors = None, [str(e)]
    if errors or spec is None:
        _terminal_invalid(c, errors)
        return c.plan

    c.status.setdefault("attempt", 0)
    c.status.setdefault("restarts", {"preemptions": 0, "failures": 0})
    c.status.setdefault("lostWork", {"steps": 0, "seconds": 0})
    _snapshot_status(c, spec)
    if c.status.get("phase") not in TERMINAL:
        _snapshot_requests(c, spec)

    # Pods from an attempt newer than the status knows (the status was lost):
    # adopt that attempt instead of starting another gang beside it.
    newest = max((_attempt_of(p) for p in observed.pods), default=-1)
    if newest > c.status["attempt"]:
        c.status["attempt"] = newest
        c.status["gangCreated"] = False

    if c.status.get("phase") in TERMINAL:
        _cleanup_finished(c, spec)
        return c.plan
    if _create_refused(c, observed.create_error):
        return c.plan
    if spec.suspend:
        _suspend(c, spec)
        return c.plan
    if c.old.get("phase") == SUSPENDED:
        c.event("Normal", R_RESUMED, f"resumed: attempt {c.status['attempt']} starts from the latest snapshot")
        c.condition("Suspended", False, R_RESUMED)

    attempt = c.status["attempt"]
    old_pods = [p for p in observed.pods if _attempt_of(p) != attempt]
    if old_pods:
        _fence(c, spec, old_pods)
        return c.plan
    _fencing_unstuck(c)
    current = [p for p in observed.pods if _attempt_of(p) == attempt]
    if not c.status.get("gangCreated"):
        _create_gang(c, spec, current)
        return c.plan
    _observe_gang(c, spec, current)
    return c.plan


# -------------------------------------------------------------------------
# Phases of the lifecycle
# -------------------------------------------------------------------------
def _terminal_invalid(c: _Ctx, errors: list[str]) -> None:
    msg = "invalid spec: " + "; ".join(errors)
    if c.old.get("phase") != FAILED:
        c.status.setdefault("completionTime", _iso(c.now))
    c.set_phase(FAILED, R_INVALID_SPEC, msg, event_type="Warning")
    c.condition("Failed", True, R_INVALID_SPEC, msg)
    c.condition("Ready", False, R_INVALID_SPEC)
    c.delete_pods([p for p in c.obs.pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")], "InvalidSpec")


def _create_refused(c: _Ctx, err: CreateError | None) -> bool:
    """A refused create: 400/422 will never pass (InvalidSpec, the job ends); anything
    else (a quota's 403, a webhook) may: a Warning, and the plan retries the create
    (the work queue backs off). True when the job ended."""
    if err is None or err.attempt != c.status["attempt"]:
        return False
    if err.status in (400, 422):
        _terminal_invalid(c, [err.message])
        return True
    c.event("Warning", R_CREATE_FAILED, err.message)
    return False


def _workers(c: _Ctx, spec: JobSpec, views: list[PodView]) -> None:
    ready = sum(1 for v in views if v.ready)
    succeeded = sum(1 for v in views if v.phase == "Succeeded")
    c.status["workers"] = {"desired": spec.nodes, "ready": ready, "succeeded": succeeded,
                           "summary": f"{ready}/{spec.nodes}"}


def _cleanup_finished(c: _Ctx, spec: JobSpec) -> None:
    if spec.clean_pod_policy == "None":
        return
    if spec.clean_pod_policy == "All":
        c.delete_pods(list(c.obs.pods), "Cleanup")
    else:
        c.delete_pods([p for p in c.obs.pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")],
                      "Cleanup")
    c.delete_services(keep_attempt=None)


def _suspend(c: _Ctx, spec: JobSpec) -> None:
    # The running gang is fenced by moving to a new attempt number first; the
    # pods of the old one are then deleted like any previous attempt's.
    attempt = c.status["attempt"]
    if c.status.get("gangCreated") or any(_attempt_of(p) == attempt for p in c.obs.pods):
        if spec.queue_name and c.status.get("gangCreated") and c.old.get("phase") != SUSPENDED:
            _kueue_preemption(c, attempt)
        c.status["attempt"] = attempt + 1
        c.status["gangCreated"] = False
    # nextRestartTime stays: a resume during a failure backoff waits out the
    # rest of it (suspend is no way around the backoff).
    c.delete_pods(list(c.obs.pods), "Suspended")
    c.delete_services(keep_attempt=None)
    left = sum(1 for _ in c.obs.pods)
    c.set_phase(SUSPENDED, R_SUSPENDED,
                "suspended by spec.suspend" + (f"; {left} pod(s) terminating" if left else ""),
                event_type=None)
    if c.old.get("phase") != SUSPENDED:
        c.event("Normal", R_SUSPENDED, "spec.suspend is true: the gang is deleted and the job kept")
    c.condition("Suspended", True, R_SUSPENDED, "spec.suspend is true")
    c.condition("Ready", False, R_SUSPENDED)
    _workers(c, spec, [])


def _kueue_preemption(c: _Ctx, attempt: int) -> None:
    """A queued job's running gang suspended: Kueue owns ``suspend`` of the jobs it
    queues (as for batch Jobs), so this is its preemption, counted as one."""
    restarts = c.status["restarts"]
    restarts["preemptions"] = restarts.get("preemptions", 0) + 1
    c.status["lastDisruption"] = {
        "kind": PREEMPTION, "reason": R_SUSPENDED_BY_QUEUE, "pod": builders.pod_name(c.name, attempt, 0),
        "attempt": attempt, "at": _iso(c.now),
        "message": f"attempt {attempt} suspended while queued in Kueue (spec.queueName): counted as a preemption",
    }
    c.event("Warning", R_SUSPENDED_BY_QUEUE, c.status["lastDisruption"]["message"])


def _fence(c: _Ctx, spec: JobSpec, old_pods: list[Mapping[str, Any]]) -> None:
    attempt = c.status["attempt"]
    # The ended gang's pods report the step they reached as they exit: keep
    # the highest for the lost-work accounting of the next gang.
    _note_reached_step(c, old_pods)
    c.delete_pods(old_pods, "Fenced", lost_after=spec.recovery.node_not_ready_seconds)
    c.delete_services(keep_attempt=attempt)
    _fence_timeout(c, spec, old_pods)
    if c.status.get("phase") != RESTARTING:
        # Keep the decision's reason (Preempted, WorkerFailed) while fencing.
        names = ", ".join(sorted(p["metadata"]["name"] for p in old_pods))
        c.set_phase(RESTARTING, R_FENCING,
                    f"waiting for pod(s) of the previous attempt to be gone before attempt {attempt} starts: {names}")
        c.condition("Ready", False, R_FENCING)
    _workers(c, spec, [])
    c.requeue(2.0)


def _fence_timeout(c: _Ctx, spec: JobSpec, old_pods: list[Mapping[str, Any]]) -> None:
    """Escalate fencing that outlasts ``fenceTimeoutSeconds`` past a pod's deletionTimestamp.

    On a NotReady or vanished node no kubelet will finish the deletion:
    force-delete. On a Ready node the process ignores SIGTERM/SIGKILL or the
    kubelet is stuck: forcing would let two attempts run at once, so the
    ``FencingStuck`` condition names the pod and node for a person.
    """
    stuck = []
    forced = {a.name for a in c.plan.actions if a.force}
    for p in old_pods:
        deadline = parse_time((p.get("metadata") or {}).get("deletionTimestamp"))
        if deadline is None or (c.now - deadline).total_seconds() < spec.recovery.fence_timeout_seconds:
            if deadline is not None:
                c.requeue(max(1.0, spec.recovery.fence_timeout_seconds - (c.now - deadline).total_seconds()))
            continue
        v = PodView.from_pod(p)
        if v.node and c.obs.nodes is not None and node_suspect(v, c.obs.nodes):
            if v.name not in forced:
                c.plan.actions.append(Action("delete", "Pod", v.name, reason="FenceTimeout", force=True))
            continue
        stuck.append(f"pod {v.name} on node {v.node or '(none)'}")
    if stuck:
        msg = (f"still terminating {spec.recovery.fence_timeout_seconds}s past its deletion deadline on a Ready "
               f"node: {', '.join(stuck)}; the next attempt waits (check the node's kubelet and the process, "
               "or force-delete it once it is certainly stopped)")
        c.condition("FencingStuck", True, R_FENCING_STUCK, msg)
        if (get_condition(c.old, "FencingStuck") or {}).get("status") != "True":
            c.event("Warning", R_FENCING_STUCK, msg)
    else:
        _fencing_unstuck(c)


def _fencing_unstuck(c: _Ctx) -> None:
    if (get_condition(c.status, "FencingStuck") or {}).get("status") == "True":
        c.condition("FencingStuck", False, R_FENCING_DONE)


def _create_gang(c: _Ctx, spec: JobSpec, current: list[Mapping[str, Any]]) -> None:
    attempt = c.status["attempt"]
    nxt = parse_time(c.status.get("nextRestartTime"))
    if nxt is not None and nxt > c.now:
        wait = (nxt - c.now).total_seconds()
        c.set_phase(RESTARTING, R_BACKOFF,
                    f"attempt {attempt} starts at {c.status['nextRestartTime']} (backoff)")
        c.requeue(wait)
        return
    if c.obs.secret_problem:
        c.set_phase(PENDING, R_SECRET_MISSING, c.obs.secret_problem, event_type="Warning")
        c.condition("CredentialsReady", False, R_SECRET_MISSING, c.obs.secret_problem)
        c.requeue(15.0)
        return
    if spec.snapshot and spec.snapshot.credentials_secret:
        c.condition("CredentialsReady", True, "SecretFound")
    c.status.pop("nextRestartTime", None)

    snap = c.status.setdefault("snapshot", {})
    if snap.get("restoredAttempt") != attempt:
        # Decide once per attempt what the gang resumes from, and record it
        # before any pod exists: every pod gets the same answer even if the
        # operator restarts midway through creating them.
        snaps = c.obs.snapshots
        if spec.snapshot is not None and attempt > 0 and (snaps is None or snaps.error):
            decided = parse_time((c.status.get("lastDisruption") or {}).get("at")) or c.now
            if (c.now - decided).total_seconds() < SNAPSHOT_STATUS_WAIT_SECONDS:
                # Which snapshot the gang resumes from (and the lost work) is
                # decided from S3: wait a little for it to answer.
                c.set_phase(RESTARTING, "WaitingForSnapshotStatus",
                            "cannot read the snapshot folder yet; the new gang waits for it (at most "
                            f"{SNAPSHOT_STATUS_WAIT_SECONDS}s after the disruption)")
                c.requeue(3.0)
                return
        resume, resume_step = _resume_point(c, spec, attempt)
        snap["restoredAttempt"] = attempt
        if resume:
            snap["restoredFrom"] = resume
            if resume_step is not None:
                snap["restoredStep"] = resume_step
            else:
                snap.pop("restoredStep", None)
        else:
            snap.pop("restoredFrom", None)
            snap.pop("restoredStep", None)
        if snaps is None or not snaps.error:
            _account_lost_work(c, resume_step)
        c.status.setdefault("startTime", _iso(c.now))
        c.status["attemptStartTime"] = _iso(c.now)
    resume = snap.get("restoredFrom")

    present = {PodView.from_pod(p).rank for p in current}
    if len(present) < spec.nodes:
        _ensure_service(c, attempt, repair=False)
    for rank in range(spec.nodes):
        if rank not in present:
            pod = builders.get_pod(c.body, spec, attempt=attempt, rank=rank, resume_from=resume)
            c.plan.actions.append(Action("create", "Pod", pod["metadata"]["name"], pod))
    if len(present) >= spec.nodes:
        c.status["gangCreated"] = True
        c.event("Normal", R_GANG_CREATED,
                f"attempt {attempt}: {spec.nodes} pod(s) created" + (f", resuming from {resume}" if resume else ""))
        _observe_gang(c, spec, current)
        return
    phase = PENDING if attempt == 0 or c.status.get("phase") in (None, PENDING) else RESTARTING
    c.set_phase(phase, R_CREATING, f"creating attempt {attempt}: {len(present)}/{spec.nodes} pod(s) exist")
    c.condition("Ready", False, R_CREATING)
    _workers(c, spec, [PodView.from_pod(p) for p in current])
    c.requeue(2.0)


def _resume_point(c: _Ctx, spec: JobSpec, attempt: int) -> tuple[str | None, int | None]:
    """What the gang of ``attempt`` restores: an explicit request for the first
    attempt, else the job's latest complete snapshot (also one left by an
    earlier job of the same namespace/name: re-creating a job continues it)."""
    if spec.snapshot is None:
        return None, None
    if attempt == 0 and spec.snapshot.resume_from:
        return spec.snapshot.resume_from, None
    latest = c.obs.snapshots.latest if c.obs.snapshots else None
    if latest:
        return latest.get("uri"), latest.get("step")
    return None, None


def _note_reached_step(c: _Ctx, pods: list[Mapping[str, Any]]) -> None:
    """Record in ``lastDisruption.step`` the highest step the ended gang's pods reported as they exited.

    Read from the pods still cached and from the final states kept from the
    watch (the kubelet deletes a pod right after writing its final status).
    """
    last = c.status.get("lastDisruption")
    if not last or last.get("accounted"):
        return
    for p in [*pods, *c.obs.finished_pods]:
        cm = PodView.from_pod(p).contract_message
        if not cm or _attempt_of(p) != last.get("attempt"):
            continue
        if cm.step is not None and cm.step > last.get("step", -1):
            last["step"] = cm.step
        if cm.save_seconds is not None and cm.save_seconds > last.get("saveSeconds", -1.0):
            last["saveSeconds"] = cm.save_seconds


def _account_lost_work(c: _Ctx, resume_step: int | None) -> None:
    _note_reached_step(c, [])
    last = c.status.get("lastDisruption") or {}
    if last.get("kind") != PREEMPTION or last.get("accounted"):
        return
    reached = last.get("step")
    snaps = c.obs.snapshots
    if snaps and snaps.latest and snaps.latest_attempt == last.get("attempt"):
        # The ended gang got at least as far as the last snapshot it wrote.
        step = snaps.latest.get("step")
        if isinstance(step, int) and (reached is None or step > reached):
            reached = step
    if reached is None:
        return
    lost = max(0, int(reached) - int(resume_step or 0))
    lw = c.status.setdefault("lostWork", {"steps": 0, "seconds": 0})
    lw["steps"] = int(lw.get("steps", 0)) + lost
    sps = last.get("secondsPerStep")
    if isinstance(sps, (int, float)):
        lw["seconds"] = round(float(lw.get("seconds", 0)) + lost * float(sps), 3)
    last["accounted"] = True


def _ensure_service(c: _Ctx, attempt: int, *, repair: bool) -> None:
    """The attempt's rendezvous Service exists (``repair``: re-created, with an Event, when deleted)."""
    svc_name = builders.service_name(c.name, attempt)
    if any(s["metadata"]["name"] == svc_name and not s["metadata"].get("deletionTimestamp") for s in c.obs.services):
        return
    if any(s["metadata"]["name"] == svc_name for s in c.obs.services):
        c.requeue(1.0)  # still terminating: re-create once it is gone
        return
    c.plan.actions.append(Action("create", "Service", svc_name, builders.get_service(c.body, attempt)))
    if repair:
        c.event("Warning", R_SERVICE_RECREATED, f"rendezvous Service {svc_name} was deleted; re-created")


def _observe_gang(c: _Ctx, spec: JobSpec, current: list[Mapping[str, Any]]) -> None:
    attempt = c.status["attempt"]
    views = sorted((PodView.from_pod(p) for p in current), key=lambda v: v.rank)
    _workers(c, spec, views)
    rr = spec.recovery
    outcomes: list[Outcome] = []
    for v in views:
        o = classify(v, nodes=c.obs.nodes, now=c.now, node_not_ready_seconds=rr.node_not_ready_seconds,
                     rules=rr.rules)
        if o is not None:
            outcomes.append(o)
    present = {v.rank for v in views}
    for rank in range(spec.nodes):
        if rank not in present:
            outcomes.append(Outcome(PREEMPTION, "PodDeleted", builders.pod_name(c.name, attempt, rank), None,
                                    message="the pod disappeared (deleted by someone other than the operator)"))
    steps = [o.step for o in outcomes if o.step is not None]
    step = max(steps) if steps else None
    failed = [o for o in outcomes if o.kind == FAILURE]
    # A cause that restarting cannot fix wins, then a disruption (the others'
    # errors follow from it), then a transient rejection.
    for kind in (FAIL_JOB, PREEMPTION, TRANSIENT):
        first = next((o for o in outcomes if o.kind == kind), None)
        if first is not None:
            _end_attempt(c, spec, first, step, views)
            return
    if failed:
        unscheduled = [v for v in views if v.unschedulable and not v.node]
        if unscheduled:
            # The ranks that started gave up waiting for ranks that never got
            # a node: the cause is scheduling, not the training code.
            _end_attempt(c, spec, _unschedulable_outcome(unscheduled), step, views)
            return
        if any(node_suspect(v, c.obs.nodes) for v in views if v.phase not in ("Succeeded", "Failed")):
            # A gang member's node is NotReady: this failure is probably the
            # rendezvous breaking because of it. Wait for the node's fate.
            c.set_phase(RUNNING, R_NODE_NOT_READY, "a worker's node is not Ready; waiting before deciding")
            c.requeue(2.0)
            return
        wait = _settle_remaining(c, spec, views)
        if wait > 0:
            # Pods of a lost node look Running until the node is marked
            # NotReady; give the rest of the gang time to end (as it does
            # after a real failure) or its node to be declared, first.
            c.set_phase(RUNNING, "WorkerEnded", "a worker ended with an error; waiting for the rest of the gang")
            c.requeue(min(wait, 2.0))
            return
        # The pod that ended first is usually the cause; the others follow it.
        ended = {v.name: v.finished_at or c.now for v in views}
        first = min(failed, key=lambda o: (ended.get(o.pod, c.now), o.pod))
        _end_attempt(c, spec, first, step, views)
        return
    if len(views) == spec.nodes and all(o.kind == SUCCESS for o in outcomes) and len(outcomes) == spec.nodes:
        c.status["completionTime"] = _iso(c.now)
        c.set_phase(SUCCEEDED, R_SUCCEEDED, f"all {spec.nodes} worker(s) of attempt {attempt} exited 0",
                    event_type="Normal")
        c.condition("Succeeded", True, R_SUCCEEDED)
        c.condition("Ready", False, R_SUCCEEDED)
        _cleanup_finished(c, spec)
        return
    ready = sum(1 for v in views if v.ready)
    done = sum(1 for o in outcomes if o.kind == SUCCESS)
    if ready + done == spec.nodes and ready > 0:
        c.set_phase(RUNNING, R_RUNNING, f"attempt {attempt}: {ready}/{spec.nodes} worker(s) running",
                    event_type="Normal" if c.old.get("phase") != RUNNING else None)
        c.condition("Ready", True, R_RUNNING)
    elif not _startup_problem(c, spec, views, step):
        if c.old.get("phase") == RUNNING:
            # Never backwards while the gang is judged (a node NotReady marks
            # its pods unready): the attempt stays Running until it ends.
            suspect = [v.node for v in views if node_suspect(v, c.obs.nodes)]
            reason, why = (R_NODE_NOT_READY, f"; node(s) not Ready: {', '.join(sorted(set(map(str, suspect))))}") \
                if suspect else (R_WORKERS_NOT_READY, "")
            c.set_phase(RUNNING, reason, f"attempt {attempt}: {ready}/{spec.nodes} worker(s) ready{why}")
            c.condition("Ready", False, reason)
        else:
            phase = RESTARTING if c.status.get("phase") == RESTARTING else PENDING
            c.set_phase(phase, R_WAITING_WORKERS, f"attempt {attempt}: {ready}/{spec.nodes} worker(s) ready")
            c.condition("Ready", False, R_WAITING_WORKERS)
    if c.status.get("phase") in TERMINAL or c.status["attempt"] != attempt:
        return
    _ensure_service(c, attempt, repair=True)
    # No requeue of a steady gang: its pods' events wake it, and the operator's
    # resync (spread over --resync-seconds) looks at it once per period; except
    # a job that asks for fresh progress (spec.snapshot.progressSeconds).
    if spec.snapshot is not None and spec.snapshot.progress_seconds:
        c.requeue(max(PROGRESS_MIN_REFRESH_SECONDS, float(spec.snapshot.progress_seconds)))
    _stall_condition(c, spec)


def _unschedulable_outcome(unscheduled: list[PodView]) -> Outcome:
    v = unscheduled[0]
    return Outcome(TRANSIENT, R_UNSCHEDULABLE, v.name, None,
                   message=f"{len(unscheduled)} pod(s) could not be scheduled: {v.unschedulable}")


def _attempt_age(c: _Ctx) -> float:
    started = parse_time(c.status.get("attemptStartTime"))
    return (c.now - started).total_seconds() if started else 0.0


def _startup_problem(c: _Ctx, spec: JobSpec, views: list[PodView], step: int | None) -> bool:
    """Report (and past its timeout, act on) why a gang is not all running.

    Containers that cannot start (image pulls, config errors) and pods the
    scheduler cannot place are surfaced in status and Events on the first
    reconcile that sees them. A permanent container problem ends the job
    after ``startupTimeoutSeconds``; a gang not fully scheduled after
    ``schedulingTimeoutSeconds`` is torn down and retried, uncounted.

    Returns:
        True when a problem was reported (the caller sets no other phase).
    """
    attempt = c.status["attempt"]
    rr = spec.recovery
    age = _attempt_age(c)
    keep = RUNNING if c.old.get("phase") == RUNNING else (RESTARTING if c.status.get("phase") == RESTARTING else PENDING)
    waiting = [v for v in views if v.waiting_reason in WAITING_REASONS]
    if waiting:
        v = waiting[0]
        msg = f"pod {v.name}: {v.waiting_reason}: {short_text(v.waiting_message)}"
        if v.waiting_reason in PERMANENT_WAITING_REASONS and age >= rr.startup_timeout_seconds:
            _fail_job(c, spec, v.waiting_reason,
                      f"attempt {attempt}: {msg} (not resolved within startupTimeoutSeconds="
                      f"{rr.startup_timeout_seconds})")
            return True
        c.set_phase(keep, v.waiting_reason, msg, event_type="Warning")
        c.condition("Ready", False, v.waiting_reason, msg)
        if v.waiting_reason in PERMANENT_WAITING_REASONS:
            c.requeue(max(1.0, rr.startup_timeout_seconds - age))
        return True
    unscheduled = [v for v in views if v.unschedulable and not v.node]
    if unscheduled:
        if age >= rr.scheduling_timeout_seconds:
            _end_attempt(c, spec, _unschedulable_outcome(unscheduled), step, views)
            return True
        o = _unschedulable_outcome(unscheduled)
        msg = (f"attempt {attempt}: {o.message}; the gang is deleted and retried if not all scheduled within "
               f"schedulingTimeoutSeconds={rr.scheduling_timeout_seconds}")
        c.set_phase(keep, R_UNSCHEDULABLE, msg, event_type="Warning")
        c.condition("Ready", False, R_UNSCHEDULABLE, msg)
        c.requeue(max(1.0, rr.scheduling_timeout_seconds - age))
        return True
    return False


def _settle_remaining(c: _Ctx, spec: JobSpec, views: list[PodView]) -> float:
    """Seconds a failure still waits for the rest of the gang (0: decide now)."""
    running = [v for v in views if v.phase not in ("Succeeded", "Failed")]
    if not running:
        return 0.0
    ended = [v.finished_at for v in views if v.phase == "Failed" and v.finished_at is not None]
    if not ended:
        return 0.0
    return spec.recovery.failure_settle_seconds - (c.now - min(ended)).total_seconds()


#: Per outcome kind: the restarts counter and the spec's budget (``None``: no budget).
_BUDGETS = {PREEMPTION: ("preemptions", "max_preemptions"), FAILURE: ("failures", "max_failures"),
            TRANSIENT: ("transient", None)}


def _disruption(c: _Ctx, o: Outcome, step: int | None) -> dict[str, Any]:
    """``status.lastDisruption`` for outcome ``o`` of the current attempt."""
    d: dict[str, Any] = {
        "kind": o.kind, "reason": o.reason, "pod": o.pod, "attempt": c.status["attempt"], "at": _iso(c.now),
        "message": o.describe(),
    }
    if o.node:
        d["node"] = o.node
    if o.exit_code is not None:
        d["exitCode"] = o.exit_code
    if o.save_seconds is not None:
        d["saveSeconds"] = o.save_seconds
    if step is not None:
        d["step"] = step
        started = parse_time(c.status.get("attemptStartTime"))
        restored = (c.status.get("snapshot") or {}).get("restoredStep") or 0
        if started and step > restored:
            d["secondsPerStep"] = round((c.now - started).total_seconds() / (step - restored), 6)
    return d


def _fail_job(c: _Ctx, spec: JobSpec, reason: str, msg: str) -> None:
    c.status["completionTime"] = _iso(c.now)
    c.set_phase(FAILED, reason, msg, event_type="Warning")
    c.condition("Failed", True, reason, msg)
    c.condition("Ready", False, reason)
    _cleanup_finished(c, spec)


def _backoff_until(c: _Ctx, spec: JobSpec, n: int, *, jitter: bool = False) -> int:
    """Set ``nextRestartTime`` for the ``n``-th backed-off restart; returns the delay.

    ``jitter`` adds up to half the delay, fixed per job and attempt (a hash,
    no clock or random source): two gangs torn down together because they
    starved each other do not come back in the same second again.
    """
    delay = min(spec.recovery.max_backoff_seconds, spec.recovery.backoff_seconds * (2 ** (max(n, 1) - 1)))
    if jitter:
        spread = zlib.crc32(f"{c.uid}/{c.status['attempt']}".encode()) % 1000 / 2000
        delay = int(delay + max(1, round(delay * spread)))
    # Rounded UP to the second (RFC 3339 in status has second resolution):
    # the backoff is never shorter than promised.
    end = c.now + dt.timedelta(seconds=delay)
    if end.microsecond:
        end = end.replace(microsecond=0) + dt.timedelta(seconds=1)
    c.status["nextRestartTime"] = _iso(end)
    return delay


def _end_attempt(c: _Ctx, spec: JobSpec, o: Outcome, step: int | None, views: list[PodView]) -> None:
    attempt = c.status["attempt"]
    restarts = c.status["restarts"]
    c.status["lastDisruption"] = _disruption(c, o, step)
    if o.kind == FAIL_JOB:
        _fail_job(c, spec, o.reason, f"attempt {attempt} ended: {o.describe()}")
        return
    key, budget_field = _BUDGETS[o.kind]
    budget = getattr(spec.recovery, budget_field) if budget_field else None
    if budget is not None and restarts.get(key, 0) >= budget:
        reason = R_PREEMPTION_BUDGET if o.kind == PREEMPTION else R_FAILURE_BUDGET
        what = "maxPreemptions" if o.kind == PREEMPTION else "maxFailures"
        _fail_job(c, spec, reason, f"attempt {attempt} ended: {o.describe()}; {what}={budget} restarts already used")
        return
    restarts[key] = n = restarts.get(key, 0) + 1
    c.status["attempt"] = attempt + 1
    _workers(c, spec, [])
    c.status["gangCreated"] = False
    if o.kind == FAILURE:
        delay = _backoff_until(c, spec, n)
        reason = R_FAILED_RESTART
        msg = (f"attempt {attempt} failed: {o.describe()}; restart {n}/{budget} "
               f"(attempt {attempt + 1}) after {delay}s backoff")
    elif o.kind == TRANSIENT:
        delay = _backoff_until(c, spec, n, jitter=True)
        reason = o.reason if _CAMEL.fullmatch(o.reason) else R_TRANSIENT
        msg = (f"attempt {attempt} could not run: {o.describe()}; attempt {attempt + 1} after {delay}s backoff "
               "(not counted as a failure)")
    else:
        reason = R_PREEMPTED
        msg = (f"attempt {attempt} preempted: {o.describe()}; restart {n}/{budget} "
               f"(attempt {attempt + 1}) from the latest snapshot")
    c.set_phase(RESTARTING, reason, msg, event_type="Warning")
    c.condition("Ready", False, reason, msg)
    c.event("Normal", R_FENCING, f"deleting the {len(views)} pod(s) of attempt {attempt} before attempt {attempt + 1}")
    c.delete_pods([p for p in c.obs.pods if _attempt_of(p) == attempt], "Fenced",
                  lost_after=spec.recovery.node_not_ready_seconds)
    c.delete_services(keep_attempt=attempt + 1)
    c.requeue(1.0)


def _snapshot_status(c: _Ctx, spec: JobSpec) -> None:
    snaps = c.obs.snapshots
    if spec.snapshot is None or snaps is None:
        return
    st = c.status.setdefault("snapshot", {})
    if snaps.error:
        st["lastError"] = snaps.error
        return
    st.pop("lastError", None)
    st["count"] = snaps.count
    if snaps.latest:
        latest = dict(snaps.latest)
        if latest != st.get("latest"):
            if (st.get("latest") or {}).get("uri") != latest.get("uri"):
                c.event("Normal", "SnapshotSaved",
                        f"snapshot at step {latest.get('step')} complete: {latest.get('uri')}")
            st["latest"] = latest


def _snapshot_requests(c: _Ctx, spec: JobSpec) -> None:
    """Relay snapshot requests (annotation, reclaim warnings) and record their acks (see :mod:`.snapshot_requests`)."""
    annotation = (c.body["metadata"].get("annotations") or {}).get(contract.ANNOTATION_SNAPSHOT_REQUEST)
    if spec.snapshot is None:
        if annotation and annotation != ((c.old.get("snapshot") or {}).get("request") or {}).get("annotation"):
            c.status.setdefault("snapshot", {})["request"] = {"annotation": annotation}
            c.event("Warning", snapshot_requests.R_REQUEST_IGNORED,
                    f"snapshot request {annotation!r} ignored: the job has no spec.snapshot")
        return
    attempt = c.status["attempt"]
    current = [p for p in c.obs.pods if _attempt_of(p) == attempt]
    warnings = snapshot_requests.reclaim_warnings(current, nodes=c.obs.node_warnings, config=c.obs.reclaim)
    snap = c.status.setdefault("snapshot", {})
    d = snapshot_requests.decide(annotation=annotation, warnings=warnings, attempt=attempt, snapshot_status=snap,
                                 live=c.obs.snapshots.live if c.obs.snapshots else None,
                                 write_error=c.obs.request_error, now=c.now,
                                 hold_seconds=c.obs.reclaim.hold_seconds)
    for key, value in (("request", d.request), ("lastRequest", d.last_request), ("requestError", d.request_error)):
        if value is None:
            snap.pop(key, None)
        else:
            snap[key] = value
    for type_, reason, message in d.events:
        c.event(type_, reason, message)
    c.plan.request_write = d.write


def _stall_condition(c: _Ctx, spec: JobSpec) -> None:
    """SnapshotStalled: no new snapshot for ``stallAfterIntervals`` expected intervals.

    The expected interval is the time between the two newest snapshots; with
    only one, the time the attempt took to write its first; with none, the
    step time of the last attempt times ``everySteps``. Without any of these
    the condition is not set (nothing to compare with yet).
    """
    if spec.snapshot is None or c.obs.snapshots is None or c.obs.snapshots.error:
        return
    st = c.status.get("snapshot") or {}
    started = parse_time(c.status.get("attemptStartTime"))
    latest = st.get("latest") or {}
    saved = parse_time(latest.get("savedAt"))
    sps = (c.status.get("lastDisruption") or {}).get("secondsPerStep")
    interval = c.obs.snapshots.interval_seconds
    if interval is None and saved and started and saved > started:
        interval = (saved - started).total_seconds()
    if interval is None and sps:
        interval = spec.snapshot.every_steps * float(sps)
    if not interval or not started:
        return
    ref = max(t for t in (saved, started) if t is not None)
    limit = spec.snapshot.stall_after_intervals * float(interval)
    if (c.now - ref).total_seconds() > limit:
        c.condition("SnapshotStalled", True, R_SNAPSHOT_STALLED,
                    f"no new snapshot since {_iso(ref)} (expected one every ~{int(interval)}s)")
    else:
        c.condition("SnapshotStalled", False, R_SNAPSHOT_OK)
