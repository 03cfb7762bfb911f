"""The stand-in's kube-scheduler filters: resources, taints, node selector and affinity.

Pure functions over Node and Pod dicts; the node agent calls
:func:`filter_node` for each candidate node and binds to one that passes, or
writes ``PodScheduled=False`` (reason ``Unschedulable``) with the message
:func:`unschedulable_message` builds, worded as the real scheduler's
("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.").

As in kube-scheduler's default profile, the filters of one node run in the
order NodeUnschedulable, TaintToleration, NodeAffinity (nodeSelector and
required node affinity), NodeResourcesFit, and the first that fails is the
node's reason (NodeResourcesFit names every resource that is short).
What is not modelled is listed in ``localcluster/README.md``.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping

Obj = dict[str, Any]

_SUFFIXES = {
    "Ki": Decimal(1024), "Mi": Decimal(1024) ** 2, "Gi": Decimal(1024) ** 3, "Ti": Decimal(1024) ** 4,
    "Pi": Decimal(1024) ** 5, "Ei": Decimal(1024) ** 6,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
#: The taints the node lifecycle controller and `kubectl cordon` put on nodes.
TAINT_UNREACHABLE = "node.kubernetes.io/unreachable"
TAINT_NOT_READY = "node.kubernetes.io/not-ready"
TAINT_UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
MSG_UNSCHEDULABLE_NODE = "node(s) were unschedulable"
MSG_AFFINITY = "node(s) didn't match Pod's node affinity/selector"


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", 4) as a number.

    Raises:
        ValueError: Not a quantity.
    """
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}")
    try:
        return Decimal(m.group(1)) * _SUFFIXES[m.group(2) or ""]
    except InvalidOperation:
        raise ValueError(f"invalid quantity {value!r}") from None


def pod_requests(pod: Mapping[str, Any]) -> dict[str, Decimal]:
    """What the pod asks of a node: its containers' requests summed (a limit
    without a request counts as the request, as the API server defaults it),
    or the largest init container's, whichever is larger per resource."""
    spec = pod.get("spec") or {}

    def of(container: Mapping[str, Any]) -> dict[str, Decimal]:
        res = container.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        out = {}
        for k, v in merged.items():
            try:
                out[k] = parse_quantity(v)
            except ValueError:
                continue  # the API server's validation owns bad quantities
        return out

    total: dict[str, Decimal] = {}
    for c in spec.get("containers") or []:
        for k, v in of(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in spec.get("initContainers") or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return total


def allocatable(node: Mapping[str, Any]) -> dict[str, Decimal]:
    out = {}
    for k, v in ((node.get("status") or {}).get("allocatable") or {}).items():
        try:
            out[k] = parse_quantity(v)
        except ValueError:
            continue
    return out


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Does some toleration match ``taint`` (key, value, effect, operator Equal/Exists)?"""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        op = t.get("operator") or "Equal"
        if not t.get("key"):
            if op == "Exists":
                return True
            continue
        if t.get("key") != taint.get("key"):
            continue
        if op == "Exists" or (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _expression_matches(expr: Mapping[str, Any], value: str | None) -> bool:
    op, values = expr.get("operator"), [str(v) for v in expr.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and values:
        try:
            a, b = int(value), int(values[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def matches_node_affinity(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """nodeSelector AND requiredDuringSchedulingIgnoredDuringExecution (terms ORed)."""
    spec = pod.get("spec") or {}
    md = node.get("metadata") or {}
    labels = md.get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    for term in terms:
        exprs = term.get("matchExpressions") or []
        fields = term.get("matchFields") or []
        if not exprs and not fields:
            continue  # an empty term matches nothing
        if all(_expression_matches(e, labels.get(e.get("key"))) for e in exprs) and all(
                _expression_matches(f, md.get("name") if f.get("key") == "metadata.name" else None) for f in fields):
            return True
    return False


def filter_node(pod: Mapping[str, Any], node: Mapping[str, Any], used: Mapping[str, Decimal]) -> list[str]:
    """Why ``pod`` cannot go to ``node`` (empty: it fits), in the real scheduler's words.

    Args:
        pod: The pod to place.
        node: The candidate Node.
        used: Requests of the pods already bound to the node (terminating ones included).
    """
    spec = pod.get("spec") or {}
    tolerations = spec.get("tolerations") or []
    if (node.get("spec") or {}).get("unschedulable") and not tolerates(
            tolerations, {"key": TAINT_UNSCHEDULABLE, "effect": "NoSchedule"}):
        return [MSG_UNSCHEDULABLE_NODE]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"]
    if not matches_node_affinity(pod, node):
        return [MSG_AFFINITY]
    have = allocatable(node)
    short = []
    for name, want in sorted(pod_requests(pod).items()):
        if want <= 0:
            continue
        if have.get(name, Decimal(0)) - used.get(name, Decimal(0)) < want:
            short.append(f"Insufficient {name}")
    if "pods" in have and used.get("pods", Decimal(0)) + 1 > have["pods"]:
        short.append("Too many pods")
    return short


def unschedulable_message(total_nodes: int, reasons: Iterable[list[str]]) -> str:
    """``0/N nodes are available: 3 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint {...}.``"""
    counts: Counter[str] = Counter()
    for node_reasons in reasons:
        counts.update(set(node_reasons))
    parts = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
    return f"0/{total_nodes} nodes are available: {parts}." if parts else f"0/{total_nodes} nodes are available."


def add_usage(used: dict[str, Decimal], pod: Mapping[str, Any]) -> None:
    """Count ``pod``'s requests (and one pod) on its node's usage."""
    for k, v in pod_requests(pod).items():
        used[k] = used.get(k, Decimal(0)) + v
    used["pods"] = used.get("pods", Decimal(0)) + 1
