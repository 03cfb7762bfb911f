"""Snapshots on request and ahead of a reclaim (issue 12): the operator's side.

A request reaches the training pods only through the job's S3 folder (the
pods have no API access): the operator writes
:data:`~trainingjob_trainer.contract.SNAPSHOT_REQUEST_OBJECT` with a value,
global rank 0 of the gang polls it, the gang snapshots at the next step
boundary, and rank 0 writes :data:`~trainingjob_trainer.contract.SNAPSHOT_ACK_OBJECT`
naming the value and the snapshot. The operator copies the ack into
``status.snapshot.lastRequest``.

Two sources ask for one:

* the annotation :data:`~trainingjob_trainer.contract.ANNOTATION_SNAPSHOT_REQUEST`
  (``kubectl annotate tj NAME trainingjob.dev/snapshot-request=<new value>``,
  or ``kubectl tj snapshot NAME``): each new value is relayed once;
* a reclaim warning on a node that runs a pod of the current gang (a taint of
  :attr:`ReclaimConfig.taints`, or the ``DisruptionTarget`` condition on the
  pod): the operator relays ``reclaim-<node>-<attempt>`` once per node and
  attempt, and posts an Event naming the node and the warning.

The decision is pure (:func:`decide`, called by :func:`~.reconcile.reconcile`)
and recorded in ``status.snapshot.request`` before the object is written
(:func:`write_request`, by the handlers after the status): level-triggered,
the write is repeated while S3 holds another value and no ack names this one.
Writing the same value twice is harmless: the trainer serves a value once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from trainingjob_trainer import contract, s3

#: Node taints that announce a reclaim, by default (the chart's ``reclaimWarnings.nodeTaints``).
DEFAULT_RECLAIM_TAINTS = (
    "aws-node-termination-handler/spot-itn",
    "cloud.google.com/impending-node-termination",
    "karpenter.sh/disrupted",
    "ToBeDeletedByClusterAutoscaler",
)
DISRUPTION_TARGET = "DisruptionTarget"

# ``status.snapshot.request.reason`` values and Event reasons.
SOURCE_ANNOTATION = "Annotation"
SOURCE_RECLAIM = "ReclaimWarning"
R_REQUESTED = "SnapshotRequested"
R_RECLAIM_WARNING = "ReclaimWarning"
R_REQUEST_SERVED = "SnapshotRequestServed"
R_REQUEST_FAILED = "SnapshotRequestFailed"
R_REQUEST_IGNORED = "SnapshotRequestIgnored"

#: Longest value relayed (a label-like token fits; longer is refused with an Event).
MAX_VALUE_LENGTH = 253
#: Seconds a gang holds at a reclaim snapshot's step by default (the chart's
#: ``reclaimWarnings.holdSeconds``): long enough for the kill that follows a
#: spot warning (AWS gives 2 minutes); a false alarm costs at most this idle.
DEFAULT_RECLAIM_HOLD_SECONDS = 120


@dataclass(frozen=True)
class ReclaimConfig:
    """Which warnings count as "this node is about to be reclaimed".

    Attributes:
        taints: Node taint keys (any value, any effect).
        pod_condition: Whether the ``DisruptionTarget`` pod condition counts.
        hold_seconds: The reclaim request's hold: after the snapshot the gang
            stops stepping for at most this long, so a kill without SIGTERM
            loses no step (0: it trains on; steps after the snapshot are lost).
    """

    taints: tuple[str, ...] = DEFAULT_RECLAIM_TAINTS
    pod_condition: bool = True
    hold_seconds: int = DEFAULT_RECLAIM_HOLD_SECONDS


def parse_taint_list(text: str | None) -> tuple[str, ...]:
    """Taint keys from a comma-separated flag/env value (``None``: the defaults; empty: none)."""
    if text is None:
        return DEFAULT_RECLAIM_TAINTS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def node_warnings(node: Mapping[str, Any], *, taints: Sequence[str]) -> tuple[str, ...]:
    """The reclaim taints on ``node``, as ``key[=value]:effect`` (sorted; empty: none)."""
    out = []
    for t in (node.get("spec") or {}).get("taints") or []:
        key = t.get("key")
        if key in taints:
            value = f"={t['value']}" if t.get("value") else ""
            out.append(f"{key}{value}:{t.get('effect') or ''}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class NodeWarning:
    """A reclaim warning for one node of the current gang."""

    node: str
    pod: str
    what: str  # "taint karpenter.sh/disrupted:NoSchedule" | "pod condition DisruptionTarget (reason)"


def reclaim_warnings(pods: Sequence[Mapping[str, Any]], *, nodes: Mapping[str, tuple[str, ...]] | None,
                     config: ReclaimConfig) -> list[NodeWarning]:
    """The warnings for the nodes of ``pods`` (the current gang), one per node (pure).

    Args:
        pods: The pods of the current attempt.
        nodes: Reclaim taints per node name (``None``: nodes are not watched;
            then only the pod condition is seen).
        config: What counts as a warning.
    """
    found: dict[str, NodeWarning] = {}
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        node = (p.get("spec") or {}).get("nodeName")
        status = p.get("status") or {}
        if not node or node in found or status.get("phase") in ("Succeeded", "Failed"):
            continue
        taints = (nodes or {}).get(node) or ()
        if taints:
            found[node] = NodeWarning(node, p["metadata"]["name"], "taint " + ", ".join(taints))
            continue
        if config.pod_condition:
            for c in status.get("conditions") or []:
                if c.get("type") == DISRUPTION_TARGET and c.get("status") == "True":
                    found[node] = NodeWarning(node, p["metadata"]["name"],
                                          f"pod condition {DISRUPTION_TARGET} ({c.get('reason') or 'no reason'})")
    return list(found.values())


def reclaim_value(node: str, attempt: int) -> str:
    """The request value the operator chooses for a reclaim of ``node`` during ``attempt``."""
    return f"reclaim-{node}-{attempt}"


@dataclass(frozen=True)
class LiveState:
    """The request and the ack as the operator last read them from S3."""

    request: contract.SnapshotRequest | None = None
    ack: contract.SnapshotAck | None = None


@dataclass
class Decision:
    """What :func:`decide` wants: the new ``status.snapshot`` keys, Events, a write."""

    request: dict[str, Any] | None = None
    last_request: dict[str, Any] | None = None
    request_error: str | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    write: contract.SnapshotRequest | None = None


def decide(*, annotation: Any, warnings: Sequence[NodeWarning], attempt: int, snapshot_status: Mapping[str, Any],
           live: LiveState | None, write_error: str | None, now: dt.datetime,
           hold_seconds: int = DEFAULT_RECLAIM_HOLD_SECONDS) -> Decision:
    """The pure decision of one reconcile.

    Args:
        annotation: The job's snapshot-request annotation value (``None``: absent).
        warnings: The reclaim warnings of the current gang (:func:`reclaim_warnings`).
        attempt: The current attempt.
        snapshot_status: ``status.snapshot`` as the operator wrote it before.
        live: The request and ack in S3 (``None``: S3 not read yet or unreadable).
        write_error: Why the last write of the request failed, if it did.
        now: The reconcile's clock.
        hold_seconds: The hold a reclaim request asks for (user requests: none).
    """
    d = Decision()
    old = dict(snapshot_status.get("request") or {})
    req = dict(old)
    at = now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(annotation, str) and annotation and annotation != old.get("annotation"):
        req["annotation"] = annotation
        if len(annotation) > MAX_VALUE_LENGTH:
            d.events.append(("Warning", R_REQUEST_IGNORED, f"annotation {contract.ANNOTATION_SNAPSHOT_REQUEST} is "
                             f"{len(annotation)} characters; use at most {MAX_VALUE_LENGTH}"))
        else:
            req.update(value=annotation, reason=SOURCE_ANNOTATION, requestedAt=at)
            req.pop("node", None)
            d.events.append(("Normal", R_REQUESTED, f"snapshot requested by annotation "
                             f"{contract.ANNOTATION_SNAPSHOT_REQUEST}={annotation}"))
    done = list(old.get("reclaims") or [])  # values name the attempt: a new gang is warned anew
    for w in warnings:
        value = reclaim_value(w.node, attempt)
        if value in done:
            continue
        done.append(value)
        req.update(value=value, reason=SOURCE_RECLAIM, node=w.node, requestedAt=at)
        d.events.append(("Warning", R_RECLAIM_WARNING, f"node {w.node} (pod {w.pod}) has a reclaim warning: "
                         f"{w.what}; requested snapshot {value}"))
    if done or old.get("reclaims"):
        req["reclaims"] = done[-16:]
    d.request = req or None
    ack = live.ack if live else None
    if ack is not None:
        d.last_request = {"value": ack.value, "step": ack.step, "completedAt": ack.completed_at,
                          "snapshot": ack.snapshot}
        if (snapshot_status.get("lastRequest") or {}).get("value") != ack.value:
            d.events.append(("Normal", R_REQUEST_SERVED, f"snapshot request {ack.value} served at step {ack.step}: "
                             f"{ack.snapshot}"))
    value = req.get("value")
    if value and live is not None and (ack is None or ack.value != value) \
            and (live.request is None or live.request.value != value):
        d.write = contract.SnapshotRequest(value=value, requested_at=req.get("requestedAt") or at,
                                           hold_seconds=hold_seconds if req.get("reason") == SOURCE_RECLAIM else 0)
    if write_error:
        d.request_error = write_error
        if snapshot_status.get("requestError") != write_error:
            d.events.append(("Warning", R_REQUEST_FAILED, write_error))
    return d


# --------------------------------------------------------------------------
# S3 (blocking; the handlers run these in a thread)
# --------------------------------------------------------------------------
class LiveCache:
    """The request and ack objects per job root, re-read only when their ETag changes.

    The listing that finds snapshots also returns the ``_tj/`` keys with
    their ETags (:func:`~trainingjob_trainer.contract.live_entries`): a pass
    where nothing moved makes no extra request.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[str | None, Any]] = {}

    def read(self, fs: Any, root_path: str, entries: Mapping[str, Mapping[str, Any]]) -> LiveState:
        """The live state under ``root_path`` (no scheme), GETting only changed objects."""
        parsed = {}
        for rel, parse in ((contract.SNAPSHOT_REQUEST_OBJECT, contract.SnapshotRequest.from_json),
                           (contract.SNAPSHOT_ACK_OBJECT, contract.SnapshotAck.from_json)):
            meta = entries.get(rel)
            key = (root_path, rel)
            if meta is None:
                self._seen.pop(key, None)
                parsed[rel] = None
                continue
            etag = str(meta.get("etag") or "") or None
            seen = self._seen.get(key)
            if seen is None or seen[0] != etag or etag is None:
                try:
                    value = parse(s3.cat_small(fs, f"{root_path}/{rel}"))
                except FileNotFoundError:
                    value = None
                self._seen[key] = (etag, value)
                seen = self._seen[key]
            parsed[rel] = seen[1]
        return LiveState(request=parsed[contract.SNAPSHOT_REQUEST_OBJECT], ack=parsed[contract.SNAPSHOT_ACK_OBJECT])

    def forget(self, root_path: str) -> None:
        for key in [k for k in self._seen if k[0] == root_path]:
            del self._seen[key]


def write_request(root: str, storage_options: Mapping[str, Any], request: contract.SnapshotRequest) -> None:
    """PUT the request object into job root ``root`` (raises the S3 error)."""
    fs, path = s3.filesystem(contract.live_object_uri(root, contract.SNAPSHOT_REQUEST_OBJECT), storage_options)
    fs.pipe_file(path, request.to_json().encode())
