"""The plugin's Kubernetes and S3 access, with the user's own identity.

The API client is synchronous (a CLI makes a handful of calls) and logs in
with the operator's own config loader,
:func:`trainingjob_operator.kubeconfig.load_config` (controller-runtime's
order; token, token file, client certificate or exec plugin), so the plugin
and the operator agree on what a kubeconfig means. S3 is read with the trainer's
:class:`~trainingjob_trainer.store.SnapshotStore` (no torch), so the plugin
applies the very completion rule the pods and the operator apply.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

from trainingjob_trainer import contract

from .. import kube
from ..kubeconfig import ConfigError, load_config
from ..snapshots import S3Access, access_from_secret
from ..model import SpecError, parse_spec

#: What the plugin reads: the job (and patches its spec), its Secret, its
#: Events, and the CRD (to learn what the installed operator version serves).
JOBS = f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{{ns}}/{contract.PLURAL}"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{contract.PLURAL}.{contract.GROUP}"
USER_AGENT = "kubectl-tj/0.1"

#: Every API call the plugin makes, as RBAC (api group, resource, verb), with
#: what needs it (docs/operations.md; tests/integration/test_cli.py checks
#: that the plugin makes exactly these calls).
ACCESS = {
    (contract.GROUP, contract.PLURAL, "get"): "every command reads the job",
    (contract.GROUP, contract.PLURAL, "patch"): "resume sets spec.snapshot.resumeFrom; snapshot sets the "
                                                "snapshot-request annotation",
    ("", "secrets", "get"): "snapshots and resume read the job's credentials Secret (not with --local-credentials)",
    ("", "events", "list"): "describe shows the job's Events",
    ("", "pods", "list"): "describe shows the job's pods (optional)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"):
        "snapshot checks what the installed operator version serves (optional)",
}


class CliError(Exception):
    """An error the plugin reports as one line on stderr (exit code 1)."""


class Api:
    """A minimal synchronous Kubernetes client (``urllib``, no extra dependency).

    Args:
        timeout: Seconds per request.
    """

    def __init__(self, *, timeout: float = 15.0) -> None:
        try:
            self._config = load_config()
        except ConfigError as e:
            raise CliError(str(e)) from None
        self._timeout = timeout
        ctx = self._config.ssl_context
        if ctx is False:
            ctx = ssl._create_unverified_context()  # insecure-skip-tls-verify, as kubectl does
        self._ssl = ctx or None

    @property
    def server(self) -> str:
        return self._config.server

    def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One API call; raises :class:`kube.ApiError` for an error status, :class:`CliError` if unreachable."""
        url = self._config.server + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        try:
            token = self._config.bearer_token()
        except ConfigError as e:
            raise CliError(str(e)) from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                self._config.unauthorized()
            payload = _json_or_text(e.read().decode(errors="replace"))
            raise kube.ApiError(e.code, str(payload.get("reason") or e.reason or ""),
                                str(payload.get("message") or "")) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach the Kubernetes API at {self._config.server}: {reason}") from None
        return _json_or_text(text)

    # -- the calls the plugin makes ------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.request("GET", f"{JOBS.format(ns=namespace)}/{name}")
        except kube.ApiError as e:
            raise _explain(e, f"trainingjob {namespace}/{name}") from None

    def patch_job(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the job (its spec or metadata)."""
        return self.request("PATCH", f"{JOBS.format(ns=namespace)}/{name}", body=patch,
                            content_type="application/merge-patch+json")

    def get_secret(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except kube.ApiError as e:
            raise _explain(e, f"credentials Secret {namespace}/{name}",
                           hint="use --local-credentials to read S3 with your own AWS credentials") from None

    def job_events(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The Events about this job (this very object: its uid), unsorted."""
        meta = job["metadata"]
        selector = ",".join([f"involvedObject.name={meta['name']}", f"involvedObject.kind={contract.KIND}"]
                            + ([f"involvedObject.uid={meta['uid']}"] if meta.get("uid") else []))
        try:
            items = self.request("GET", f"/api/v1/namespaces/{meta['namespace']}/events",
                                 params={"fieldSelector": selector}).get("items") or []
        except kube.ApiError as e:
            raise _explain(e, f"the Events of trainingjob {meta['namespace']}/{meta['name']}") from None
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == meta["name"]]

    def job_pods(self, job: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The job's pods (server-side label selector), ``None`` when not allowed to list them."""
        meta = job["metadata"]
        try:
            return self.request("GET", f"/api/v1/namespaces/{meta['namespace']}/pods",
                                params={"labelSelector": f"{contract.LABEL_JOB_NAME}={meta['name']}"}).get("items") or []
        except kube.ApiError as e:
            if e.status in (401, 403):
                return None
            raise _explain(e, f"the pods of trainingjob {meta['namespace']}/{meta['name']}") from None

    def crd_status_schema(self) -> dict[str, Any] | None:
        """The installed CRD's status schema, ``None`` when it cannot be read (403, 404)."""
        try:
            crd = self.request("GET", CRD_PATH)
        except kube.ApiError:
            return None
        for v in (crd.get("spec") or {}).get("versions") or []:
            if v.get("name") == contract.VERSION:
                return (((v.get("schema") or {}).get("openAPIV3Schema") or {}).get("properties") or {}).get("status")
        return None


def _json_or_text(text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text) if text else {}
    except ValueError:
        return {"message": text[:300]}
    return payload if isinstance(payload, dict) else {"message": str(payload)[:300]}


def _explain(e: kube.ApiError, what: str, *, hint: str = "") -> CliError:
    if e.status == 404:
        msg = f"{what} not found"
    elif e.status in (401, 403):
        msg = f"not allowed to read {what} ({e.status} {e.reason}: {e.message})"
    else:
        msg = f"cannot read {what}: {e.status} {e.reason}: {e.message}"
    return CliError(f"{msg}; {hint}" if hint and e.status in (401, 403, 404) else msg)


@dataclass(frozen=True)
class JobStorage:
    """Where one job's snapshots live and how to read them.

    Attributes:
        root: The job's snapshot folder (``<uri>/<namespace>/<name>``).
        storage_options: s3fs options (credentials inside: never print them).
        secret_values: Credential values, masked in anything printed.
    """

    root: str
    storage_options: Mapping[str, Any]
    secret_values: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print credentials
        return f"JobStorage(root={self.root!r})"

    def store(self):
        """The trainer's store for this job's folder."""
        from trainingjob_trainer.store import SnapshotStore

        return SnapshotStore(self.root, storage_options=self.storage_options)

    def mask(self, text: str) -> str:
        for v in self.secret_values:
            text = text.replace(v, "***")
        return text


def job_storage(api: Api, job: Mapping[str, Any], *, local_credentials: bool,
                endpoint: str | None = None) -> JobStorage:
    """S3 access for the job: its credentials Secret (read as the user), or the local AWS identity.

    Args:
        api: The API client (with the user's identity).
        job: The TrainingJob.
        local_credentials: Use the local AWS env/config instead of the Secret.
        endpoint: Overrides ``spec.snapshot.endpoint`` (the cluster's
            endpoint may not resolve from where the plugin runs).
    """
    meta = job["metadata"]
    try:
        spec = parse_spec(job.get("spec"))
    except SpecError as e:
        raise CliError(f"trainingjob {meta['namespace']}/{meta['name']} has an unusable spec: {e}") from None
    if spec.snapshot is None:
        raise CliError(f"trainingjob {meta['namespace']}/{meta['name']} has no spec.snapshot: it keeps no snapshots")
    root = contract.job_snapshot_root(spec.snapshot.uri, meta["namespace"], meta["name"])
    if local_credentials or not spec.snapshot.credentials_secret:
        # The local AWS identity (env, ~/.aws): s3fs/botocore find it themselves.
        access = S3Access(endpoint=spec.snapshot.endpoint, region=spec.snapshot.region)
        opts = access.storage_options()
        opts.pop("anon", None)
    else:
        secret = api.get_secret(meta["namespace"], spec.snapshot.credentials_secret)
        access, problem = access_from_secret(spec, secret)
        if access is None:
            raise CliError(problem or "unusable credentials Secret")
        opts = access.storage_options()
    if endpoint:
        opts["endpoint_url"] = endpoint
    return JobStorage(root=root, storage_options=opts, secret_values=access.secret_values())
