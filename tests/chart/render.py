"""Rendering the chart with the pinned Helm, and evaluating its RBAC rules.

Shared by the chart tests and ``tests/integration/test_rbac.py``. Helm comes
from ``python -m localcluster.tools install`` (``make tools``); when it is
missing the tests fail with that command in the message, they never skip.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytest
import yaml

from localcluster import tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trainingjob-operator"
VALUES_DIR = Path(__file__).resolve().parent / "values"
#: The Kubernetes version the manifests are validated against (kubernetes-validate
#: 1.37.0 ships the schemas of 1.12 .. 1.37 offline). Chart.yaml asks for >=1.29.
KUBE_VERSION = "1.32.0"
RELEASE = "tj"
RELEASE_NAMESPACE = "tj-system"


def helm_binary() -> str:
    path = tools.helm_path()
    if path is None:
        pytest.fail(f"Helm {tools.HELM_VERSION} is not installed at {tools.HELM_PATH}; "
                    "run `python -m localcluster.tools install` (part of `make test`)", pytrace=False)
    return str(path)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def template_text(values_files: Sequence[Path | str] = (), *, sets: Sequence[str] = (), include_crds: bool = False,
                  chart: Path = CHART, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(chart), "--namespace", RELEASE_NAMESPACE, "--kube-version", KUBE_VERSION]
    for f in values_files:
        args += ["--values", str(f)]
    for s in sets:
        args += ["--set", s]
    if include_crds:
        args.append("--include-crds")
    return helm(*args, check=check)


def render(values: Mapping[str, Any] | None = None, *, values_files: Sequence[Path | str] = (),
           tmp_dir: Path | None = None, include_crds: bool = False) -> list[dict[str, Any]]:
    """The chart's objects for the given values (a dict is written to a temp values file)."""
    files = list(values_files)
    if values:
        assert tmp_dir is not None, "render(values=...) needs tmp_dir"
        f = tmp_dir / "values-override.yaml"
        f.write_text(yaml.safe_dump(dict(values)))
        files.append(f)
    text = template_text(files, include_crds=include_crds).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def kubernetes_validate(manifest_text: str) -> subprocess.CompletedProcess[str]:
    """``kubernetes-validate --strict`` for :data:`KUBE_VERSION` on a multi-document stream."""
    exe = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(exe), "--strict", "--kubernetes-version", KUBE_VERSION, "-"],
                          input=manifest_text, capture_output=True, text=True, timeout=120)


def by_kind(objs: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: Iterable[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


# ---------------------------------------------------------------------------
# RBAC evaluation (what the API server's RBAC authorizer would decide)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Grant:
    """One rule of a (Cluster)Role, bound to the operator; namespace None = every namespace."""

    namespace: str | None
    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    role: str

    def allows(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        return ((group in self.api_groups or "*" in self.api_groups)
                and (resource in self.resources or "*" in self.resources)
                and (verb in self.verbs or "*" in self.verbs))


def operator_grants(objs: Sequence[Mapping[str, Any]], sa_name: str, sa_namespace: str) -> list[Grant]:
    """Every rule granted to the operator's ServiceAccount by the rendered bindings."""
    roles = {("ClusterRole", None, o["metadata"]["name"]): o for o in by_kind(objs, "ClusterRole")}
    roles.update({("Role", o["metadata"]["namespace"], o["metadata"]["name"]): o for o in by_kind(objs, "Role")})
    grants: list[Grant] = []
    for b in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        subjects = b.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
                   and s.get("namespace") == sa_namespace for s in subjects):
            continue
        ref = b["roleRef"]
        bind_ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role_ns = bind_ns if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{b['kind']} {b['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}"
        for rule in role.get("rules") or []:
            assert not rule.get("nonResourceURLs"), "the chart grants no non-resource URLs"
            assert not rule.get("resourceNames"), "rules are not restricted by resourceNames here"
            grants.append(Grant(bind_ns, tuple(rule.get("apiGroups") or ()), tuple(rule.get("resources") or ()),
                                tuple(rule.get("verbs") or ()), f"{role['kind']}/{role['metadata']['name']}"))
    return grants


def allowed(grants: Sequence[Grant], verb: str, group: str, resource: str, namespace: str | None) -> list[Grant]:
    return [g for g in grants if g.allows(verb, group, resource, namespace)]
