"""The TrainingJob spec as typed values, and the checks the CRD schema cannot do.

The CRD schema (charts/trainingjob-operator/crds/trainingjobs.yaml) rejects
most bad input at admission. :func:`parse_spec` re-applies the schema's
defaults (an old CRD, or a server that does not default, must not crash the
operator) and :func:`validate` catches what a schema cannot express, such as
a name too long for the pod names derived from it. A job that fails these
checks is marked ``Failed`` with reason ``InvalidSpec``; nothing raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainingjob_trainer import contract

from .classify import Rule, rules_from_spec

# Pod names are "<job>-<attempt>-<rank>" and double as hostnames (DNS labels,
# at most 63 characters): keep room for a 6-digit attempt and a 4-digit rank.
MAX_JOB_NAME_LENGTH = 63 - len("-999999-1023")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SHELL_CHARS = re.compile(r"[\s;|&$<>`()]")
_FORBIDDEN_POD_FIELDS = {
    "restartPolicy": "the operator owns restarts and always uses Never (see spec.recovery)",
    "hostNetwork": "gang members would collide on the rendezvous port",
    "hostPID": "not allowed for training pods",
    "hostIPC": "not allowed for training pods",
    "containers": "set the trainer with spec.image, spec.command, spec.env and spec.volumeMounts",
    "initContainers": "set the trainer with spec.image, spec.command, spec.env and spec.volumeMounts",
    "nodeName": "use nodeSelector or affinity",
    "hostname": "the operator sets it for the rendezvous",
    "subdomain": "the operator sets it for the rendezvous",
}
RESERVED_ENV_PREFIXES = ("TJ_", "PET_")

#: kube-controller-manager's ``--node-monitor-grace-period`` since Kubernetes
#: 1.32 (40 s before): how long a silent kubelet's node stays Ready.
NODE_MONITOR_GRACE_SECONDS = 50
#: ``--node-monitor-period``: how often the node lifecycle controller looks.
NODE_MONITOR_PERIOD_SECONDS = 5
#: Slack for the operator's own watch latency and resync.
NODE_MONITOR_MARGIN_SECONDS = 5
#: ``failureSettleSeconds`` default: a worker that failed because its peer's
#: node died is held until that node can have been marked NotReady.
DEFAULT_FAILURE_SETTLE_SECONDS = NODE_MONITOR_GRACE_SECONDS + NODE_MONITOR_PERIOD_SECONDS + NODE_MONITOR_MARGIN_SECONDS


@dataclass(frozen=True)
class SnapshotSpec:
    uri: str
    backend: str = "dcp"  # chosen by bench/snapshot.py, see docs/benchmarks.md
    every_steps: int = 100
    keep_last: int = 3
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None
    resume_from: str | None = None
    stall_after_intervals: int = 3
    #: Seconds between two progress writes of the trainer (``None``: its default, 15).
    progress_seconds: int | None = None
    #: Seconds between two reads of the snapshot-request object by rank 0.
    request_poll_seconds: int = 5


@dataclass(frozen=True)
class RecoverySpec:
    max_preemptions: int = 100
    max_failures: int = 3
    backoff_seconds: int = 10
    max_backoff_seconds: int = 600
    node_not_ready_seconds: int = 60
    failure_settle_seconds: int = DEFAULT_FAILURE_SETTLE_SECONDS
    #: A container still waiting (image pull, config error) this long after
    #: its attempt started ends the job when its reason is permanent.
    startup_timeout_seconds: int = 300
    #: A gang not fully scheduled and running this long after its attempt
    #: started is torn down and retried (not counted as a failure).
    scheduling_timeout_seconds: int = 300
    #: How long past a fenced pod's deletionTimestamp (the end of its grace
    #: period) fencing waits before it escalates.
    fence_timeout_seconds: int = 60
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    """A TrainingJob's spec with the schema's defaults applied."""

    image: str
    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    nodes: int = 1
    procs_per_node: int = 1
    image_pull_policy: str | None = None
    working_dir: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    env: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    snapshot: SnapshotSpec | None = None
    recovery: RecoverySpec = RecoverySpec()
    termination_grace_period_seconds: int = 120
    clean_pod_policy: str = "Running"
    pod_template: Mapping[str, Any] = field(default_factory=dict)
    suspend: bool = False
    #: Kueue LocalQueue: the attempt's pods are labelled as one Kueue pod group.
    queue_name: str | None = None


class SpecError(ValueError):
    """The spec cannot be run; the message tells the user what to change."""


def _int(d: Mapping[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{key} must be an integer, got {v!r}")
    return v


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SpecError(f"{what} must be a list of strings")
    return tuple(v)


def parse_spec(spec: Mapping[str, Any] | None) -> JobSpec:
    """Typed spec with defaults; raises :class:`SpecError` on wrong types."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec is missing")
    image = spec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise SpecError("spec.image is required: the container image of the training code")
    command = _str_list(spec.get("command"), "spec.command")
    if not command:
        raise SpecError('spec.command is required, as an argv list such as ["torchrun", "train.py"]')
    snap = spec.get("snapshot")
    snapshot = None
    if snap is not None:
        if not isinstance(snap, Mapping) or not isinstance(snap.get("uri"), str):
            raise SpecError("spec.snapshot.uri is required when spec.snapshot is set")
        snapshot = SnapshotSpec(
            uri=snap["uri"],
            backend=snap.get("backend", "dcp"),
            every_steps=_int(snap, "everySteps", 100),
            keep_last=_int(snap, "keepLast", 3),
            endpoint=snap.get("endpoint") or None,
            region=snap.get("region") or None,
            credentials_secret=snap.get("credentialsSecret") or None,
            resume_from=snap.get("resumeFrom") or None,
            stall_after_intervals=_int(snap, "stallAfterIntervals", 3),
            progress_seconds=_int(snap, "progressSeconds", 0) or None,
            request_poll_seconds=_int(snap, "requestPollSeconds", 5),
        )
    rec = spec.get("recovery") or {}
    if not isinstance(rec, Mapping):
        raise SpecError("spec.recovery must be an object")
    recovery = RecoverySpec(
        max_preemptions=_int(rec, "maxPreemptions", 100),
        max_failures=_int(rec, "maxFailures", 3),
        backoff_seconds=_int(rec, "backoffSeconds", 10),
        max_backoff_seconds=_int(rec, "maxBackoffSeconds", 600),
        node_not_ready_seconds=_int(rec, "nodeNotReadySeconds", 60),
        failure_settle_seconds=_int(rec, "failureSettleSeconds", DEFAULT_FAILURE_SETTLE_SECONDS),
        startup_timeout_seconds=_int(rec, "startupTimeoutSeconds", 300),
        scheduling_timeout_seconds=_int(rec, "schedulingTimeoutSeconds", 300),
        fence_timeout_seconds=_int(rec, "fenceTimeoutSeconds", 60),
        rules=_rules(rec.get("rules")),
    )
    env = spec.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, Mapping) and isinstance(e.get("name"), str) for e in env):
        raise SpecError("spec.env must be a list of {name, value|valueFrom}")
    mounts = spec.get("volumeMounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, Mapping) for m in mounts):
        raise SpecError("spec.volumeMounts must be a list of volume mounts")
    tmpl = spec.get("podTemplate") or {}
    if not isinstance(tmpl, Mapping):
        raise SpecError("spec.podTemplate must be an object")
    res = spec.get("resources") or {}
    if not isinstance(res, Mapping):
        raise SpecError("spec.resources must be an object with limits/requests")
    return JobSpec(
        image=image,
        command=command,
        args=_str_list(spec.get("args"), "spec.args"),
        nodes=_int(spec, "nodes", 1),
        procs_per_node=_int(spec, "procsPerNode", 1),
        image_pull_policy=spec.get("imagePullPolicy"),
        working_dir=spec.get("workingDir"),
        resources=res,
        env=tuple(env),
        volume_mounts=tuple(mounts),
        snapshot=snapshot,
        recovery=recovery,
        termination_grace_period_seconds=_int(spec, "terminationGracePeriodSeconds", 120),
        clean_pod_policy=spec.get("cleanPodPolicy", "Running"),
        pod_template=tmpl,
        suspend=bool(spec.get("suspend", False)),
        queue_name=spec.get("queueName") or None,
    )


def _rules(items: Any) -> tuple[Rule, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise SpecError("spec.recovery.rules must be a list of rules")
    try:
        return rules_from_spec(items)
    except (ValueError, TypeError) as e:
        raise SpecError(str(e)) from None


def validate(name: str, spec: JobSpec) -> list[str]:
    """Problems that make the job unrunnable, as messages a user can act on.

    Repeats the CRD's key rules (defence in depth: the CRD installed may be
    older than the operator) and adds the ones a schema cannot express.
    """
    errors: list[str] = []
    if len(name) > MAX_JOB_NAME_LENGTH:
        errors.append(
            f"metadata.name is {len(name)} characters; pods are named <name>-<attempt>-<rank> and must fit "
            f"a 63-character DNS label, so use a name of at most {MAX_JOB_NAME_LENGTH} characters"
        )
    elif not _DNS_LABEL.match(name):
        errors.append(
            "metadata.name must be a DNS label (lowercase letters, digits and '-', starting with a letter), "
            "because pod hostnames and the rendezvous Service are derived from it"
        )
    if not 1 <= spec.nodes <= 1024:
        errors.append(f"spec.nodes must be between 1 and 1024, got {spec.nodes}")
    if not 1 <= spec.procs_per_node <= 64:
        errors.append(f"spec.procsPerNode must be between 1 and 64, got {spec.procs_per_node}")
    if _SHELL_CHARS.search(spec.command[0]):
        errors.append(
            "spec.command must be an argv list, not a shell string: put each argument in its own item, "
            'e.g. ["python", "-m", "train"]'
        )
    for e in spec.env:
        if e["name"].startswith(RESERVED_ENV_PREFIXES):
            errors.append(f"spec.env[{e['name']}]: names starting with TJ_ or PET_ are reserved for the operator")
    if spec.snapshot is not None:
        s = spec.snapshot
        if not _S3_URI.match(s.uri):
            errors.append(f"spec.snapshot.uri must look like s3://bucket/prefix, got {s.uri!r}")
        if s.backend not in ("torchsnapshot", "dcp"):
            errors.append(f"spec.snapshot.backend must be torchsnapshot or dcp, got {s.backend!r}")
        if s.every_steps < 1:
            errors.append("spec.snapshot.everySteps must be at least 1")
        if s.keep_last < 1:
            errors.append("spec.snapshot.keepLast must be at least 1")
        if not 1 <= s.request_poll_seconds <= 300:
            errors.append(f"spec.snapshot.requestPollSeconds must be between 1 and 300, got {s.request_poll_seconds}")
    if spec.queue_name is not None and not _LABEL_VALUE.match(spec.queue_name):
        errors.append(f"spec.queueName must be a label value (at most 63 letters, digits, '-', '_', '.'), "
                      f"got {spec.queue_name!r}")
    r = spec.recovery
    if min(r.max_preemptions, r.max_failures, r.backoff_seconds, r.node_not_ready_seconds) < 0:
        errors.append("spec.recovery values must not be negative")
    pod_spec = (spec.pod_template.get("spec") or {}) if isinstance(spec.pod_template, Mapping) else {}
    if not isinstance(pod_spec, Mapping):
        errors.append("spec.podTemplate.spec must be an object")
        pod_spec = {}
    for key, why in _FORBIDDEN_POD_FIELDS.items():
        if key in pod_spec:
            errors.append(f"spec.podTemplate.spec.{key} is not allowed: {why}")
    labels = ((spec.pod_template.get("metadata") or {}).get("labels") or {})
    for k in labels:
        if str(k).startswith(contract.GROUP + "/"):
            errors.append(f"spec.podTemplate.metadata.labels[{k}]: labels under {contract.GROUP}/ are reserved")
    mount_names = {m.get("name") for m in spec.volume_mounts}
    vol_names = {v.get("name") for v in (pod_spec.get("volumes") or []) if isinstance(v, Mapping)}
    for missing in sorted(n for n in mount_names - vol_names if isinstance(n, str)):
        errors.append(f"spec.volumeMounts[{missing}] names no volume in spec.podTemplate.spec.volumes")
    return errors
