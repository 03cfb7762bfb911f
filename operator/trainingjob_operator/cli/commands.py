"""The plugin's commands: each reads what it needs, then prints or patches.

Every command takes the parsed arguments and returns the text to print;
problems are raised as :class:`~.api.CliError` (one line on stderr, exit 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any, Mapping

from trainingjob_trainer import contract, s3

from .. import kube
from . import render
from .api import Api, CliError, JobStorage, job_storage


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _storage(api: Api, job: Mapping[str, Any], args: argparse.Namespace) -> JobStorage:
    return job_storage(api, job, local_credentials=args.local_credentials, endpoint=args.s3_endpoint)


def _s3_error(storage: JobStorage, what: str, e: Exception) -> CliError:
    # botocore/s3fs messages name the endpoint and bucket, never the keys;
    # mask them anyway in case a library ever echoes them.
    return CliError(storage.mask(f"cannot {what}: {type(e).__name__}: {str(e)[:300]}"))


def snapshots(api: Api, args: argparse.Namespace) -> str:
    """``kubectl tj snapshots NAME``: every snapshot folder, complete or not."""
    job = api.get_job(args.namespace, args.name)
    storage = _storage(api, job, args)
    try:
        infos = storage.store().scan()
    except Exception as e:  # noqa: BLE001 - S3 unreachable, access denied...: one line
        raise _s3_error(storage, f"list {storage.root}", e) from None
    snap = (job.get("status") or {}).get("snapshot") or {}
    now = _now()
    records = [render.snapshot_record(i, now=now, latest_uri=(snap.get("latest") or {}).get("uri"),
                                      restored_from=snap.get("restoredFrom")) for i in infos]
    if args.output == "json":
        return json.dumps({"root": storage.root, "snapshots": records}, indent=2)
    if not records:
        return f"No snapshot folders under {storage.root}."
    return render.snapshots_table(records)


def describe(api: Api, args: argparse.Namespace) -> str:
    """``kubectl tj describe NAME``: the job's state and timeline."""
    job = api.get_job(args.namespace, args.name)
    return render.describe(job, api.job_events(job), pods=api.job_pods(job), now=_now())


def check_resume_target(storage: JobStorage, uri: str) -> Any:
    """The snapshot at ``uri`` if it is complete; else :class:`CliError` saying why not."""
    if not s3.is_s3(uri):
        raise CliError(f"--from must be an s3:// URI of a snapshot folder, got {uri!r}")
    if contract.parse_snapshot_dir_name(uri) is None:
        raise CliError(f"{uri} is not a snapshot folder: its last part must look like "
                       f"{contract.snapshot_dir_name(0, 100)} (see `kubectl tj snapshots`)")
    try:
        info = storage.store().inspect(uri)
    except Exception as e:  # noqa: BLE001 - one line, no traceback
        raise _s3_error(storage, f"read {uri}", e) from None
    if info is None or not info.listing:
        raise CliError(f"refusing: {uri} does not exist (no objects there)")
    if not info.complete:
        raise CliError(f"refusing: {uri} is not a complete snapshot ({render.why_incomplete(info)}); the trainer "
                       "would refuse to restore it. Pick a complete one from `kubectl tj snapshots`")
    return info


def patch_resume_from(api: Api, job: Mapping[str, Any], uri: str) -> dict[str, Any]:
    """Set ``spec.snapshot.resumeFrom`` with a merge patch conditional on the resourceVersion read.

    Raises:
        CliError: The job changed since it was read (409), or the API refused the value.
    """
    meta = job["metadata"]
    patch = {"metadata": {"resourceVersion": meta["resourceVersion"]},
             "spec": {"snapshot": {"resumeFrom": uri.rstrip("/")}}}
    try:
        return api.patch_job(meta["namespace"], meta["name"], patch)
    except kube.ApiError as e:
        if e.status == 409:
            raise CliError(f"trainingjob {meta['namespace']}/{meta['name']} changed since it was read "
                           f"(resourceVersion {meta['resourceVersion']}); nothing was changed: run the command "
                           "again") from None
        raise CliError(f"the API refused the patch of trainingjob {meta['namespace']}/{meta['name']}: "
                       f"{e.status} {e.reason}: {e.message}") from None


def resume_effect(job: Mapping[str, Any], uri: str) -> str:
    """What the operator will do with ``resumeFrom``, from the job's status (see reconcile._resume_point)."""
    st = job.get("status") or {}
    started = st.get("attempt", 0) > 0 or st.get("gangCreated") or "restoredAttempt" in (st.get("snapshot") or {})
    if not started:
        return (f"The first gang (attempt 0) has not been created yet: it will restore {uri}. Later attempts "
                "resume from this job's own latest complete snapshot.")
    name = job["metadata"]["name"]
    return (f"Note: this job already started (attempt {st.get('attempt', 0)}, phase {st.get('phase', '?')}). "
            "The operator uses spec.snapshot.resumeFrom only when it creates the FIRST attempt's gang, so the "
            "current and later attempts keep resuming from the job's own latest complete snapshot. To start from "
            f"{uri} now, re-create the job with this spec: `kubectl get tj {name} -o yaml > job.yaml`, "
            f"`kubectl delete tj {name}`, remove status and metadata.resourceVersion/uid from job.yaml, "
            "`kubectl apply -f job.yaml`.")


def resume(api: Api, args: argparse.Namespace) -> str:
    """``kubectl tj resume NAME --from URI``: set resumeFrom to a snapshot proven complete."""
    job = api.get_job(args.namespace, args.name)
    storage = _storage(api, job, args)
    info = check_resume_target(storage, args.source)
    patched = patch_resume_from(api, job, info.uri)
    m = info.marker
    head = (f"trainingjob.{contract.GROUP}/{args.name} patched: spec.snapshot.resumeFrom={info.uri} "
            f"(complete: step {m.step}, epoch {m.epoch}, written by attempt {m.attempt})")
    return head + "\n" + resume_effect(patched, info.uri)


def snapshot_requests_served(status_schema: Mapping[str, Any] | None) -> bool:
    """Whether the installed operator version serves on-demand snapshots (its CRD has ``status.snapshot.lastRequest``)."""
    snap = ((status_schema or {}).get("properties") or {}).get("snapshot") or {}
    return "lastRequest" in (snap.get("properties") or {})


def new_request_value(now: dt.datetime) -> str:
    """A fresh request value: ``cli-<UTC time>-<4 random hex digits>``."""
    import secrets

    return f"cli-{now.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


def request_outcome(job: Mapping[str, Any], value: str) -> tuple[bool, str]:
    """Whether the request ``value`` is served, per the job's status, and what to say (pure).

    Returns:
        ``(True, summary)`` once ``status.snapshot.lastRequest`` names
        ``value``; ``(False, why it is still waiting)`` otherwise.

    Raises:
        CliError: The job ended, or the operator cannot write the request.
    """
    st = job.get("status") or {}
    snap = st.get("snapshot") or {}
    last = snap.get("lastRequest") or {}
    if last.get("value") == value and last.get("completedAt"):
        return True, (f"snapshot {value} complete at step {last.get('step')} ({last.get('completedAt')}): "
                      f"{last.get('snapshot')}")
    name = f"trainingjob {job['metadata']['namespace']}/{job['metadata']['name']}"
    if st.get("phase") in ("Succeeded", "Failed"):
        raise CliError(f"{name} is {st['phase']}: no gang is running to take snapshot {value}")
    if snap.get("requestError"):
        raise CliError(f"the operator cannot relay snapshot {value}: {snap['requestError']}")
    relayed = (snap.get("request") or {}).get("value") == value
    return False, ("relayed to the job's S3 folder; waiting for the gang to take it" if relayed
                   else "waiting for the operator to relay it")


def snapshot(api: Api, args: argparse.Namespace) -> str:
    """``kubectl tj snapshot NAME``: set the request annotation, then wait for ``status.snapshot.lastRequest``."""
    job = api.get_job(args.namespace, args.name)  # a missing job is reported as such first
    schema = api.crd_status_schema()
    if schema is not None and not snapshot_requests_served(schema):
        raise CliError("on-demand snapshots are not supported by this operator version (its TrainingJob CRD has "
                       "no status.snapshot.lastRequest); snapshots are taken every spec.snapshot.everySteps steps "
                       "and on SIGTERM")
    if not (job.get("spec") or {}).get("snapshot"):
        raise CliError(f"trainingjob {args.namespace}/{args.name} has no spec.snapshot: it keeps no snapshots")
    value = args.value or new_request_value(_now())
    api.patch_job(args.namespace, args.name,
                  {"metadata": {"annotations": {contract.ANNOTATION_SNAPSHOT_REQUEST: value}}})
    if args.no_wait:
        return f"snapshot {value} requested (annotation {contract.ANNOTATION_SNAPSHOT_REQUEST})"
    deadline = time.monotonic() + args.timeout
    why = "waiting for the operator to relay it"
    while time.monotonic() < deadline:
        done, why = request_outcome(api.get_job(args.namespace, args.name), value)
        if done:
            return why
        time.sleep(1.0)
    raise CliError(f"snapshot {value} not complete after {args.timeout:.0f}s ({why}); it stays requested: "
                   f"check `kubectl tj describe {args.name}`")
