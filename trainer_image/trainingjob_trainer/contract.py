"""The operator <-> trainer contract: the one place every shared string lives.

Both the operator (``trainingjob_operator``) and the training image
(``trainingjob_trainer``) import this module; no name, label, path layout or
exit code of the contract is typed anywhere else. It is pure Python and
imports no torch, so the operator image stays small.

What flows where:

* operator -> pod: environment variables (``ENV_*`` below and torchrun's own
  ``PET_*`` variables), labels and annotations on the pod.
* pod -> operator: the container's exit code (``EXIT_*``), the termination
  message (:func:`format_termination_message`), and the snapshots in S3
  (layout: :func:`job_snapshot_root`, :data:`SNAPSHOT_DIR_RE`, completion:
  :func:`snapshot_is_complete`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# --------------------------------------------------------------------------
# The custom resource
# --------------------------------------------------------------------------
GROUP = "trainingjob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ("tj",)

# --------------------------------------------------------------------------
# Labels and annotations on the objects the operator creates
# --------------------------------------------------------------------------
LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_NODE_RANK = f"{GROUP}/node-rank"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "trainingjob-operator"

#: Kueue's pod-group integration (set on the pods of an attempt when
#: ``spec.queueName`` is set): Kueue admits the group whole or not at all.
KUEUE_LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
KUEUE_LABEL_POD_GROUP_NAME = "kueue.x-k8s.io/pod-group-name"
KUEUE_ANNOTATION_POD_GROUP_TOTAL_COUNT = "kueue.x-k8s.io/pod-group-total-count"
#: The pod condition Kueue sets on the pods it stops (preemption, PodsReady timeout).
KUEUE_CONDITION_TERMINATION_TARGET = "TerminationTarget"
KUEUE_REASON_STOPPED = "StoppedByKueue"

#: The name of the container that runs torchrun in every pod.
CONTAINER_NAME = "trainer"

# --------------------------------------------------------------------------
# Environment the operator sets in every pod
# --------------------------------------------------------------------------
ENV_JOB_NAME = "TJ_JOB_NAME"
ENV_JOB_NAMESPACE = "TJ_JOB_NAMESPACE"
ENV_JOB_UID = "TJ_JOB_UID"
ENV_ATTEMPT = "TJ_ATTEMPT"  # "0" for the first gang, N for the (N+1)-th
ENV_NODE_RANK = "TJ_NODE_RANK"
ENV_NNODES = "TJ_NNODES"
#: Where this job's snapshots live: ``<spec.snapshot.uri>/<namespace>/<name>``.
ENV_SNAPSHOT_URI = "TJ_SNAPSHOT_URI"
ENV_SNAPSHOT_BACKEND = "TJ_SNAPSHOT_BACKEND"  # "torchsnapshot" | "dcp"
ENV_SNAPSHOT_EVERY_STEPS = "TJ_SNAPSHOT_EVERY_STEPS"
ENV_SNAPSHOT_KEEP_LAST = "TJ_SNAPSHOT_KEEP_LAST"
#: Explicit snapshot to resume from (full URI); wins over "latest complete".
ENV_RESUME_FROM = "TJ_RESUME_FROM"
#: Optional S3 endpoint for S3-compatible stores (MinIO, moto...).
ENV_S3_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_S3_REGION = "AWS_DEFAULT_REGION"
#: File the trainer writes its termination message to (equal to the
#: container's ``terminationMessagePath``).
ENV_TERMINATION_MESSAGE_PATH = "TJ_TERMINATION_MESSAGE_PATH"
#: Trainer-internal (launcher -> its workers): a file where local rank 0
#: records the last completed step, so the launcher can report the step reached
#: even when the workers die without writing a termination message.
ENV_PROGRESS_FILE = "TJ_PROGRESS_FILE"
#: Trainer knob (users may set it in spec.env): bytes of multipart upload
#: parts in flight per rank (see ``trainingjob_trainer.ts_plugin``).
ENV_S3_MAX_INFLIGHT_BYTES = "TJ_S3_MAX_INFLIGHT_BYTES"
#: The pod's terminationGracePeriodSeconds: how long the gang has between
#: SIGTERM and SIGKILL to take the emergency snapshot and exit.
ENV_GRACE_PERIOD_SECONDS = "TJ_TERMINATION_GRACE_PERIOD_SECONDS"

#: Keys read from ``spec.snapshot.credentialsSecret`` into the pod's env
#: (secretKeyRef, never copied anywhere else). The session token is optional.
SECRET_KEY_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_KEY_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SECRET_KEY_SESSION_TOKEN = "AWS_SESSION_TOKEN"
SECRET_KEYS_REQUIRED = (SECRET_KEY_ACCESS_KEY_ID, SECRET_KEY_SECRET_ACCESS_KEY)
SECRET_KEYS_OPTIONAL = (SECRET_KEY_SESSION_TOKEN,)

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# torchrun reads PET_<FLAG> for every flag it has, so `torchrun script.py`
# needs no flags inside a pod.
PET_NNODES = "PET_NNODES"
PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
PET_NODE_RANK = "PET_NODE_RANK"
PET_RDZV_BACKEND = "PET_RDZV_BACKEND"
PET_RDZV_ENDPOINT = "PET_RDZV_ENDPOINT"
PET_RDZV_ID = "PET_RDZV_ID"
PET_RDZV_CONF = "PET_RDZV_CONF"
PET_MAX_RESTARTS = "PET_MAX_RESTARTS"
RDZV_BACKEND = "c10d"
RDZV_PORT = 29400

# --------------------------------------------------------------------------
# Exit codes and the termination message
# --------------------------------------------------------------------------
EXIT_OK = 0
#: The gang saved an emergency snapshot after SIGTERM and stopped cleanly.
#: The operator counts it as a preemption (never as a failure).
EXIT_PREEMPTED_AFTER_SNAPSHOT = 83
#: The snapshot configuration is unusable (bad URI, no credentials...):
#: restarting will not help.
EXIT_SNAPSHOT_CONFIG_ERROR = 84

#: ``reason`` values of the termination message.
TERM_REASON_COMPLETED = "Completed"
TERM_REASON_PREEMPTED = "PreemptedAfterSnapshot"
TERM_REASON_PREEMPTED_NO_SNAPSHOT = "PreemptedWithoutSnapshot"
TERM_REASON_ERROR = "Error"
#: The snapshot storage refused the job (unknown bucket, bad credentials):
#: the pod exits :data:`EXIT_SNAPSHOT_CONFIG_ERROR`.
TERM_REASON_SNAPSHOT_CONFIG_ERROR = "SnapshotStorageError"
TERMINATION_MESSAGE_MAX_BYTES = 4096  # the kubelet truncates past this


@dataclass(frozen=True)
class TerminationMessage:
    """What a trainer pod says about how it ended (JSON in the termination log).

    Attributes:
        reason: One of the ``TERM_REASON_*`` constants.
        step: The last global step the gang completed (``None`` if unknown).
        snapshot: URI of the snapshot written on the way out, if any.
        message: Free text for humans (an exception summary...).
        save_seconds: Wall seconds the emergency snapshot took, when one was
            taken on the way out (``saveSeconds`` in the JSON), so the
            operator can show it and users can size the grace period.
    """

    reason: str
    step: int | None = None
    snapshot: str | None = None
    message: str = ""
    save_seconds: float | None = None


def format_termination_message(msg: TerminationMessage) -> str:
    """Serialise a termination message, truncating ``message`` to fit 4 KiB."""
    body: dict[str, Any] = {"reason": msg.reason}
    if msg.step is not None:
        body["step"] = int(msg.step)
    if msg.snapshot:
        body["snapshot"] = msg.snapshot
    if msg.save_seconds is not None:
        body["saveSeconds"] = round(float(msg.save_seconds), 3)
    text = msg.message
    while True:
        body["message"] = text
        out = json.dumps(body, sort_keys=True)
        if len(out.encode()) <= TERMINATION_MESSAGE_MAX_BYTES or not text:
            return out
        text = text[: max(0, len(text) - (len(out.encode()) - TERMINATION_MESSAGE_MAX_BYTES) - 16)]


def parse_termination_message(text: str | None) -> TerminationMessage | None:
    """Parse a termination message; ``None`` for anything that is not ours.

    A pod's termination message can also be the tail of its log
    (``FallbackToLogsOnError``), so anything that is not a JSON object with a
    string ``reason`` is not a contract message.
    """
    if not text:
        return None
    try:
        body = json.loads(text.strip())
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("reason"), str):
        return None
    step = body.get("step")
    save_seconds = body.get("saveSeconds")
    return TerminationMessage(
        reason=body["reason"],
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        snapshot=body.get("snapshot") if isinstance(body.get("snapshot"), str) else None,
        message=body.get("message") if isinstance(body.get("message"), str) else "",
        save_seconds=float(save_seconds)
        if isinstance(save_seconds, (int, float)) and not isinstance(save_seconds, bool) and save_seconds >= 0
        else None,
    )


# --------------------------------------------------------------------------
# Snapshot layout in S3
# --------------------------------------------------------------------------
#: Snapshot folders, as TorchTNT names them: ``epoch_{e}_train_step_{s}``.
SNAPSHOT_DIR_FORMAT = "epoch_{epoch}_train_step_{step}"
#: A save whose folder already holds objects (a complete snapshot of another
#: run at the same step, or a fenced attempt's leftovers, maybe still being
#: written) goes beside it, into the folder name tagged with its save id:
#: ``epoch_{e}_train_step_{s}_{save_id}``. It never writes into another save's folder.
SNAPSHOT_DIR_TAGGED_FORMAT = SNAPSHOT_DIR_FORMAT + "_{tag}"
SNAPSHOT_DIR_RE = re.compile(r"^epoch_(?P<epoch>\d+)_train_step_(?P<step>\d+)(?:_(?P<tag>a\d+-[0-9a-f]{12}))?$")
#: Written LAST into a snapshot folder by the save that produced it. A folder
#: without it is incomplete and never restored.
COMMIT_MARKER = "_TJ_COMMIT.json"
COMMIT_MARKER_VERSION = 1


def job_snapshot_root(base_uri: str, namespace: str, name: str) -> str:
    """The folder of one job's snapshots: ``<base>/<namespace>/<name>``."""
    return f"{base_uri.rstrip('/')}/{namespace}/{name}"


def snapshot_dir_name(epoch: int, step: int, *, tag: str | None = None) -> str:
    """Folder name of the snapshot taken at ``epoch``/``step`` (``tag``: the
    save id, for a save beside an occupied folder of the same step)."""
    if tag:
        return SNAPSHOT_DIR_TAGGED_FORMAT.format(epoch=int(epoch), step=int(step), tag=tag)
    return SNAPSHOT_DIR_FORMAT.format(epoch=int(epoch), step=int(step))


def parse_snapshot_dir_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` of a snapshot folder name, ``None`` if it is not one."""
    m = SNAPSHOT_DIR_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        return None
    return int(m.group("epoch")), int(m.group("step"))


@dataclass(frozen=True)
class CommitMarker:
    """The content of :data:`COMMIT_MARKER`.

    Attributes:
        save_id: Unique id of the save (attempt + random).
        objects: (below) exactly the objects this save wrote, each with the
            size and the ETag S3 returned to the save's own PUT: an object
            in the folder that the save did not write (a stray or late
            upload of another save, landing between the save's start and its
            commit) is left out, and one of the save's objects replaced
            before the commit makes the commit fail. At restore, the
            completion rule compares the listing with these ETags, so a
            replacement after the commit makes the snapshot incomplete.
        attempt: The gang attempt that wrote the snapshot.
        epoch: Epoch at the snapshot.
        step: Global train step at the snapshot.
        backend: ``torchsnapshot`` or ``dcp``.
        objects: Relative path -> ``{"size": int, "etag": str}`` for every
            object of the snapshot, as seen right after the save's uploads.
        saved_at: RFC 3339 UTC time the marker was written.
        seconds: How long the save took.
        emergency: True when the snapshot was taken because of SIGTERM.
        job_uid: ``metadata.uid`` of the TrainingJob whose gang wrote it
            (``""``: unknown, a run without the operator). The fence
            (:class:`Fence`) tells a re-created job's gangs from the old one's.
    """

    save_id: str
    attempt: int
    epoch: int
    step: int
    backend: str
    objects: Mapping[str, Mapping[str, Any]]
    saved_at: str
    seconds: float = 0.0
    emergency: bool = False
    job_uid: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(int(o.get("size", 0)) for o in self.objects.values())

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": COMMIT_MARKER_VERSION,
                "saveId": self.save_id,
                "attempt": self.attempt,
                "epoch": self.epoch,
                "step": self.step,
                "backend": self.backend,
                "objects": {k: dict(v) for k, v in sorted(self.objects.items())},
                "savedAt": self.saved_at,
                "seconds": self.seconds,
                "emergency": self.emergency,
                "jobUid": self.job_uid,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "CommitMarker | None":
        """Parse a marker; ``None`` if it is malformed (treated as incomplete)."""
        try:
            d = json.loads(text)
            if d.get("version") != COMMIT_MARKER_VERSION:
                return None
            objects = d["objects"]
            if not isinstance(objects, dict):
                return None
            return cls(
                save_id=str(d["saveId"]),
                attempt=int(d["attempt"]),
                epoch=int(d["epoch"]),
                step=int(d["step"]),
                backend=str(d["backend"]),
                objects=objects,
                saved_at=str(d["savedAt"]),
                seconds=float(d.get("seconds", 0.0)),
                emergency=bool(d.get("emergency", False)),
                job_uid=str(d.get("jobUid") or ""),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def marker_version(text: str | bytes) -> int | None:
    """The ``version`` a commit marker declares (``None``: not a marker at all).

    A marker that parses but has another version than
    :data:`COMMIT_MARKER_VERSION` was written by another release of the
    trainer (a newer image, before a rollback): it is never restored by this
    one, and never deleted either.
    """
    try:
        d = json.loads(text)
    except (ValueError, TypeError):
        return None
    v = d.get("version") if isinstance(d, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _norm_etag(etag: Any) -> str:
    return str(etag or "").strip('"')


def snapshot_is_complete(
    marker: CommitMarker | None,
    dir_name: str,
    listing: Mapping[str, Mapping[str, Any]],
) -> bool:
    """The completion rule: is the snapshot in folder ``dir_name`` restorable?

    Restorable iff the commit marker exists and parses, names the same
    epoch/step as the folder, and every object it lists is present in
    ``listing`` with the same size and ETag: an object re-written by another
    save (a fenced attempt's late upload, or a later attempt re-using the
    folder) changes its ETag, and the snapshot is then NOT restored.

    Args:
        marker: The parsed commit marker, or ``None`` if absent/malformed.
        dir_name: The snapshot folder's name (``epoch_E_train_step_S``).
        listing: Relative path -> ``{"size": int, "etag": str}`` of what is
            in the folder now (the marker itself may be included; ignored).
    """
    if marker is None:
        return False
    parsed = parse_snapshot_dir_name(dir_name)
    if parsed != (marker.epoch, marker.step):
        return False
    if not marker.objects:
        return False
    for rel, want in marker.objects.items():
        have = listing.get(rel)
        if have is None:
            return False
        if int(have.get("size", -1)) != int(want.get("size", -2)):
            return False
        if _norm_etag(want.get("etag")) and _norm_etag(have.get("etag")) != _norm_etag(want.get("etag")):
            return False
    return True


def snapshot_order(dir_name: str, marker: CommitMarker) -> tuple[int, int, str, bool]:
    """Sort key of complete snapshots: parsed (step, epoch), never mtime; two
    snapshots of one step (a tagged folder beside another run's) by the
    marker's own ``savedAt``, then the tagged one last (a tagged folder is
    only written while the step's own folder is occupied: it is the later)."""
    m = SNAPSHOT_DIR_RE.match(dir_name.rstrip("/").rsplit("/", 1)[-1])
    return marker.step, marker.epoch, marker.saved_at, bool(m and m.group("tag"))


def pick_latest(candidates: Iterable[tuple[str, CommitMarker]]) -> tuple[str, CommitMarker] | None:
    """The newest of complete snapshots by :func:`snapshot_order`."""
    best = None
    for item in candidates:
        if best is None or snapshot_order(*item) > snapshot_order(*best):
            best = item
    return best


# --------------------------------------------------------------------------
# Live progress and snapshots on request (issue 12)
# --------------------------------------------------------------------------
# Both objects live in the job's snapshot folder, under a ``_tj/`` prefix:
#
# * the operator lists the job root recursively (ListObjectsV2, no
#   delimiter) to find snapshots; ``_tj/...`` keys come back in that same
#   listing with their size and ETag, so the operator GETs the progress object
#   only when its ETag changed: no request is added to a pass where nothing
#   moved, one small GET where it did;
# * ``_`` (0x5F) sorts before every lower-case letter, so ``_tj/`` keys are on
#   the FIRST page of that listing however many snapshot objects follow;
# * ``_tj`` never matches :data:`SNAPSHOT_DIR_RE`: scans, retention and the
#   fence of a snapshot folder never touch these objects.
#: Prefix (relative to the job root) of the trainer <-> operator live objects.
LIVE_PREFIX = "_tj"
#: Written by global rank 0 every ``TJ_PROGRESS_SECONDS`` (see :class:`Progress`).
PROGRESS_OBJECT = f"{LIVE_PREFIX}/progress.json"
#: Written by the operator to ask for a snapshot (see :class:`SnapshotRequest`).
SNAPSHOT_REQUEST_OBJECT = f"{LIVE_PREFIX}/snapshot-request.json"
#: Written by global rank 0 when a requested snapshot is committed (see
#: :class:`SnapshotAck`); it also tells a restarted trainer which request was
#: served already.
SNAPSHOT_ACK_OBJECT = f"{LIVE_PREFIX}/snapshot-ack.json"
PROGRESS_VERSION = 1
#: Seconds between two progress writes (at most one write per period).
ENV_PROGRESS_SECONDS = "TJ_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 15.0
#: Seconds between two GETs of the snapshot-request object by rank 0.
ENV_CONTROL_POLL_SECONDS = "TJ_CONTROL_POLL_SECONDS"
DEFAULT_CONTROL_POLL_SECONDS = 5.0
#: The steps/s figure is measured over the step boundaries of the last this
#: many seconds (the figure the operator's ETA divides by).
PROGRESS_WINDOW_SECONDS = 60.0
#: The annotation users set to ask for a snapshot (the operator relays its
#: value into :data:`SNAPSHOT_REQUEST_OBJECT`).
ANNOTATION_SNAPSHOT_REQUEST = f"{GROUP}/snapshot-request"
#: The longest hold a request may ask for (seconds; a larger one is ignored).
MAX_HOLD_SECONDS = 3600


def live_object_uri(root: str, rel: str) -> str:
    """Full URI of a ``_tj/`` object (``rel``: one of the ``*_OBJECT`` names) under job root ``root``."""
    return f"{root.rstrip('/')}/{rel}"


def _json_obj(text: str | bytes | None) -> dict[str, Any] | None:
    try:
        d = json.loads(text) if text else None
    except (ValueError, TypeError):
        return None
    return d if isinstance(d, dict) else None


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


@dataclass(frozen=True)
class Progress:
    """The content of :data:`PROGRESS_OBJECT` (what the trainer measures).

    Attributes:
        attempt: The gang attempt that wrote it (the operator ignores a lower
            attempt than the current one: a fenced gang's late write).
        step: The last completed global train step.
        epoch: The epoch at that step.
        start_step: The step this attempt started from (the first
            boundary's step - 1: the restored snapshot's step, 0 on a fresh
            job).
        total_steps: The run's total steps when known (TorchTNT ``max_steps``
            or ``max_epochs`` x steps per epoch, or the ``total_steps=``
            keyword), else ``None``.
        wall_seconds: Seconds since this attempt's first step boundary
            (``first_step_at``).
        steps_per_second: Steps per wall second over the boundaries of the
            last ``window_seconds`` (stalls included); ``None`` before two
            boundaries.
        window_seconds: The window the rate was measured over (may be shorter
            than :data:`PROGRESS_WINDOW_SECONDS` early in an attempt).
        stalled_seconds: Seconds this attempt's training thread spent blocked
            in snapshot code (synchronous saves, the staging part of async
            ones, waiting for and committing a background save).
        first_step_at: RFC 3339 time of this attempt's first step boundary.
        updated_at: RFC 3339 time this object was written.
    """

    attempt: int
    step: int
    epoch: int
    start_step: int
    total_steps: int | None
    wall_seconds: float
    steps_per_second: float | None
    window_seconds: float
    stalled_seconds: float
    first_step_at: str | None
    updated_at: str

    def to_json(self) -> str:
        return json.dumps({
            "version": PROGRESS_VERSION, "attempt": self.attempt, "step": self.step, "epoch": self.epoch,
            "startStep": self.start_step, "totalSteps": self.total_steps, "wallSeconds": self.wall_seconds,
            "stepsPerSecond": self.steps_per_second, "windowSeconds": self.window_seconds,
            "stalledSeconds": self.stalled_seconds, "firstStepAt": self.first_step_at, "updatedAt": self.updated_at,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> "Progress | None":
        """Parse a progress object; ``None`` if absent or malformed."""
        d = _json_obj(text)
        if d is None or d.get("version") != PROGRESS_VERSION:
            return None
        try:
            rate = d.get("stepsPerSecond")
            return cls(
                attempt=int(d["attempt"]), step=int(d["step"]), epoch=int(d.get("epoch", 0)),
                start_step=int(d.get("startStep", 0)), total_steps=_opt_int(d.get("totalSteps")),
                wall_seconds=float(d["wallSeconds"]), steps_per_second=None if rate is None else float(rate),
                window_seconds=float(d.get("windowSeconds", 0.0)), stalled_seconds=float(d.get("stalledSeconds", 0.0)),
                first_step_at=d.get("firstStepAt"), updated_at=str(d["updatedAt"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class SnapshotRequest:
    """The content of :data:`SNAPSHOT_REQUEST_OBJECT`, written by the operator.

    Attributes:
        value: The annotation's value; any value other than the one last
            acknowledged asks for one snapshot.
        requested_at: RFC 3339 time the operator wrote it.
        hold_seconds: After the snapshot is committed, every rank stops
            stepping at that step for at most this long (a reclaim warning:
            the node is about to go, steps past the snapshot would be lost),
            until SIGTERM, the kill, or a request object without a hold.
            0: no hold (training goes on at once).
    """

    value: str
    requested_at: str
    hold_seconds: int = 0

    def to_json(self) -> str:
        d: dict[str, Any] = {"value": self.value, "requestedAt": self.requested_at}
        if self.hold_seconds:
            d["holdSeconds"] = self.hold_seconds
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> "SnapshotRequest | None":
        """Parse a request; ``None`` if absent, malformed or with an empty value (a bad hold: 0)."""
        d = _json_obj(text)
        if d is None or not isinstance(d.get("value"), str) or not d["value"]:
            return None
        hold = d.get("holdSeconds", 0)
        hold = hold if isinstance(hold, int) and not isinstance(hold, bool) and 0 < hold <= MAX_HOLD_SECONDS else 0
        return cls(value=d["value"], requested_at=str(d.get("requestedAt", "")), hold_seconds=hold)


@dataclass(frozen=True)
class SnapshotAck:
    """The content of :data:`SNAPSHOT_ACK_OBJECT`, written by the trainer's rank 0
    when the snapshot that served a request is committed (the operator copies
    it into ``status.snapshot.lastRequest``).

    Attributes:
        value: The request's value.
        step: The step of the snapshot that served it.
        completed_at: RFC 3339 time the snapshot was committed.
        snapshot: The snapshot folder's URI.
        attempt: The gang attempt that served it.
    """

    value: str
    step: int
    completed_at: str
    snapshot: str
    attempt: int = 0

    def to_json(self) -> str:
        return json.dumps({"value": self.value, "step": self.step, "completedAt": self.completed_at,
                           "snapshot": self.snapshot, "attempt": self.attempt}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> "SnapshotAck | None":
        """Parse an acknowledgement; ``None`` if absent or malformed."""
        d = _json_obj(text)
        if d is None or not isinstance(d.get("value"), str):
            return None
        try:
            return cls(value=d["value"], step=int(d["step"]), completed_at=str(d["completedAt"]),
                       snapshot=str(d["snapshot"]), attempt=int(d.get("attempt", 0)))
        except (ValueError, TypeError, KeyError):
            return None


def request_is_new(request: SnapshotRequest | None, ack: SnapshotAck | None) -> bool:
    """Whether ``request`` asks for a snapshot that ``ack`` does not record as served."""
    return request is not None and (ack is None or ack.value != request.value)


def live_entries(listing: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The ``_tj/`` objects in a recursive listing of the job root.

    Args:
        listing: Path relative to the job root -> ``{"size", "etag"}`` (the
            listing the operator makes to find snapshots).

    Returns:
        ``{PROGRESS_OBJECT: meta, ...}`` for those present; the operator GETs
        the progress object only when its ``etag`` differs from the last one
        it read.
    """
    names = (PROGRESS_OBJECT, SNAPSHOT_REQUEST_OBJECT, SNAPSHOT_ACK_OBJECT)
    return {name: listing[name] for name in names if name in listing}


# --------------------------------------------------------------------------
# Storage-level fencing (issue 11 item 4)
# --------------------------------------------------------------------------
#: Written by the operator BEFORE it creates the pods of an attempt (and
#: never rewritten for the same attempt): the attempt that owns the job's
#: folder now, and the older attempts' snapshots that were complete then.
FENCE_OBJECT = f"{LIVE_PREFIX}/fence.json"
FENCE_VERSION = 1


@dataclass(frozen=True)
class Fence:
    """The content of :data:`FENCE_OBJECT`.

    Attributes:
        attempt: The attempt the operator is about to start (or runs).
        job_uid: ``metadata.uid`` of the TrainingJob.
        written_at: RFC 3339 UTC time the operator wrote it (for people; no
            rule reads a clock).
        admitted: Folder name -> save id of every snapshot of an OLDER
            attempt (or another job uid) that was complete in the operator's
            listing made just before this fence was written. Only those stay
            restorable: a marker an older attempt writes after the fence
            (its commit raced the trainer's fence check) is in no listing
            made before the fence, so it is never restored.
    """

    attempt: int
    job_uid: str
    written_at: str
    admitted: Mapping[str, str]

    def to_json(self) -> str:
        return json.dumps({"version": FENCE_VERSION, "attempt": self.attempt, "jobUid": self.job_uid,
                           "writtenAt": self.written_at, "admitted": dict(sorted(self.admitted.items()))},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> "Fence | None":
        d = _json_obj(text)
        if d is None or d.get("version") != FENCE_VERSION or not isinstance(d.get("admitted", {}), dict):
            return None
        try:
            return cls(attempt=int(d["attempt"]), job_uid=str(d.get("jobUid") or ""),
                       written_at=str(d.get("writtenAt") or ""),
                       admitted={str(k): str(v) for k, v in (d.get("admitted") or {}).items()})
        except (ValueError, TypeError, KeyError):
            return None


def _same_job(a: str, b: str) -> bool:
    """Two job uids name the same job (an unknown one, ``""``, matches any)."""
    return not a or not b or a == b


def fence_refusal(fence: Fence | None, *, attempt: int, job_uid: str) -> str | None:
    """Why a gang of ``attempt`` (job ``job_uid``) must not commit, prune or
    empty a folder under ``fence``; ``None`` when it may."""
    if fence is None:
        return None
    if not _same_job(fence.job_uid, job_uid):
        return (f"the job's folder now belongs to another TrainingJob of the same name (uid {fence.job_uid}); "
                f"this gang's job uid is {job_uid}")
    if fence.attempt > int(attempt):
        return f"attempt {fence.attempt} of this job has started (S3 fence {FENCE_OBJECT}); this gang is attempt {attempt}"
    return None


def fence_admits(fence: Fence | None, *, dir_name: str, marker: CommitMarker) -> bool:
    """The restore side of the fence: may the complete snapshot in ``dir_name`` be restored?

    Yes without a fence; yes for a marker of the fence's attempt or a later
    one of the same job (the current gang's own snapshots); otherwise only
    if the fence admitted exactly that save (name and save id).
    """
    if fence is None:
        return True
    if _same_job(fence.job_uid, marker.job_uid) and marker.attempt >= fence.attempt:
        return True
    return fence.admitted.get(dir_name) == marker.save_id
