"""Pure builders of the objects the operator creates (dicts, no API calls).

Names are deterministic so a retried or repeated reconcile can never create a
second gang: the rendezvous Service of attempt N is ``<job>-<N>`` and the pod
of node rank R is ``<job>-<N>-<R>`` (its hostname; the Service is its
subdomain, which gives rank 0 the stable DNS name torchrun's c10d rendezvous
connects to).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from trainingjob_trainer import contract

from .model import JobSpec


def service_name(job: str, attempt: int) -> str:
    return f"{job}-{attempt}"


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-{attempt}-{rank}"


def rendezvous_host(job: str, namespace: str, attempt: int) -> str:
    """Rank 0's DNS name: ``<pod>.<service>.<namespace>.svc``."""
    return f"{pod_name(job, attempt, 0)}.{service_name(job, attempt)}.{namespace}.svc"


def job_snapshot_uri(spec: JobSpec, namespace: str, name: str) -> str | None:
    if spec.snapshot is None:
        return None
    return contract.job_snapshot_root(spec.snapshot.uri, namespace, name)


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def gang_labels(body: Mapping[str, Any], attempt: int) -> dict[str, str]:
    return {
        contract.LABEL_JOB_NAME: body["metadata"]["name"],
        contract.LABEL_JOB_UID: body["metadata"]["uid"],
        contract.LABEL_ATTEMPT: str(attempt),
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
    }


def get_service(body: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """Headless Service of one attempt: DNS for every pod, rank 0 hosts the rendezvous."""
    name = body["metadata"]["name"]
    labels = gang_labels(body, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name, attempt),
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is Ready: the others dial it
            # while it is still waiting for them.
            "publishNotReadyAddresses": True,
            # The uid too: pods of an earlier job of the same name never match.
            "selector": {contract.LABEL_JOB_NAME: name, contract.LABEL_JOB_UID: body["metadata"]["uid"],
                         contract.LABEL_ATTEMPT: str(attempt)},
            "ports": [{"name": "rendezvous", "port": contract.RDZV_PORT, "targetPort": contract.RDZV_PORT}],
        },
    }


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def get_env(
    body: Mapping[str, Any],
    spec: JobSpec,
    *,
    attempt: int,
    rank: int,
    resume_from: str | None,
) -> list[dict[str, Any]]:
    """The contract's environment of one pod, then the user's env."""
    meta = body["metadata"]
    name, ns = meta["name"], meta["namespace"]
    env = [
        _env(contract.ENV_JOB_NAME, name),
        _env(contract.ENV_JOB_NAMESPACE, ns),
        _env(contract.ENV_JOB_UID, meta["uid"]),
        _env(contract.ENV_ATTEMPT, attempt),
        _env(contract.ENV_NODE_RANK, rank),
        _env(contract.ENV_NNODES, spec.nodes),
        _env(contract.ENV_TERMINATION_MESSAGE_PATH, contract.DEFAULT_TERMINATION_MESSAGE_PATH),
        _env(contract.ENV_GRACE_PERIOD_SECONDS, spec.termination_grace_period_seconds),
        # torchrun's own flags as PET_* so `torchrun script.py` needs none.
        _env(contract.PET_NNODES, spec.nodes),
        _env(contract.PET_NPROC_PER_NODE, spec.procs_per_node),
        _env(contract.PET_NODE_RANK, rank),
        _env(contract.PET_RDZV_BACKEND, contract.RDZV_BACKEND),
        _env(contract.PET_RDZV_ENDPOINT, f"{rendezvous_host(name, ns, attempt)}:{contract.RDZV_PORT}"),
        _env(contract.PET_RDZV_ID, f"{meta['uid']}-{attempt}"),
        # Rank 0 hosts the c10d store; said explicitly instead of relying on
        # torch matching the pod's FQDN against the endpoint.
        _env(contract.PET_RDZV_CONF, f"is_host={1 if rank == 0 else 0}"),
        _env(contract.PET_MAX_RESTARTS, 0),  # the operator owns restarts
    ]
    snap = spec.snapshot
    if snap is not None:
        env += [
            _env(contract.ENV_SNAPSHOT_URI, contract.job_snapshot_root(snap.uri, ns, name)),
            _env(contract.ENV_SNAPSHOT_BACKEND, snap.backend),
            _env(contract.ENV_SNAPSHOT_EVERY_STEPS, snap.every_steps),
            _env(contract.ENV_SNAPSHOT_KEEP_LAST, snap.keep_last),
            _env(contract.ENV_S3_REGION, snap.region or "us-east-1"),
            _env(contract.ENV_CONTROL_POLL_SECONDS, snap.request_poll_seconds),
        ]
        if snap.endpoint:
            env.append(_env(contract.ENV_S3_ENDPOINT, snap.endpoint))
        if snap.progress_seconds:
            env.append(_env(contract.ENV_PROGRESS_SECONDS, snap.progress_seconds))
        if snap.credentials_secret:
            for key in contract.SECRET_KEYS_REQUIRED + contract.SECRET_KEYS_OPTIONAL:
                ref = {"name": snap.credentials_secret, "key": key}
                if key in contract.SECRET_KEYS_OPTIONAL:
                    ref["optional"] = True
                env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if resume_from:
        env.append(_env(contract.ENV_RESUME_FROM, resume_from))
    env += [copy.deepcopy(dict(e)) for e in spec.env]
    return env


def get_pod(
    body: Mapping[str, Any],
    spec: JobSpec,
    *,
    attempt: int,
    rank: int,
    resume_from: str | None,
) -> dict[str, Any]:
    """Pod of node ``rank`` in gang ``attempt``; podTemplate merged, operator fields win."""
    meta = body["metadata"]
    name, ns = meta["name"], meta["namespace"]
    tmpl = spec.pod_template or {}
    tmeta = tmpl.get("metadata") or {}
    labels = dict(tmeta.get("labels") or {})
    labels.update(gang_labels(body, attempt))
    labels[contract.LABEL_NODE_RANK] = str(rank)
    annotations = dict(tmeta.get("annotations") or {})
    if spec.queue_name:
        labels[contract.KUEUE_LABEL_QUEUE_NAME] = spec.queue_name
        labels[contract.KUEUE_LABEL_POD_GROUP_NAME] = service_name(name, attempt)
        annotations[contract.KUEUE_ANNOTATION_POD_GROUP_TOTAL_COUNT] = str(spec.nodes)
    container: dict[str, Any] = {
        "name": contract.CONTAINER_NAME,
        "image": spec.image,
        "command": list(spec.command),
        "args": list(spec.args),
        "env": get_env(body, spec, attempt=attempt, rank=rank, resume_from=resume_from),
        "terminationMessagePath": contract.DEFAULT_TERMINATION_MESSAGE_PATH,
        # Our trainer writes a JSON message; anything else falls back to the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rank == 0:
        container["ports"] = [{"name": "rendezvous", "containerPort": contract.RDZV_PORT}]
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.working_dir:
        container["workingDir"] = spec.working_dir
    if spec.resources:
        container["resources"] = copy.deepcopy(dict(spec.resources))
    if spec.volume_mounts:
        container["volumeMounts"] = [copy.deepcopy(dict(m)) for m in spec.volume_mounts]
    pod_spec = copy.deepcopy(dict(tmpl.get("spec") or {}))
    pod_spec.update(
        {
            "containers": [container],
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
            "hostname": pod_name(name, attempt, rank),
            "subdomain": service_name(name, attempt),
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, attempt, rank),
            "namespace": ns,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": pod_spec,
    }
