"""How a pod of the gang ended: preemption (a disruption), failure, or success.

The rules (documented in docs/architecture.md, "Disruption vs failure"):

* Preemption: a ``DisruptionTarget`` condition (any reason: PreemptionByScheduler,
  EvictionByEvictionAPI, DeletionByTaintManager, DeletionByPodGC,
  TerminationByKubelet...), pod ``status.reason`` Evicted / Terminated /
  Shutdown / NodeShutdown / NodeLost, the contract's "preempted after
  snapshot" exit code or termination message, a pod being deleted by someone
  else (the operator only deletes pods of attempts it already ended), and a
  pod whose node is gone or not Ready for longer than
  ``recovery.nodeNotReadySeconds``.
* Failure: the trainer container exited non-zero with none of the above
  (OOMKilled included: more memory is needed, a restart will not help by itself).
* Success: exit 0.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping

from trainingjob_trainer import contract

PREEMPTION = "Preemption"
FAILURE = "Failure"
SUCCESS = "Success"

DISRUPTED_POD_REASONS = frozenset({"Evicted", "Terminated", "Shutdown", "NodeShutdown", "NodeLost", "Preempting"})


def parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class NodeView:
    """What the operator needs of a Node: is it Ready, and since when not."""

    ready: bool
    since: dt.datetime | None = None

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> "NodeView":
        for c in (node.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready":
                return cls(ready=c.get("status") == "True", since=parse_time(c.get("lastTransitionTime")))
        return cls(ready=False, since=None)


@dataclass(frozen=True)
class PodView:
    """The fields of a pod the reconcile reads."""

    name: str
    attempt: int
    rank: int
    phase: str
    node: str | None
    deleting: bool
    ready: bool
    exit_code: int | None
    terminated_reason: str | None
    termination_message: str | None
    status_reason: str | None
    disruption_reason: str | None
    disruption_message: str | None
    finished_at: dt.datetime | None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> "PodView":
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        term: Mapping[str, Any] = {}
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") == contract.CONTAINER_NAME:
                term = (cs.get("state") or {}).get("terminated") or {}
        disruption = None
        disruption_msg = None
        ready = False
        for c in status.get("conditions") or []:
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
                disruption = c.get("reason") or "DisruptionTarget"
                disruption_msg = c.get("message")
            if c.get("type") == "Ready" and c.get("status") == "True":
                ready = True
        return cls(
            name=meta.get("name", ""),
            attempt=_int_label(labels.get(contract.LABEL_ATTEMPT)),
            rank=_int_label(labels.get(contract.LABEL_NODE_RANK)),
            phase=status.get("phase") or "Pending",
            node=(pod.get("spec") or {}).get("nodeName"),
            deleting=bool(meta.get("deletionTimestamp")),
            ready=ready and status.get("phase") == "Running",
            exit_code=term.get("exitCode") if isinstance(term.get("exitCode"), int) else None,
            terminated_reason=term.get("reason"),
            termination_message=term.get("message"),
            status_reason=status.get("reason"),
            disruption_reason=disruption,
            disruption_message=disruption_msg,
            finished_at=parse_time(term.get("finishedAt")),
        )

    @property
    def contract_message(self) -> contract.TerminationMessage | None:
        return contract.parse_termination_message(self.termination_message)


def _int_label(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


@dataclass(frozen=True)
class Outcome:
    """How one pod ended (or is ending)."""

    kind: str  # PREEMPTION | FAILURE | SUCCESS
    reason: str
    pod: str
    node: str | None
    exit_code: int | None = None
    step: int | None = None
    message: str = ""

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" on node {self.node}" if self.node else "")
        if self.kind == FAILURE:
            text = f"{where} exited with code {self.exit_code}" if self.exit_code is not None else f"{where} failed"
            if self.reason not in ("Error", ""):
                text += f" ({self.reason})"
        elif self.kind == PREEMPTION:
            text = f"{where} was disrupted: {self.reason}"
        else:
            text = f"{where} succeeded"
        if self.message:
            text += f": {self.message}"
        return text


def _short(text: str | None, limit: int = 300) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(
    pod: PodView,
    *,
    nodes: Mapping[str, NodeView] | None,
    now: dt.datetime,
    node_not_ready_seconds: int,
) -> Outcome | None:
    """The outcome of one pod, or ``None`` while it is still running normally."""
    cm = pod.contract_message
    step = cm.step if cm else None
    base = {"pod": pod.name, "node": pod.node, "exit_code": pod.exit_code, "step": step}
    if pod.disruption_reason:
        return Outcome(PREEMPTION, pod.disruption_reason, message=_short(pod.disruption_message), **base)
    if pod.phase == "Failed" and pod.status_reason in DISRUPTED_POD_REASONS:
        return Outcome(PREEMPTION, pod.status_reason or "Evicted", **base)
    if (cm and cm.reason == contract.TERM_REASON_PREEMPTED) or pod.exit_code == contract.EXIT_PREEMPTED_AFTER_SNAPSHOT:
        msg = f"emergency snapshot {cm.snapshot}" if cm and cm.snapshot else ""
        return Outcome(PREEMPTION, contract.TERM_REASON_PREEMPTED, message=msg, **base)
    if pod.deleting and pod.phase not in ("Succeeded", "Failed"):
        return Outcome(PREEMPTION, "DeletedExternally", message="the pod was deleted by someone other than the operator", **base)
    if pod.phase == "Succeeded":
        return Outcome(SUCCESS, "Completed", **base)
    if pod.phase == "Failed":
        detail = cm.message if cm else pod.termination_message
        return Outcome(FAILURE, pod.terminated_reason or "Error", message=_short(detail), **base)
    if pod.node and nodes is not None:
        node = nodes.get(pod.node)
        if node is None:
            return Outcome(PREEMPTION, "NodeLost", message=f"node {pod.node} no longer exists", **base)
        if not node.ready:
            since = node.since or now
            if (now - since).total_seconds() >= node_not_ready_seconds:
                return Outcome(
                    PREEMPTION,
                    "NodeLost",
                    message=f"node {pod.node} not Ready for {int((now - since).total_seconds())}s",
                    **base,
                )
    return None


def node_suspect(pod: PodView, nodes: Mapping[str, NodeView] | None) -> bool:
    """Is the pod on a node that is not Ready (but not yet declared lost)?"""
    if not pod.node or nodes is None:
        return False
    node = nodes.get(pod.node)
    return node is None or not node.ready
