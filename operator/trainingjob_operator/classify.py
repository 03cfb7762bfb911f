"""How a pod of the gang ended: preemption (a disruption), failure, transient, or success.

Classification is a rule table in the spirit of Kubernetes' Job
``podFailurePolicy``: each :class:`Rule` matches facts of one pod (a True
condition's type and reason, the container's terminated or waiting reason,
its exit code, the pod's phase and ``status.reason``, a pattern on the
messages) and names an action. The first rule that matches decides. The
user's ``spec.recovery.rules`` come first, then :data:`BUILTIN_RULES`. The
table and why each rule is there: docs/architecture.md, "Disruption vs
failure".

Actions:

* ``Preemption``: the node or the cluster took the pod away; counts against
  ``maxPreemptions``, restarts from the latest snapshot at once.
* ``Failure``: the training process (or its own resource use) failed; counts
  against ``maxFailures``, restarts after the failure backoff.
* ``Transient``: neither the user's code nor a preemption (a kubelet
  admission rejection): restarts after a backoff and counts against
  neither budget (``restarts.transient`` records it).
* ``FailJob``: restarting will not help (the snapshot storage refuses the
  job's credentials or bucket): the job ends ``Failed`` at once.

Outside the table (facts no rule can see): a pod deleted by someone else, a
pod whose node is gone or not Ready for ``recovery.nodeNotReadySeconds``
(preemptions), and exit 0 (success).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from trainingjob_trainer import contract

PREEMPTION = "Preemption"
FAILURE = "Failure"
TRANSIENT = "Transient"
FAIL_JOB = "FailJob"
SUCCESS = "Success"
ACTIONS = (PREEMPTION, FAILURE, TRANSIENT, FAIL_JOB)

#: Reasons of the built-in rules that the operator itself reports.
R_SNAPSHOT_STORAGE = "SnapshotStorageError"
R_OVER_LIMIT = "EvictedOverLimit"
R_ADMISSION = "AdmissionRejected"

#: Waiting reasons the kubelet reports for a container it cannot start.
WAITING_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError",
})
#: Of those, the ones that no retry fixes by itself (the spec or a missing
#: Secret key must change): the job ends Failed after startupTimeoutSeconds.
PERMANENT_WAITING_REASONS = frozenset({"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"})


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
    status_message: str | None = None
    #: ``(type, reason, message)`` of every condition whose status is True.
    true_conditions: tuple[tuple[str, str, str], ...] = ()
    waiting_reason: str | None = None
    waiting_message: str | None = None
    #: ``PodScheduled=False`` reason and message (the scheduler's verdict).
    unschedulable: str | None = None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> "PodView":
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        state: Mapping[str, Any] = {}
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") == contract.CONTAINER_NAME:
                state = cs.get("state") or {}
        term = state.get("terminated") or {}
        waiting = state.get("waiting") or {}
        disruption = None
        disruption_msg = None
        unschedulable = None
        ready = False
        true_conditions = []
        for c in status.get("conditions") or []:
            if c.get("status") == "True":
                true_conditions.append((str(c.get("type") or ""), str(c.get("reason") or ""), str(c.get("message") or "")))
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
                disruption = c.get("reason") or "DisruptionTarget"
                disruption_msg = c.get("message")
            if c.get("type") == "Ready" and c.get("status") == "True":
                ready = True
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                unschedulable = c.get("message") or "the scheduler found no node for the pod"
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
            status_message=status.get("message"),
            true_conditions=tuple(true_conditions),
            waiting_reason=waiting.get("reason") if not term else None,
            waiting_message=waiting.get("message") if not term else None,
            unschedulable=unschedulable,
        )

    @property
    def contract_message(self) -> contract.TerminationMessage | None:
        return contract.parse_termination_message(self.termination_message)

    def messages(self) -> str:
        """Every human message of the pod, joined (what a rule's pattern searches)."""
        parts = [self.status_message, self.termination_message, *(m for _, _, m in self.true_conditions)]
        return "\n".join(p for p in parts if p)


def _int_label(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


@dataclass(frozen=True)
class Rule:
    """One row of the classification table; every matcher given must match.

    Name matchers (``pod_reasons``, ``container_reasons``, a condition's type
    and reason) are exact, or prefixes when they end with ``*``.

    Attributes:
        action: ``Preemption``, ``Failure``, ``Transient`` or ``FailJob``.
        reason: The reason the outcome records; by default the fact that
            matched (the container's, the pod's or the condition's reason).
        exit_codes: The trainer container's exit code is one of these
            (``exit_codes_in=False``: is none of these; never exit 0).
        condition: ``(type, reason)`` of a condition whose status is True
            (``reason`` ``"*"``: any).
        pod_reasons: The pod's ``status.reason`` (e.g. ``Evicted``, ``OutOf*``).
        container_reasons: The container's terminated reason (``OOMKilled``).
        trainer_reasons: The ``reason`` of the trainer's termination message.
        message: A regular expression searched in the pod's, its True
            conditions' and the container's messages.
        explain: Text the outcome's message starts with (what to do).
    """

    action: str
    reason: str | None = None
    exit_codes: frozenset[int] | None = None
    exit_codes_in: bool = True
    condition: tuple[str, str] | None = None
    pod_reasons: tuple[str, ...] = ()
    container_reasons: tuple[str, ...] = ()
    trainer_reasons: tuple[str, ...] = ()
    message: str | None = None
    explain: str = ""

    def matches(self, pod: PodView) -> str | None:
        """The matched fact's name (the default reason), or ``None`` when the rule does not apply."""
        facts: list[str] = []
        if self.exit_codes is not None:
            if pod.exit_code is None or pod.exit_code == 0 or pod.phase != "Failed":
                return None
            if (pod.exit_code in self.exit_codes) != self.exit_codes_in:
                return None
            facts.append(f"ExitCode{pod.exit_code}")
        if self.condition is not None:
            ctype, creason = self.condition
            hit = next((r for t, r, _ in pod.true_conditions if t == ctype and _name_match(creason, r)), None)
            if hit is None:
                return None
            facts.append(hit or ctype)
        if self.pod_reasons:
            if not any(_name_match(p, pod.status_reason) for p in self.pod_reasons):
                return None
            facts.append(pod.status_reason or "")
        if self.container_reasons:
            if not any(_name_match(p, pod.terminated_reason) for p in self.container_reasons):
                return None
            facts.append(pod.terminated_reason or "")
        if self.trainer_reasons:
            cm = pod.contract_message
            if cm is None or cm.reason not in self.trainer_reasons:
                return None
            facts.append(cm.reason)
        if self.message is not None and not re.search(self.message, pod.messages()):
            return None
        if not facts and self.message is None:
            return None  # a rule without matchers matches nothing
        return self.reason or (facts[-1] if facts else self.action)


def _name_match(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


#: What the kubelet writes when it evicts a pod for its OWN use: over a
#: container's or the pod's ephemeral-storage limit, an emptyDir over its
#: sizeLimit, or (node pressure) a container using more than it requested.
OVER_LIMIT_MESSAGE = (r"exceeds the (total )?limit|exceeded its local ephemeral storage limit|"
                      r"exceeds the limit|was using [^,]+, (request|limit) is")
_DISRUPTED_POD_REASONS = ("Evicted", "Terminated", "Shutdown", "NodeShutdown", "NodeLost", "Preempting")
#: Kubelet admission rejections (the pod never ran; no container status).
_ADMISSION_POD_REASONS = ("UnexpectedAdmissionError", "OutOf*", "NodeAffinity", "NodeSelectorMismatching",
                          "InvalidNodeInfo", "PodOSNotSupported", "PodOSSelectorNodeLabelDoesNotMatch")

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(FAIL_JOB, reason=R_SNAPSHOT_STORAGE, exit_codes=frozenset({contract.EXIT_SNAPSHOT_CONFIG_ERROR}),
         explain="the snapshot storage refused the job's configuration (credentials, bucket or endpoint); "
                 "restarting will not help: fix spec.snapshot or the credentials Secret"),
    Rule(FAILURE, reason=R_OVER_LIMIT, pod_reasons=("Evicted",), message=OVER_LIMIT_MESSAGE,
         explain="evicted for its own resource use, not preempted: raise spec.resources"),
    Rule(FAILURE, reason=R_OVER_LIMIT, condition=("DisruptionTarget", "TerminationByKubelet"),
         message=OVER_LIMIT_MESSAGE, explain="evicted for its own resource use, not preempted: raise spec.resources"),
    Rule(PREEMPTION, condition=("DisruptionTarget", "*")),
    Rule(PREEMPTION, condition=(contract.KUEUE_CONDITION_TERMINATION_TARGET, contract.KUEUE_REASON_STOPPED),
         explain="Kueue stopped the pod group (preempted, or its PodsReady timeout)"),
    Rule(FAILURE, container_reasons=("OOMKilled",),
         explain="the container was killed for exceeding its memory limit (OOMKilled): "
                 "raise spec.resources.limits.memory or use less memory"),
    Rule(PREEMPTION, pod_reasons=_DISRUPTED_POD_REASONS),
    Rule(TRANSIENT, pod_reasons=_ADMISSION_POD_REASONS,
         explain="the kubelet rejected the pod at admission (not the application): retried after a backoff, "
                 "not counted as a failure"),
    Rule(PREEMPTION, container_reasons=("ContainerStatusUnknown",),
         explain="the container's state was lost with its node (a reboot or a lost kubelet)"),
    Rule(PREEMPTION, reason=contract.TERM_REASON_PREEMPTED, trainer_reasons=(contract.TERM_REASON_PREEMPTED,)),
    Rule(PREEMPTION, reason=contract.TERM_REASON_PREEMPTED,
         exit_codes=frozenset({contract.EXIT_PREEMPTED_AFTER_SNAPSHOT})),
)


def rules_from_spec(items: Iterable[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """``spec.recovery.rules`` as :class:`Rule` values (the CRD schema checked their shape).

    Raises:
        ValueError: A rule the schema could not reject (an invalid regular
            expression, a rule without any matcher); the message names it.
    """
    out = []
    for i, item in enumerate(items):
        where = f"spec.recovery.rules[{i}]"
        action = item.get("action")
        if action not in ACTIONS:
            raise ValueError(f"{where}.action must be one of {', '.join(ACTIONS)}, got {action!r}")
        codes = item.get("onExitCodes") or None
        cond = item.get("onPodCondition") or None
        message = item.get("onMessage")
        if message is not None:
            try:
                re.compile(message)
            except re.error as e:
                raise ValueError(f"{where}.onMessage is not a valid regular expression: {e}") from None
        rule = Rule(
            action=action,
            reason=item.get("reason") or None,
            exit_codes=frozenset(int(v) for v in codes.get("values") or ()) if codes else None,
            exit_codes_in=(codes or {}).get("operator", "In") != "NotIn",
            condition=(str(cond.get("type")), str(cond.get("reason") or "*")) if cond else None,
            pod_reasons=(item["onPodReason"],) if item.get("onPodReason") else (),
            container_reasons=(item["onContainerReason"],) if item.get("onContainerReason") else (),
            message=message,
            explain=f"{where} ({action})",
        )
        if not (rule.exit_codes is not None or rule.condition or rule.pod_reasons or rule.container_reasons
                or rule.message is not None):
            raise ValueError(f"{where} has no matcher: set onExitCodes, onPodCondition, onPodReason, "
                             "onContainerReason or onMessage")
        out.append(rule)
    return tuple(out)


@dataclass(frozen=True)
class Outcome:
    """How one pod ended (or is ending)."""

    kind: str  # PREEMPTION | FAILURE | TRANSIENT | FAIL_JOB | SUCCESS
    reason: str
    pod: str
    node: str | None
    exit_code: int | None = None
    step: int | None = None
    message: str = ""
    save_seconds: float | None = None

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" on node {self.node}" if self.node else "")
        if self.kind in (FAILURE, FAIL_JOB):
            text = f"{where} exited with code {self.exit_code}" if self.exit_code is not None else f"{where} failed"
            if self.reason not in ("Error", ""):
                text += f" ({self.reason})"
        elif self.kind == PREEMPTION:
            text = f"{where} was disrupted: {self.reason}"
        elif self.kind == TRANSIENT:
            text = f"{where} could not run: {self.reason}"
        else:
            text = f"{where} succeeded"
        if self.message:
            text += f": {self.message}"
        return text


def short_text(text: str | None, limit: int = 300) -> str:
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
    rules: tuple[Rule, ...] = (),
) -> Outcome | None:
    """The outcome of one pod, or ``None`` while it is still running normally.

    Args:
        pod: The pod.
        nodes: Node readiness by name (``None``: nodes are not watched).
        now: The reconcile's clock.
        node_not_ready_seconds: How long a node may be not Ready before its
            pods count as lost.
        rules: The user's rules, tried before :data:`BUILTIN_RULES`.
    """
    cm = pod.contract_message
    step = cm.step if cm else None
    base = {"pod": pod.name, "node": pod.node, "exit_code": pod.exit_code, "step": step,
            "save_seconds": cm.save_seconds if cm else None}
    if pod.phase != "Succeeded":
        for rule in (*rules, *BUILTIN_RULES):
            reason = rule.matches(pod)
            if reason is not None:
                return Outcome(rule.action, reason, message=_rule_message(rule, pod), **base)
    if pod.deleting and pod.phase not in ("Succeeded", "Failed"):
        return Outcome(PREEMPTION, "DeletedExternally", message="the pod was deleted by someone other than the operator", **base)
    if pod.phase == "Succeeded":
        return Outcome(SUCCESS, "Completed", **base)
    if pod.phase == "Failed":
        detail = cm.message if cm else (pod.termination_message or pod.status_message)
        return Outcome(FAILURE, pod.terminated_reason or "Error", message=short_text(detail), **base)
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


def _rule_message(rule: Rule, pod: PodView) -> str:
    cm = pod.contract_message
    if rule.trainer_reasons or (rule.exit_codes and contract.EXIT_PREEMPTED_AFTER_SNAPSHOT in rule.exit_codes):
        return f"emergency snapshot {cm.snapshot}" if cm and cm.snapshot else ""
    if rule.condition and rule.condition[0] == "DisruptionTarget" and rule.action == PREEMPTION:
        return short_text(pod.disruption_message)
    detail = (cm.message if cm else None) or pod.status_message or pod.disruption_message or pod.messages()
    return short_text("; ".join(t for t in (rule.explain, short_text(detail, 200)) if t))


def node_suspect(pod: PodView, nodes: Mapping[str, NodeView] | None) -> bool:
    """Is the pod on a node that is not Ready (but not yet declared lost)?"""
    if not pod.node or nodes is None:
        return False
    node = nodes.get(pod.node)
    return node is None or not node.ready
