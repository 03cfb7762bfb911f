"""Running the operator as the chart's ServiceAccount, against an API server that enforces RBAC.

``install_rbac`` creates the chart's rendered ServiceAccount, (Cluster)Roles
and (Cluster)RoleBindings through the API; ``operator_kubeconfig`` asks for a
token of that ServiceAccount (TokenRequest) and writes a kubeconfig with it;
``operator_command`` runs ``python -m trainingjob_operator`` with that
kubeconfig (``LocalCluster.start_operator`` always sets its own admin one).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from localcluster.apiserver import write_kubeconfig
from localcluster.kube import ApiError, Client, resource_of_manifest

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def apply_rbac(kube: Client, objs: Sequence[Mapping[str, Any]], release_namespace: str) -> list[Mapping[str, Any]]:
    """Create the chart's identity and rules through the API; returns what was applied."""
    if kube.get_or_none("namespaces", release_namespace) is None:
        kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": release_namespace}})
    created = [o for o in objs if o.get("kind") in RBAC_KINDS]
    for o in created:
        kube.apply(dict(o))
    return created


@contextmanager
def install_rbac(kube: Client, objs: Sequence[Mapping[str, Any]], release_namespace: str) -> Iterator[None]:
    """:func:`apply_rbac`, removed afterwards (the cluster-scoped objects too: the cluster is shared)."""
    created = apply_rbac(kube, objs, release_namespace)
    try:
        yield
    finally:
        for o in created:
            if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
                try:
                    kube.delete(resource_of_manifest(o), o["metadata"]["name"],
                                namespace=o["metadata"].get("namespace"))
                except ApiError:
                    pass


def operator_kubeconfig(kube: Client, api_url: str, namespace: str, sa: str, path: Path, *,
                        exec_plugin: bool = False) -> Path:
    """A kubeconfig with a token of ``sa``: in the file, or (``exec_plugin``) printed by an exec
    credential plugin, as EKS, GKE and AKS kubeconfigs get theirs."""
    got = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
                       body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})
    token = got["status"]["token"]
    write_kubeconfig(path, api_url, token=None if exec_plugin else token)
    if exec_plugin:
        plugin = path.with_suffix(".plugin.py")
        credential = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                      "status": {"token": token}}
        plugin.write_text(f"import json\nprint(json.dumps({credential!r}))\n")
        cfg = yaml.safe_load(path.read_text())
        cfg["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                            "command": sys.executable, "args": [str(plugin)]}}
        path.write_text(yaml.safe_dump(cfg))
    return path


def operator_command(kubeconfig: Path) -> list[str]:
    return ["env", f"KUBECONFIG={kubeconfig}", sys.executable, "-m", "trainingjob_operator"]
