"""Kopf registration: thin handlers around one work queue of job keys.

Kopf's indices are the informer caches (pods, services and nodes the
operator cares about; pods and Services are listed and watched with a
server-side label selector, so only the operator's own are ever fetched).
Every event, of a TrainingJob, one of its pods or services, or a node whose
readiness changed, only *enqueues* the job's key (the handlers are ``async``:
they run on the loop that owns the queue); a periodic resync, spread over
its period, enqueues every job that has not finished, behind the
event-driven keys. The :class:`~.workqueue.WorkQueue` hands a
key to one worker at a time (never two reconciles of the same job at once,
per-job backoff on errors); a worker reads the job fresh from the API, gathers
the rest from the caches and S3, call the pure :func:`reconcile`, then write
the status (only if it changed), post the Events and execute the actions.

No finalizer is put on TrainingJobs: deletion never waits for the operator,
and ownerReferences garbage-collect the gang.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
import logging
import time
import zlib
from typing import Any, Callable, Mapping

import kopf

from trainingjob_trainer import contract

from . import metrics, snapshot_requests
from .classify import NodeView
from .kube import ApiError, Kube, SecretCache
from .leader import LeaderElector
from .model import JobSpec, SpecError, parse_spec
from .reconcile import R_FENCE_NOT_WRITTEN, CreateError, Event, Observed, Plan, reconcile
from .snapshots import FenceWriter, S3Access, SnapshotReader, access_from_secret
from .workqueue import ShutDown, WorkQueue

log = logging.getLogger("trainingjob_operator")

TJ = (contract.GROUP, contract.VERSION, contract.PLURAL)
OURS = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
OWNED_SELECTOR = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
Key = tuple[str, str]


def _copy(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(body[k]) for k in body}


#: Final pod states kept per job (a gang of 8 nodes over two attempts needs 16).
MAX_FINISHED_PER_JOB = 64
#: Phases after which a job never runs again: no resync, no Secret or S3 reads (a finished job costs nothing).
FINISHED = ("Succeeded", "Failed")
#: Default of ``--resync-seconds``, from bench/scale.py (docs/benchmarks.md, "Scale"): a steady job costs
#: one GET per resync and, at most once per resync, a snapshot listing (one LIST and two requests per
#: folder): 90 s keeps both under the issue's 1 API and 6 S3 requests per running job per minute.
DEFAULT_RESYNC_SECONDS = 90.0


def _attempt_label(pod: Mapping[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(contract.LABEL_ATTEMPT))
    except (TypeError, ValueError):
        return -1


def final_pod_view(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A slim copy of a pod whose trainer container has terminated, else ``None``.

    Only what reconcile reads of a finished pod: name, labels, node, phase and
    reason, conditions, and the container's terminated state (exit code,
    reason, termination message, finishedAt).
    """
    status = body.get("status") or {}
    term = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == contract.CONTAINER_NAME and (cs.get("state") or {}).get("terminated"):
            term = cs
    if term is None:
        return None
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {})},
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": {"phase": status.get("phase"), "reason": status.get("reason"),
                   "conditions": copy.deepcopy(status.get("conditions") or []),
                   "containerStatuses": [copy.deepcopy(term)]},
    }


def resync_slot(key: Key, ticks: int) -> int:
    """The job's tick in the resync period (stable across runs: a hash of the key, not Python's salted one)."""
    return zlib.crc32("/".join(key).encode()) % max(1, ticks)


def ends_job(body: Mapping[str, Any], plan: Plan) -> bool:
    """The plan moves the job into Succeeded or Failed."""
    return plan.status.get("phase") in FINISHED and (body.get("status") or {}).get("phase") not in FINISHED


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch turning status ``old`` into ``new`` (``{}`` if equal)."""
    old = {k: v for k, v in (old or {}).items() if k != "kopf"}
    patch: dict[str, Any] = {}
    for k in set(old) | set(new):
        if k not in new:
            patch[k] = None
        elif old.get(k) != new[k]:
            if isinstance(new[k], dict) and isinstance(old.get(k), dict):
                sub = status_patch(old[k], new[k])
                if sub:
                    patch[k] = sub
            else:
                patch[k] = new[k]
    return patch


class Controller:
    """The operator's state: the work queue, the caches' handles, the API client."""

    def __init__(self, *, workers: int = 4, resync_seconds: float = DEFAULT_RESYNC_SECONDS,
                 watch_nodes: bool = True) -> None:
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.watch_nodes = watch_nodes
        self.kube: Kube | None = None
        self.secrets: SecretCache | None = None
        self.snapshots = SnapshotReader()
        self.fences = FenceWriter()
        self.indices: dict[str, Any] = {}
        self.queue: WorkQueue[Key] | None = None
        #: Set when more than one replica may run: workers start only while leading.
        self.elector: LeaderElector | None = None
        #: Set (by :meth:`start`'s caller) to stop the operator when the lease is lost.
        self.on_lost_lease: Callable[[], None] | None = None
        #: The last readiness view of each node: a heartbeat that changes nothing wakes no job.
        self.node_views: dict[str, NodeView] = {}
        self._secret_values: dict[Key, tuple[str, ...]] = {}
        #: Final states of the job's pods, taken from watch events as they arrive (the
        #: kubelet deletes a pod milliseconds after writing it): job -> pod name -> slim pod.
        self.finished: dict[Key, dict[str, dict[str, Any]]] = {}
        #: The last create the API server refused, per job: an input of the next reconcile.
        self.create_errors: dict[Key, CreateError] = {}
        #: What counts as a reclaim warning (``--reclaim-taints``, ``--reclaim-pod-condition``).
        self.reclaim = snapshot_requests.ReclaimConfig()
        #: The reclaim taints of each node (from the node watch; empty: none).
        self.node_warnings: dict[str, tuple[str, ...]] = {}
        #: The job's S3 access as last read, to write its snapshot-request object.
        self._s3_access: dict[Key, S3Access] = {}
        #: Why the last write of a job's snapshot-request object failed: an input of the next reconcile.
        self.request_errors: dict[Key, str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- queue -------------------------------------------------------------
    def enqueue(self, key: Key, delay: float = 0.0, *, source: str = "event") -> None:
        """Reconcile ``key`` now, or after ``delay`` s (see :class:`WorkQueue` for the rules)."""
        if self.queue is None:
            return
        metrics.count_enqueue(source)
        if delay > 0:
            self.queue.add_after(key, delay)
        else:
            self.queue.add(key, resync=source == "resync")

    async def start(self) -> None:
        """Start the resync; the workers at once, or once this replica leads (see :mod:`.leader`)."""
        self.queue = WorkQueue(base_delay=0.25, max_delay=60.0)
        ua = "trainingjob-operator/0.1" + (f" ({self.elector.config.identity})" if self.elector else "")
        self.kube = Kube(user_agent=ua)
        self.secrets = SecretCache(self.kube)
        # A steady job's listing is reused for at least one resync (a resync is when it is looked at).
        self.snapshots.steady_interval = max(self.snapshots.min_interval, self.resync_seconds)
        try:
            await self.kube.request("GET", "/version")
        except (ApiError, OSError, asyncio.TimeoutError) as e:
            log.warning("API server not answering yet: %s", e)
        self._tasks = [asyncio.create_task(self._resync())]
        if self.elector is None:
            await self._start_workers()
        else:
            self.elector.kube = self.kube
            self._tasks.append(asyncio.create_task(self._lead()))

    async def _start_workers(self) -> None:
        self._tasks += [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def _lead(self) -> None:
        assert self.elector is not None
        await self.elector.run(on_started_leading=self._start_workers)
        # Leadership lost: stop writing at once; the process exits and restarts as a follower.
        if self.queue is not None:
            self.queue.shut_down()
        if self.on_lost_lease is not None:
            self.on_lost_lease()

    async def stop(self) -> None:
        if self.queue is not None:
            self.queue.shut_down()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.elector is not None:
            await self.elector.release()
        if self.kube:
            await self.kube.close()

    def ready(self) -> bool:
        """Readiness (``/readyz``): started, and the API server answered within the last three resyncs.

        Not Kopf's liveness (``/healthz``: the loop is alive): a replica that
        cannot reach the API server is alive but not ready. A follower (leader
        election) is ready: it is a warm standby.
        """
        if self.queue is None or self.kube is None or self.kube.last_answer is None:
            return False
        return time.monotonic() - self.kube.last_answer < max(30.0, 3 * self.resync_seconds)

    async def _resync(self) -> None:
        """Every job that can still run, once per ``resync_seconds``, spread over the period.

        Each job has its slot in the period (a hash of its key), so 500 jobs
        are 500 keys spread over it, not a burst at its start (event-driven
        keys go first anyway, see :class:`WorkQueue`). Succeeded and Failed
        jobs are skipped: only an event of theirs wakes them.
        """
        ticks = max(1, int(self.resync_seconds))
        tick = 0
        while True:
            await asyncio.sleep(self.resync_seconds / ticks)
            tick = (tick + 1) % ticks
            if tick == 0:
                await self._keep_ready()
            idx = self.indices.get("tj_index")
            if idx is None:
                continue
            for key in list(idx):
                if resync_slot(key, ticks) == tick and not any(phase in FINISHED for phase in idx.get(key, ())):
                    self.enqueue(key, source="resync")

    async def _keep_ready(self) -> None:
        if self.kube is not None and (self.kube.last_answer is None
                                      or time.monotonic() - self.kube.last_answer > self.resync_seconds):
            try:  # idle: one cheap request keeps readiness true while the API server answers
                await self.kube.request("GET", "/version")
            except (ApiError, OSError, asyncio.TimeoutError) as e:
                log.warning("API server not answering: %s", e)

    async def _worker(self, n: int) -> None:
        assert self.queue is not None
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                delay = await self.reconcile_key(key)
                self.queue.forget(key)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                # The job or its namespace went away mid-reconcile (404), or the
                # API refused a write (409, 403...): an expected race, not a bug.
                # Its next event (or this retry, with per-job backoff) sees the new state.
                log.warning("reconcile of %s/%s stopped: %s", *key, e)
                if e.status != 404:
                    self.queue.add_rate_limited(key)
                delay = None
            except Exception:  # one job's trouble must never stop the others
                log.exception("reconcile of %s/%s failed; retrying", *key)
                self.queue.add_rate_limited(key)
                delay = None
            finally:
                self.queue.done(key)
            if delay is not None:
                self.enqueue(key, delay, source="requeue")

    def note_pod(self, key: Key, body: Mapping[str, Any]) -> None:
        """Keep a pod's final container state (bounded per job) once the watch shows it terminated."""
        final = final_pod_view(body)
        if final is None:
            return
        kept = self.finished.setdefault(key, {})
        kept.pop(final["metadata"]["name"], None)
        kept[final["metadata"]["name"]] = final
        while len(kept) > MAX_FINISHED_PER_JOB:
            kept.pop(next(iter(kept)))

    def finished_pods(self, key: Key, uid: str | None, attempt: int) -> tuple[dict[str, Any], ...]:
        """The kept final states of this job (this uid), of the current and the previous attempt."""
        kept = self.finished.get(key) or {}
        for name in [n for n, p in kept.items() if _attempt_label(p) < attempt - 1]:
            del kept[name]
        return tuple(p for p in kept.values()
                     if ((p["metadata"].get("labels") or {}).get(contract.LABEL_JOB_UID) == uid))

    # -- one reconcile -----------------------------------------------------
    async def reconcile_key(self, key: Key) -> float | None:
        assert self.kube is not None
        namespace, name = key
        started = time.monotonic()
        try:
            body = await self.kube.request(
                "GET", f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{namespace}/{contract.PLURAL}/{name}")
        except ApiError as e:
            if e.status == 404:
                self.finished.pop(key, None)
                self.create_errors.pop(key, None)
                self.request_errors.pop(key, None)
                self._s3_access.pop(key, None)
                if self.queue is not None:
                    self.queue.discard_delayed(key)
                self.snapshots.forget(key)
                self.fences.forget(key)
                metrics.forget_job(namespace, name)
                return None
            raise
        observed = await self.observe(body)
        plan = reconcile(body, observed)
        if ends_job(body, plan) and (body.get("status") or {}).get("gangCreated"):
            # The job's last word on its snapshots comes from a fresh listing: its
            # pods may have committed one just before they exited.
            observed = await self.observe(body, fresh=True)
            plan = reconcile(body, observed)
        await self.execute(body, plan, observed.now)
        metrics.observe_job(body, plan.status, time.monotonic() - started)
        return plan.requeue_after

    async def observe(self, body: Mapping[str, Any], *, fresh: bool = False) -> Observed:
        """Everything reconcile reads besides the job: caches, credentials, S3 (``fresh``: list S3 anew)."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        uid = meta.get("uid")
        now = dt.datetime.now(dt.timezone.utc)

        def mine(index_name: str) -> tuple[dict[str, Any], ...]:
            idx = self.indices.get(index_name)
            if idx is None or key not in idx:
                return ()
            return tuple(o for o in idx[key]
                         if ((o.get("metadata") or {}).get("labels") or {}).get(contract.LABEL_JOB_UID) == uid)

        nodes = None
        if self.watch_nodes and "node_index" in self.indices:
            nodes = {n: next(iter(store)) for n, store in self.indices["node_index"].items()}
        snapshots = None
        secret_problem = None
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            spec = None
        status = body.get("status") or {}
        attempt = int(status.get("attempt") or 0)
        pods = mine("pod_index")
        finished_pods = self.finished_pods(key, uid, attempt)
        # A finished job reads neither its Secret nor S3: its last listing was taken when it ended.
        if spec is not None and spec.snapshot is not None and not meta.get("deletionTimestamp") \
                and status.get("phase") not in FINISHED:
            access, secret_problem = await self._access(key, spec)
            if access is not None:
                self.fences.targets[key] = (
                    contract.job_snapshot_root(spec.snapshot.uri, meta["namespace"], meta["name"]), access)
                self._s3_access[key] = access
            # Before a gang is created the listing must be fresh: the previous
            # gang's emergency snapshot was committed just before its pods exited.
            # While a gang exists its listing is reused (fencing never waits for S3).
            snapshots = await self.snapshots.observe(
                body, spec, access, force=fresh or not status.get("gangCreated"),
                steady=bool(status.get("gangCreated")))
            if snapshots is not None and snapshots.error and spec.snapshot.credentials_secret \
                    and self.secrets is not None:
                self.secrets.invalidate(meta["namespace"], spec.snapshot.credentials_secret)
        return Observed(now=now, pods=pods, services=mine("svc_index"), nodes=nodes,
                        snapshots=snapshots, secret_problem=secret_problem,
                        finished_pods=finished_pods, create_error=self.create_errors.get(key),
                        node_warnings=dict(self.node_warnings) if self.watch_nodes else None,
                        reclaim=self.reclaim, request_error=self.request_errors.get(key))

    async def _access(self, key: Key, spec: JobSpec) -> tuple[S3Access | None, str | None]:
        """S3 access from the job's credentials Secret (cached, see :class:`SecretCache`), or the problem."""
        assert spec.snapshot is not None
        secret = None
        access = None
        secret_problem = None
        try:
            if spec.snapshot.credentials_secret:
                assert self.secrets is not None
                secret = await self.secrets.get(key[0], spec.snapshot.credentials_secret)
            access, secret_problem = access_from_secret(spec, secret)
        except ApiError as e:  # 403 and friends: say so, do not loop on tracebacks
            secret_problem = (f"cannot read credentials Secret {spec.snapshot.credentials_secret!r}: "
                              f"{e.status} {e.reason}")
        if access is not None:
            self._secret_values[key] = access.secret_values()
        elif spec.snapshot.credentials_secret and self.secrets is not None:
            self.secrets.invalidate(key[0], spec.snapshot.credentials_secret)
        return access, secret_problem

    def redact(self, key: Key, value: Any) -> Any:
        """Mask the job's credential values wherever they appear (pod log tails end up in messages)."""
        secrets = self._secret_values.get(key)
        if not secrets:
            return value
        text = json.dumps(value)
        for v in secrets:
            text = text.replace(json.dumps(v)[1:-1], "***")
        return json.loads(text)

    async def execute(self, body: Mapping[str, Any], plan: Plan, now: dt.datetime) -> None:
        """Post the plan's Events, write its status, then change the world.

        Events go first, and are idempotent (see :meth:`Kube.post_event`): an
        operator killed after its status write has already posted them, and
        one killed before re-decides the same thing and finds them posted.
        Status next, conditional on the resourceVersion reconcile read (a 409
        re-reads and re-runs; nothing is executed). Then creates and deletes;
        a refused create is kept as an input of the next reconcile, which
        decides what it means (InvalidSpec, or a Warning and a retry).
        """
        assert self.kube is not None
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        plan.status = self.redact(key, plan.status)
        plan.events = [Event(e.type, e.reason, self.redact(key, e.message)) for e in plan.events]
        now_iso = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        for ev in plan.events:
            try:
                if await self.kube.post_event(body, ev.type, ev.reason, ev.message, now_iso) != "exists":
                    log.info("%s/%s %s %s: %s", ns, name, ev.type, ev.reason, ev.message)
                    metrics.count_event(ev.reason)
            except ApiError as e:
                log.warning("could not post event %s for %s/%s: %s", ev.reason, ns, name, e)
        patch = status_patch(body.get("status"), plan.status)
        if patch:
            await self.kube.patch_status(contract.GROUP, contract.VERSION, contract.PLURAL, ns, name, patch,
                                         resource_version=meta.get("resourceVersion"))
        if plan.request_write is not None:
            await self.write_request(body, plan.request_write)
        if not any(a.verb == "create" for a in plan.actions):
            self.create_errors.pop(key, None)
        unfenced = await self._fence(body, plan, now_iso)
        actions = [a for a in plan.actions if not (a.verb == "create" and a.kind == "Pod" and unfenced)]
        # In the plan's order (a gang's Service before its pods), but each run of
        # the same verb and kind at once: creates in slow-start batches, deletes
        # all together (fencing a gang is one round trip, not one per pod).
        for (verb, _kind), run in itertools.groupby(actions, key=lambda a: (a.verb, a.kind)):
            group = list(run)
            if verb == "create":
                await self._create_slow_start(key, group, int(plan.status.get("attempt") or 0))
                continue
            for a, gone in zip(group, await _bounded_gather(
                    [self.kube.delete(a.kind, ns, a.name, force=a.force) for a in group], MAX_IN_FLIGHT)):
                if gone:
                    log.info("%s/%s deleted %s %s (%s%s)", ns, name, a.kind, a.name, a.reason,
                             ", forced: node lost" if a.force else "")

    async def _create_slow_start(self, key: Key, creates: list[Any], attempt: int) -> None:
        """Create in batches of 1, 2, 4, ... (as the Job controller's slow start): a
        gang is posted in log2(size) round trips, and a create the API server
        refuses (quota, admission, a bad template) stops the rest after one
        batch. The first refusal is kept as an input of the next reconcile and
        raised; the batch's other creates have run (a create is idempotent).
        """
        assert self.kube is not None
        ns, name = key
        done, batch = 0, 1
        while done < len(creates):
            group = creates[done:done + batch]
            results = await asyncio.gather(*(self.kube.create(a.kind, ns, a.body or {}) for a in group),
                                           return_exceptions=True)
            refused = None
            for a, r in zip(group, results):
                if isinstance(r, ApiError):
                    if refused is None:
                        refused = (a, r)
                elif isinstance(r, BaseException):
                    raise r
                elif r:
                    log.info("%s/%s created %s %s", ns, name, a.kind, a.name)
            if refused is not None:
                a, e = refused
                detail = f"the API server rejected {a.kind} {a.name}: {e.status} {e.reason}: {e.message}"
                self.create_errors[key] = CreateError(kind=a.kind, name=a.name, status=e.status,
                                                      message=self.redact(key, detail)[:900], attempt=attempt)
                raise e
            self.create_errors.pop(key, None)
            done += len(group)
            batch = min(batch * 2, MAX_IN_FLIGHT)

    async def _fence(self, body: Mapping[str, Any], plan: Plan, now_iso: str) -> bool:
        """Before the plan creates a pod: the attempt's storage fence is in S3
        (issue 11 item 4). Returns whether the pods must wait: attempt > 0 and
        the fence could not be written (a Warning Event says why; the next
        reconcile retries). Attempt 0 has no older gang to fence: its pods
        are created anyway, with the same Warning."""
        if not any(a.verb == "create" and a.kind == "Pod" for a in plan.actions):
            return False
        assert self.kube is not None
        meta = body["metadata"]
        attempt = int(plan.status.get("attempt") or 0)
        problem = await self.fences.ensure((meta["namespace"], meta["name"]), job_uid=meta.get("uid", ""),
                                           attempt=attempt)
        if problem is None:
            return False
        wait = attempt > 0
        message = self.redact((meta["namespace"], meta["name"]), problem) + (
            "; the new gang waits for it" if wait else "; attempt 0 starts without it")
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        try:
            await self.kube.post_event(body, "Warning", R_FENCE_NOT_WRITTEN, message, now_iso)
        except ApiError as e:
            log.warning("could not post event %s: %s", R_FENCE_NOT_WRITTEN, e)
        return wait

    async def write_request(self, body: Mapping[str, Any], request: contract.SnapshotRequest) -> None:
        """Write the job's snapshot-request object (after the status recorded the decision).

        A failure is kept as an input of the next reconcile (status
        ``snapshot.requestError`` and a Warning Event, credentials masked),
        which retries the write.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        access = self._s3_access.get(key)
        spec = parse_spec(body.get("spec"))
        if access is None or spec.snapshot is None:
            return
        root = contract.job_snapshot_root(spec.snapshot.uri, *key)
        try:
            await asyncio.to_thread(snapshot_requests.write_request, root, access.storage_options(), request)
        except Exception as e:  # S3 down, access denied...: reported in status, retried
            msg = f"cannot write the snapshot request {request.value!r} to {root}: {type(e).__name__}: {str(e)[:300]}"
            self.request_errors[key] = self.redact(key, msg)
            log.warning("%s/%s: %s", *key, self.request_errors[key])
            self.enqueue(key, 2.0, source="requeue")
            return
        self.request_errors.pop(key, None)
        self.snapshots.invalidate(key)
        log.info("%s/%s snapshot request %r written to %s", *key, request.value, root)


CONTROLLER = Controller()


#: Most creates or deletes one reconcile has in flight at once.
MAX_IN_FLIGHT = 16


async def _bounded_gather(coros: list[Any], limit: int) -> list[Any]:
    """Run the coroutines at most ``limit`` at a time; their results in order (the first error is raised)."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


# ---------------------------------------------------------------------------
# Kopf registration (thin: caches and enqueueing only)
# ---------------------------------------------------------------------------
@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # No Kopf state is kept on our objects: no finalizers (nothing is
    # registered that needs one), progress in annotations, never in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contract.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=contract.GROUP)
    settings.posting.level = logging.WARNING
    # No runtime scanning of CRDs and namespaces (list/watch of cluster-scoped
    # objects): the chart installs the CRD before the operator starts, and
    # the watched namespaces are given explicitly, so a namespaces-mode
    # install needs Roles only. Discovery (non-resource URLs) still resolves
    # the resources at startup.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    # Server-side selectors (Kopf's ``labels=`` filters in the client, after
    # the whole cluster's pods were listed): only the operator's own pods and
    # Services are listed, watched and cached.
    for resource in ("pods", "services"):
        settings.watching.label_selectors["v1", resource] = OWNED_SELECTOR
    settings.networking.request_timeout = 60
    await CONTROLLER.start()


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    await CONTROLLER.stop()


@kopf.index(*TJ)
def tj_index(namespace: str, name: str, status: Mapping[str, Any], **_: Any) -> dict[Key, str]:
    """Every job, with its phase (the resync skips finished ones)."""
    return {(namespace, name): str((status or {}).get("phase") or "")}


@kopf.index("pods", labels=OURS)
def pod_index(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict[Key, Any]:
    return {(namespace, labels.get(contract.LABEL_JOB_NAME, "")): _copy(body)}


@kopf.index("pods", labels=OURS)
def pod_node_index(namespace: str, labels: Mapping[str, str], spec: Mapping[str, Any], **_: Any) -> dict[str, Key]:
    """node name -> the jobs with a pod there: a node event finds its jobs without a scan."""
    node = spec.get("nodeName")
    return {node: (namespace, labels.get(contract.LABEL_JOB_NAME, ""))} if node else {}


@kopf.index("services", labels=OURS)
def svc_index(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict[Key, Any]:
    return {(namespace, labels.get(contract.LABEL_JOB_NAME, "")): _copy(body)}


def _remember(kwargs: Mapping[str, Any]) -> None:
    for k in ("tj_index", "pod_index", "svc_index", "node_index", "pod_node_index"):
        if k in kwargs:
            CONTROLLER.indices[k] = kwargs[k]


# Event handlers are async: they run on the loop that owns the queue and the
# indices (a plain ``def`` would run in Kopf's thread pool).
@kopf.on.event(*TJ)
async def _on_job(namespace: str, name: str, **kwargs: Any) -> None:
    _remember(kwargs)
    CONTROLLER.enqueue((namespace, name))


@kopf.on.event("pods", labels=OURS, id="_on_pod")
@kopf.on.event("services", labels=OURS, id="_on_service")
async def _on_child(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], resource: Any,
                    **kwargs: Any) -> None:
    """A pod or Service of a gang changed: keep a pod's final state, reconcile its job."""
    _remember(kwargs)
    job = labels.get(contract.LABEL_JOB_NAME)
    if job:
        if resource.plural == "pods":
            CONTROLLER.note_pod((namespace, job), body)
        CONTROLLER.enqueue((namespace, job))


def on_node_event(name: str, view: NodeView | None, warnings: tuple[str, ...] = ()) -> list[Key]:
    """A node changed (``view`` None: deleted): the jobs to wake, those with a pod on it.

    Heartbeats that leave the node's readiness and reclaim taints (``warnings``)
    as they were wake nothing.
    """
    if view is not None and CONTROLLER.node_views.get(name) == view \
            and CONTROLLER.node_warnings.get(name, ()) == warnings:
        return []
    if view is None:
        CONTROLLER.node_views.pop(name, None)
        CONTROLLER.node_warnings.pop(name, None)
    else:
        CONTROLLER.node_views[name] = view
        CONTROLLER.node_warnings[name] = warnings
    idx = CONTROLLER.indices.get("pod_node_index")
    if idx is None or name not in idx:
        return []
    keys = sorted(set(idx[name]))
    for key in keys:
        CONTROLLER.enqueue(key, source="node")
    return keys


def register_node_watch() -> None:
    """Nodes are watched cluster-wide only (namespaced RBAC cannot read them)."""

    @kopf.index("nodes", id="node_index")
    def node_index(name: str, body: Mapping[str, Any], **_: Any) -> dict[str, NodeView]:
        return {name: NodeView.from_node(body)}

    @kopf.on.event("nodes", id="_on_node")
    async def _on_node(name: str, body: Mapping[str, Any], type: str | None, **kwargs: Any) -> None:
        _remember(kwargs)
        on_node_event(name, None if type == "DELETED" else NodeView.from_node(body),
                      snapshot_requests.node_warnings(body, taints=CONTROLLER.reclaim.taints))
