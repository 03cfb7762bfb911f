"""The control-plane parts the node agent plays beside the kubelet: the scheduler's
binding loop and the node lifecycle controller, plus the pod-status helpers they share.

:class:`ControlPlaneMixin` is mixed into :class:`localcluster.nodeagent.NodeAgent`
and uses its client, config and status writer; the scheduling filters
themselves are pure functions in :mod:`localcluster.scheduler`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from localcluster import scheduler
from localcluster.kube import ApiError, Client, Obj

log = logging.getLogger("localcluster.nodeagent")

HOSTNAME_LABEL = "kubernetes.io/hostname"
TERMINAL = ("Succeeded", "Failed")


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge_conditions(existing: list[Obj], updates: list[Obj]) -> list[Obj]:
    """Conditions keyed by type: ``updates`` replace, the others are kept.

    ``lastTransitionTime`` is kept when the status did not change.
    """
    out = {c.get("type"): dict(c) for c in existing if c.get("type")}
    for u in updates:
        old = out.get(u["type"])
        new = dict(u)
        if old and old.get("status") == new.get("status") and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        new.setdefault("lastTransitionTime", now_rfc3339())
        out[u["type"]] = {**(old or {}), **new}
    return list(out.values())


def cond(ctype: str, status: bool | str, reason: str | None = None, message: str | None = None) -> Obj:
    c: Obj = {"type": ctype, "status": status if isinstance(status, str) else ("True" if status else "False")}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


@dataclass
class LostNode:
    since: float
    unknown_marked: bool = False
    evicted: bool = False
    abandoned: set[str] = field(default_factory=set)  # pod uids whose processes died with the node




class ControlPlaneMixin:
    """Scheduler and node lifecycle controller of the agent (see the module docstring).

    The agent provides the attributes below and ``_write_status``,
    ``_patch_node_ready``, ``_node_resources``, ``_heartbeat_posted`` and ``_kill_and_reap``.
    """

    client: Client
    cfg: Any
    lost: dict[str, LostNode]
    ready_nodes: set[str]
    containers: dict[str, Any]
    _nodes_cache: dict[str, Obj]
    _binding_supported: bool | None

    # -------------------------------------------------------------- node lifecycle controller
    def lose(self, name: str) -> None:
        """The node dies: every process of it is SIGKILLed at once; nothing is reported."""
        log.warning("node %s lost: killing its containers", name)
        lost = LostNode(since=time.monotonic())
        self.lost[name] = lost
        self.ready_nodes.discard(name)
        victims = [c for c in self.containers.values() if c.node == name]
        self._kill_and_reap(victims)
        for c in victims:
            lost.abandoned.add(c.uid)
            del self.containers[c.uid]

    def recover(self, node: Obj) -> None:
        name = node["metadata"]["name"]
        log.warning("node %s is back", name)
        del self.lost[name]
        taints = [t for t in (node.get("spec") or {}).get("taints") or [] if not t.get("key", "").startswith("node.kubernetes.io/unreachable")]
        self.client.patch("nodes", name, {"spec": {"taints": taints or None}})
        self._patch_node_ready(node, "True", "KubeletReady", "kubelet is posting ready status")
        self._heartbeat_posted(name)
        self.ready_nodes.add(name)

    def sync_lost_nodes(self, pods: list[Obj]) -> None:
        """The node lifecycle controller's part for lost nodes."""
        now = time.monotonic()
        for name, lost in self.lost.items():
            if not lost.unknown_marked and now - lost.since >= self.cfg.node_monitor_grace_seconds:
                node = self.client.get("nodes", name)
                self._patch_node_ready(node, "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.")
                taints = [t for t in (node.get("spec") or {}).get("taints") or [] if not t.get("key", "").startswith("node.kubernetes.io/unreachable")]
                taints += [
                    {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule", "timeAdded": now_rfc3339()},
                    {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": now_rfc3339()},
                ]
                self.client.patch("nodes", name, {"spec": {"taints": taints}})
                lost.unknown_marked = True
                self._mark_pods_not_ready(name, pods)
            evict_after = self.cfg.pod_eviction_seconds
            if evict_after is not None and lost.unknown_marked and not lost.evicted and now - lost.since >= self.cfg.node_monitor_grace_seconds + evict_after:
                self._taint_evict(name, pods)
                lost.evicted = True

    def _pods_on(self, node: str, pods: list[Obj]) -> list[Obj]:
        return [p for p in pods if (p.get("spec") or {}).get("nodeName") == node
                and (p.get("status") or {}).get("phase") not in TERMINAL]

    def _mark_pods_not_ready(self, node: str, pods: list[Obj]) -> None:
        """The node lifecycle controller's MarkPodsNotReady: Ready=False on every pod of the node."""
        for pod in self._pods_on(node, pods):
            try:
                self._write_status(pod, lambda p: {"conditions": merge_conditions(
                    (p.get("status") or {}).get("conditions") or [], [cond("Ready", False, "NodeNotReady", "Node is not ready")])})
            except ApiError as e:
                if e.status != 404:
                    log.warning("marking %s not ready: %s", pod["metadata"]["name"], e)

    def _taint_evict(self, node: str, pods: list[Obj]) -> None:
        """The taint manager: DisruptionTarget, then a GRACEFUL delete (the pod's own grace period).

        No kubelet finishes it while the node is lost: the pod stays
        Terminating until the node comes back or someone force-deletes it.
        """
        for pod in self._pods_on(node, pods):
            md = pod["metadata"]
            try:
                self._write_status(pod, lambda p: {"conditions": merge_conditions(
                    (p.get("status") or {}).get("conditions") or [],
                    [cond("DisruptionTarget", True, "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint")])})
                self.client.delete("pods", md["name"], md.get("namespace"))
            except ApiError as e:
                if e.status != 404:
                    log.warning("evicting %s: %s", md["name"], e)

    # -------------------------------------------------------------- scheduler
    def schedule(self, pods: list[Obj]) -> None:
        """kube-scheduler's part: bind each pending pod to a node that passes the filters
        (:mod:`localcluster.scheduler`), fewest active pods first; else ``PodScheduled=False``."""
        used: dict[str, dict[str, Any]] = {n: {} for n in self.cfg.nodes}
        load: dict[str, int] = {n: 0 for n in self.cfg.nodes}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node in load and (pod.get("status") or {}).get("phase") not in TERMINAL:
                load[node] += 1
                scheduler.add_usage(used[node], pod)
        for pod in pods:
            spec, md = pod.get("spec") or {}, pod["metadata"]
            if spec.get("nodeName") or md.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in TERMINAL:
                continue
            sched = spec.get("schedulerName")
            if sched and sched != "default-scheduler":
                continue
            if spec.get("schedulingGates"):
                self._pod_scheduled_false(pod, "SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates")
                continue
            reasons: dict[str, list[str]] = {}
            for n in self.cfg.nodes:
                if n in self.lost or n not in self.ready_nodes:
                    reasons[n] = [f"node(s) had untolerated taint {{{scheduler.TAINT_UNREACHABLE}: }}"]
                    continue
                reasons[n] = scheduler.filter_node(pod, self._nodes_cache.get(n) or self._bare_node(n), used[n])
            candidates = [n for n, why in reasons.items() if not why]
            if not candidates:
                self._pod_scheduled_false(pod, "Unschedulable",
                                          scheduler.unschedulable_message(len(self.cfg.nodes), reasons.values()))
                continue
            node = min(candidates, key=lambda n: (load[n], n))
            try:
                self.bind(pod, node)
            except ApiError as e:
                log.warning("binding %s to %s: %s", md["name"], node, e)
                continue
            load[node] += 1
            scheduler.add_usage(used[node], pod)
            spec["nodeName"] = node  # the rest of this tick sees it bound

    def _pod_scheduled_false(self, pod: Obj, reason: str, message: str) -> None:
        try:
            self._write_status(pod, lambda p: {"conditions": merge_conditions(
                (p.get("status") or {}).get("conditions") or [], [cond("PodScheduled", False, reason, message)])},
                only_if_changed=True)
        except ApiError as e:
            log.warning("%s %s: %s", reason, pod["metadata"]["name"], e)

    def _bare_node(self, name: str) -> Obj:
        return {"metadata": {"name": name, "labels": {HOSTNAME_LABEL: name}},
                "status": {"allocatable": self._node_resources(name)}}

    def _node_labels(self, name: str) -> Mapping[str, str]:
        node = self._nodes_cache.get(name) or {}
        return (node.get("metadata") or {}).get("labels") or {HOSTNAME_LABEL: name}

    def bind(self, pod: Obj, node: str) -> None:
        md = pod["metadata"]
        ns, name = md.get("namespace", "default"), md["name"]
        bound = False
        if self._binding_supported is not False:
            body = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": md.get("uid")},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            }
            try:
                self.client.create("pods", body, ns, subresource="binding")
                self._binding_supported = bound = True
            except ApiError as e:
                if e.status not in (404, 405, 415, 501):
                    raise
                self._binding_supported = False
        if not bound:
            self.client.patch("pods", name, {"spec": {"nodeName": node}}, ns)
        log.info("bound %s/%s to %s", ns, name, node)
        fresh = self.client.get("pods", name, ns)
        self._write_status(fresh, lambda p: {"conditions": merge_conditions(
            (p.get("status") or {}).get("conditions") or [], [cond("PodScheduled", True)])})
