"""Disruptions a test injects, done the way the real control plane does them.

* :func:`preempt`: what kube-scheduler does to a victim: the ``DisruptionTarget``
  condition (reason ``PreemptionByScheduler``), then a graceful DELETE.
* :func:`evict`: the Eviction API (falls back to condition + DELETE when the
  API server has no ``eviction`` subresource).
* :func:`lose_node` / :func:`restore_node`: the node agent kills or revives a
  whole node (see ``localcluster.nodeagent``).
* :func:`partition_node` / :func:`heal_node`: the node is cut off the API
  server (heartbeats and pod status stop) while its processes keep running.
"""

from __future__ import annotations

import time
from typing import Any

from localcluster.kube import ApiError, Client, Obj
from localcluster.nodeagent import LOST_ANNOTATION, PARTITIONED_ANNOTATION, cond, merge_conditions

DISRUPTION_TARGET = "DisruptionTarget"


def add_pod_condition(client: Client, namespace: str, pod: str, condition: Obj) -> Obj:
    """Add/replace one condition on a pod's status (merged by type, 409-safe)."""
    for _ in range(10):
        obj = client.get("pods", pod, namespace)
        conditions = merge_conditions((obj.get("status") or {}).get("conditions") or [], [condition])
        patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")}, "status": {"conditions": conditions}}
        try:
            return client.patch("pods", pod, patch, namespace, subresource="status")
        except ApiError as e:
            if e.status != 409:
                raise
        time.sleep(0.05)
    raise RuntimeError(f"could not update the conditions of pod {namespace}/{pod}: too many conflicts")


def preempt(
    client: Client,
    namespace: str,
    pod: str,
    reason: str = "PreemptionByScheduler",
    message: str = "Preempted in order to admit critical pod",
    *,
    grace_period: int | None = None,
) -> Obj:
    """Preempt ``pod`` as the scheduler does: DisruptionTarget, then DELETE with grace.

    Args:
        grace_period: Override of the pod's ``terminationGracePeriodSeconds``.

    Returns:
        The pod as the DELETE answered it (with ``deletionTimestamp``).
    """
    add_pod_condition(client, namespace, pod, cond(DISRUPTION_TARGET, True, reason, message))
    return client.delete("pods", pod, namespace, grace_period=grace_period)


def evict(client: Client, namespace: str, pod: str, *, grace_period: int | None = None) -> Any:
    """Evict via the ``eviction`` subresource; fall back to condition + DELETE.

    The fallback sets ``DisruptionTarget`` with reason ``EvictionByEvictionAPI``
    as the API server does on an accepted eviction (no PDB is checked).
    """
    body: Obj = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    if grace_period is not None:
        body["deleteOptions"] = {"gracePeriodSeconds": int(grace_period)}
    try:
        return client.create("pods", body, namespace, subresource="eviction")
    except ApiError as e:
        if e.status not in (404, 405, 415, 501):
            raise
        if e.status == 404 and client.get_or_none("pods", pod, namespace) is None:
            raise
    return preempt(client, namespace, pod, "EvictionByEvictionAPI", "Eviction API: evicting", grace_period=grace_period)


def lose_node(client: Client, node: str) -> Obj:
    """Lose ``node``: the agent SIGKILLs all its processes and stops reporting."""
    return client.patch("nodes", node, {"metadata": {"annotations": {LOST_ANNOTATION: "true"}}})


def restore_node(client: Client, node: str) -> Obj:
    """Bring a lost node back (its old pods are then reported Failed)."""
    return client.patch("nodes", node, {"metadata": {"annotations": {LOST_ANNOTATION: None}}})


def partition_node(client: Client, node: str) -> Obj:
    """Partition ``node``: it stops posting heartbeats and pod status, its processes keep running."""
    return client.patch("nodes", node, {"metadata": {"annotations": {PARTITIONED_ANNOTATION: "true"}}})


def heal_node(client: Client, node: str) -> Obj:
    """Heal a partitioned node: it reports again, and stops the processes of its pods deleted meanwhile."""
    return client.patch("nodes", node, {"metadata": {"annotations": {PARTITIONED_ANNOTATION: None}}})
