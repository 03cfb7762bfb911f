"""The Helm chart, proven without a cluster: lint, schema checks of every
rendered object for a pinned Kubernetes version, assertions on the objects,
and the values schema rejecting wrong values with the field named.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from trainingjob_operator.__main__ import parse_args

from .render import (CHART, KUBE_VERSION, RELEASE, RELEASE_NAMESPACE, VALUES_DIR, by_kind, helm, kubernetes_validate,
                     one, operator_grants, render, template_text)

MODES = {
    "default": [],
    "cluster-wide": [VALUES_DIR / "cluster-wide.yaml"],
    "namespaces": [VALUES_DIR / "namespaces.yaml"],
    "full": [VALUES_DIR / "full.yaml"],
    "metrics-off": [VALUES_DIR / "metrics-off.yaml"],
    "ha": [VALUES_DIR / "ha.yaml"],
}
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by")
FULLNAME = f"{RELEASE}-trainingjob-operator"


@functools.lru_cache(maxsize=None)
def _rendered(mode: str) -> str:
    return template_text(MODES[mode]).stdout


def objects(mode: str) -> list[dict[str, Any]]:
    """The objects of one mode (rendered once per session; parsed fresh for each caller)."""
    return [d for d in yaml.safe_load_all(_rendered(mode)) if d]


def env_of(deploy: Mapping[str, Any]) -> dict[str, str]:
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in c.get("env") or []}


# ---------------------------------------------------------------------------
# lint and Kubernetes schemas
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
def test_helm_lint_strict(mode):
    args = ["lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE, "--kube-version", KUBE_VERSION]
    for f in MODES[mode]:
        args += ["--values", str(f)]
    out = helm(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rendered_objects_pass_kubernetes_validate_strict(mode):
    docs = objects(mode)
    # ServiceMonitor is prometheus-operator's CRD, not in Kubernetes' schemas:
    # it is checked field by field in test_service_monitor instead.
    builtin = [d for d in docs if d["kind"] != "ServiceMonitor"]
    proc = kubernetes_validate(yaml.safe_dump_all(builtin))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = re.findall(r"passed for resource (\S+) against version", proc.stdout)
    assert len(passed) == len(builtin), proc.stdout
    assert "ERROR" not in proc.stdout


def test_crd_passes_kubernetes_validate_strict():
    """The CRD helm installs (crds/trainingjobs.yaml) is itself a valid CustomResourceDefinition."""
    text = template_text(include_crds=True).stdout
    crds = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["trainingjobs.trainingjob.dev"]
    # kubernetes-validate names one bad key at a time; list them all first. A
    # YAML flow mapping like {description: a, b} silently makes "b" a key.
    stray = [f"{path}: {key!r}" for v in crds[0]["spec"]["versions"]
             for path, key in _stray_schema_keys(v["schema"]["openAPIV3Schema"], v["name"])]
    assert not stray, "keys that are not JSONSchemaProps fields in the CRD schema:\n" + "\n".join(stray)
    proc = kubernetes_validate(yaml.safe_dump_all(crds))
    assert proc.returncode == 0, proc.stdout + proc.stderr


JSON_SCHEMA_PROPS = {
    "$schema", "$ref", "id", "type", "format", "title", "description", "default", "example", "enum", "nullable",
    "properties", "additionalProperties", "patternProperties", "items", "additionalItems", "required",
    "dependencies", "definitions", "allOf", "anyOf", "oneOf", "not", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "externalDocs", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


def _stray_schema_keys(schema: Any, path: str) -> list[tuple[str, str]]:
    if not isinstance(schema, dict):
        return []
    out = [(path, k) for k in schema if k not in JSON_SCHEMA_PROPS]
    for name, sub in (schema.get("properties") or {}).items():
        out += _stray_schema_keys(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties", "not"):
        out += _stray_schema_keys(schema.get(key), f"{path}.{key}")
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key) or []):
            out += _stray_schema_keys(sub, f"{path}.{key}[{i}]")
    return out


def test_kubernetes_validate_catches_a_wrong_manifest():
    """The validator really checks: an unknown Deployment field fails --strict."""
    deploy = dict(one(objects("default"), "Deployment"))
    deploy["spec"] = {**deploy["spec"], "replica": 1}
    proc = kubernetes_validate(yaml.safe_dump(deploy))
    assert proc.returncode != 0 and "replica" in proc.stdout + proc.stderr


def test_crd_is_shipped_in_crds_dir_and_not_templated_by_default():
    """crds/ is Helm's install-once path; by default no template renders a CRD (see docs/operations.md)."""
    assert (CHART / "crds" / "trainingjobs.yaml").is_file()
    assert not by_kind(objects("default"), "CustomResourceDefinition")


def test_crd_upgrade_path_crds_manage_renders_the_one_crd_kept_on_uninstall():
    """crds.manage=true: `helm upgrade` applies the CRD from crds/ (same content), install with --skip-crds."""
    source = yaml.safe_load((CHART / "crds" / "trainingjobs.yaml").read_text())
    rendered = one(objects("ha"), "CustomResourceDefinition")
    assert rendered["spec"] == source["spec"] and rendered["metadata"]["name"] == source["metadata"]["name"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    # With --skip-crds (the documented install) the CRD exists exactly once in what Helm applies.
    text = template_text(MODES["ha"], include_crds=False).stdout
    assert len(by_kind([d for d in yaml.safe_load_all(text) if d], "CustomResourceDefinition")) == 1
    proc = kubernetes_validate(yaml.safe_dump(rendered))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# the Deployment
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
def test_deployment_one_replica_recreate_and_security_defaults(mode):
    deploy = one(objects(mode), "Deployment")
    spec = deploy["spec"]
    if mode == "ha":  # leader election: several replicas, rolling updates (test_leader_election_values)
        assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    else:
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert "privileged" not in sc
    # A writable /tmp on an emptyDir, since the root filesystem is read-only.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols[mounts["/tmp"]]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == (
        "tj-operator" if mode == "namespaces" else FULLNAME)
    assert pod["automountServiceAccountToken"] is True


@pytest.mark.parametrize("mode", sorted(MODES))
def test_probes_liveness_is_kopf_health_readiness_is_not(mode):
    deploy = one(objects(mode), "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(deploy)
    assert int(env["TJ_OPERATOR_HEALTH_PORT"]) == ports["health"]
    assert int(env["TJ_OPERATOR_READY_PORT"]) == ports["ready"] != ports["health"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
    assert c["readinessProbe"]["periodSeconds"] == (5 if mode == "ha" else 10)  # configurable timings
    assert c["livenessProbe"]["failureThreshold"] == 3


def test_ready_port_equal_to_health_port_is_rejected():
    proc = template_text(sets=["readyPort=8080"], check=False)
    assert proc.returncode != 0 and "readyPort and healthPort must differ" in proc.stderr


def test_leader_election_values():
    objs = objects("ha")
    deploy = one(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0,
                                                                                      "maxSurge": 1}}
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["TJ_OPERATOR_LEADER_ELECT"]["value"] == "true"
    assert env["TJ_OPERATOR_LEADER_ELECTION_NAMESPACE"]["value"] == RELEASE_NAMESPACE
    assert env["TJ_OPERATOR_LEADER_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for k in [k for k in os.environ if k.startswith("TJ_OPERATOR_")]:
        del os.environ[k]
    try:
        for k, e in env.items():
            if "value" in e and k.startswith("TJ_OPERATOR_"):
                os.environ[k] = e["value"]
        args = parse_args([])
    finally:
        for k in [k for k in os.environ if k.startswith("TJ_OPERATOR_")]:
            del os.environ[k]
    assert args.leader_elect and args.leader_election_name == FULLNAME
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (20, 12, 3)
    # The Lease RBAC: in the release namespace only, this one Lease by name (create cannot be).
    role = next(r for r in by_kind(objs, "Role") if r["metadata"]["name"].endswith("-leader-election"))
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert {(tuple(r["verbs"]), tuple(r.get("resourceNames") or ())) for r in role["rules"]} == {
        (("create",), ()), (("get", "update"), (FULLNAME,))}
    binding = next(b for b in by_kind(objs, "RoleBinding") if b["metadata"]["name"].endswith("-leader-election"))
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert not [r for r in by_kind(objects("default"), "Role")]  # off by default


def test_replicas_above_one_need_leader_election():
    proc = template_text(sets=["replicas=2"], check=False)
    assert proc.returncode != 0 and "replicas > 1 needs leaderElection.enabled=true" in proc.stderr


def test_pod_disruption_budget_option():
    assert not by_kind(objects("default"), "PodDisruptionBudget")
    pdb = one(objects("ha"), "PodDisruptionBudget")
    deploy = one(objects("ha"), "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    proc = template_text(sets=["podDisruptionBudget.enabled=true"], check=False)  # 1 replica, minAvailable 1
    assert proc.returncode != 0 and "minAvailable must be below replicas" in proc.stderr


def test_metrics_network_policy_option():
    assert not by_kind(objects("default"), "NetworkPolicy")
    pol = one(objects("ha"), "NetworkPolicy")
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    probes, metrics = pol["spec"]["ingress"]
    assert "from" not in probes and {p["port"] for p in probes["ports"]} == {"health", "ready"}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    values = (CHART / "values.yaml").read_text()
    assert "in-cluster scraping only" in values and "no authentication" in values


@pytest.mark.parametrize("mode", ["default", "namespaces"])
def test_user_roles_aggregate_into_admin_edit_view(mode):
    roles = {r["metadata"]["name"]: r for r in by_kind(objects(mode), "ClusterRole")}
    edit, view = roles[f"{FULLNAME}-edit"], roles[f"{FULLNAME}-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"create", "delete", "patch", "update"} <= set(edit["rules"][0]["verbs"])
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    # Users never write the status: that is the operator's.
    assert all(v == "get" for r in edit["rules"] if "trainingjobs/status" in r["resources"] for v in r["verbs"])
    text = template_text(sets=["rbac.aggregateToDefaultRoles=false"]).stdout
    assert not [d for d in yaml.safe_load_all(text) if d and d["metadata"]["name"].endswith(("-edit", "-view"))]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chart_settings_reach_the_operator_cli(mode, monkeypatch):
    """The env the chart sets is parsed by the operator's own CLI into the values' settings."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in MODES[mode]:
        values = _merge(values, yaml.safe_load(f.read_text()) or {})
    deploy = one(objects(mode), "Deployment")
    env = env_of(deploy)
    for k in [k for k in os.environ if k.startswith("TJ_OPERATOR_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("TJ_OPERATOR_") and v is not None:  # (valueFrom: the pod's name)
            monkeypatch.setenv(k, v)
    args = parse_args([])
    assert args.namespace == (values["watchNamespaces"] or None)
    assert args.log_level == values["logLevel"]
    assert args.metrics_port == (values["metrics"]["port"] if values["metrics"]["enabled"] else 0)
    assert args.health_port == values["healthPort"]
    assert args.resync_seconds == values["resyncSeconds"]
    assert args.workers == values["workers"]
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if values["metrics"]["enabled"]:
        assert ports["metrics"] == args.metrics_port
    else:
        assert "metrics" not in ports


def test_image_tag_defaults_to_app_version_and_digest_wins():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    c = one(objects("default"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"ghcr.io/acme/trainingjob-operator:{chart['appVersion']}"
    c = one(objects("namespaces"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == ("registry.example.com/ml/trainingjob-operator@sha256:"
                          "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")


def test_chart_yaml_versions():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "trainingjob-operator"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and re.fullmatch(r"\d+\.\d+\.\d+", chart["appVersion"])
    assert chart["kubeVersion"].startswith(">=1.")
    proc = helm("template", RELEASE, str(CHART), "--kube-version", "1.27.0", check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


# ---------------------------------------------------------------------------
# labels and the metrics Service
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_object_has_standard_labels(mode):
    objs = objects(mode)
    for o in objs:
        labels = o["metadata"].get("labels") or {}
        for key in STANDARD_LABELS:
            assert labels.get(key), f"{o['kind']}/{o['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
    deploy = one(objs, "Deployment")
    selector = deploy["spec"]["selector"]["matchLabels"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    # Never the operator's own managed-by value: its pod watch selects that label.
    assert pod_labels["app.kubernetes.io/managed-by"] != "trainingjob-operator"
    namespaced = [o for o in objs if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition")]
    for o in namespaced:
        assert o["metadata"].get("namespace"), f"{o['kind']}/{o['metadata']['name']} has no namespace"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_metrics_service_selects_the_operator_pod(mode):
    objs = objects(mode)
    deploy = one(objs, "Deployment")
    services = by_kind(objs, "Service")
    if mode == "metrics-off":
        assert services == [] and env_of(deploy)["TJ_OPERATOR_METRICS_PORT"] == "0"
        return
    svc = one(objs, "Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["type"] == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "metrics"


def test_service_monitor_off_by_default_and_complete_when_on():
    assert not by_kind(objects("default"), "ServiceMonitor")
    objs = objects("full")
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                        "scrapeTimeout": "5s"}]


def test_service_monitor_without_service_fails_clearly():
    proc = template_text(sets=["metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"], check=False)
    assert proc.returncode != 0 and "metrics.serviceMonitor.enabled needs" in proc.stderr


def test_same_port_for_health_and_metrics_is_rejected():
    proc = template_text(sets=["healthPort=9090"], check=False)
    assert proc.returncode != 0 and "metrics.port and healthPort must differ" in proc.stderr


# ---------------------------------------------------------------------------
# RBAC
# ---------------------------------------------------------------------------
def _rules(role: Mapping[str, Any]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                assert (g, res) not in out, f"{g}/{res} appears in two rules"
                out[(g, res)] = r["verbs"]
    return out


NAMESPACED_RULES = {
    ("trainingjob.dev", "trainingjobs"): ["get", "list", "watch"],
    ("trainingjob.dev", "trainingjobs/status"): ["patch"],
    ("trainingjob.dev", "trainingjobs/finalizers"): ["update"],  # defect 7: blockOwnerDeletion
    ("", "pods"): ["create", "delete", "list", "watch"],
    ("", "services"): ["create", "delete", "list", "watch"],
    ("", "secrets"): ["get"],
    ("", "events"): ["create", "patch"],  # patch: repeated Events are aggregated
}


def _operator_cluster_roles(objs):
    return [r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"] == FULLNAME]


def test_rbac_cluster_wide_mode():
    objs = objects("cluster-wide")
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    (role,) = _operator_cluster_roles(objs)
    assert _rules(role) == {**NAMESPACED_RULES, ("", "nodes"): ["list", "watch"]}
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    sa = one(objs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]
    grants = operator_grants(objs, sa["metadata"]["name"], RELEASE_NAMESPACE)
    assert all(g.namespace is None for g in grants)


def test_rbac_namespaces_mode_roles_only():
    objs = objects("namespaces")
    # Nothing cluster-scoped for the operator (the users' aggregated roles bind to nobody).
    assert not _operator_cluster_roles(objs) and not by_kind(objs, "ClusterRoleBinding")
    roles = by_kind(objs, "Role")
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == NAMESPACED_RULES  # no nodes
    sa = one(objs, "ServiceAccount")
    assert sa["metadata"]["name"] == "tj-operator" and sa["metadata"]["namespace"] == RELEASE_NAMESPACE
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "tj-operator", "namespace": RELEASE_NAMESPACE}]
        assert b["roleRef"]["kind"] == "Role"
    grants = operator_grants(objs, "tj-operator", RELEASE_NAMESPACE)
    secret_grants = [g for g in grants if "secrets" in g.resources]
    assert sorted(g.namespace for g in secret_grants) == ["team-a", "team-b"]
    assert all(g.verbs == ("get",) for g in secret_grants)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_has_no_wildcards_and_secrets_get_only(mode):
    for role in by_kind(objects(mode), "ClusterRole") + by_kind(objects(mode), "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['kind']} {rule}"
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"]


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaces"])
def test_every_rbac_rule_is_commented_with_its_purpose(mode):
    lines = _rendered(mode).splitlines()
    rule_lines = [i for i, line in enumerate(lines) if re.match(r"\s*- apiGroups:", line)]
    assert rule_lines
    for i in rule_lines:
        assert lines[i - 1].lstrip().startswith("#"), f"uncommented rule at: {lines[i]!r} (after {lines[i - 1]!r})"


def test_rbac_create_false_renders_no_rbac():
    text = template_text(sets=["rbac.create=false"]).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(text) if d}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# ---------------------------------------------------------------------------
# values: documented, schema'd, typos rejected
# ---------------------------------------------------------------------------
def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return b


def _leaf_paths(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("resources", "podSecurityContext", "securityContext",
                                                   "livenessProbe", "readinessProbe"):
            out += _leaf_paths(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def test_every_value_is_documented_and_in_the_schema():
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    lines = text.splitlines()
    for path in _leaf_paths(values):
        key = path.split(".")[-1]
        depth = path.count(".")
        idx = next(i for i, line in enumerate(lines) if re.match(rf"^{'  ' * depth}{re.escape(key)}:", line))
        j = idx - 1
        while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1
        assert j >= 0 and lines[j].lstrip().startswith("# --"), f"value {path} has no '# --' doc comment"
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"value {path} is not in values.schema.json"
            node = node["properties"][part]
            if "$ref" in node:
                node = schema["definitions"][node["$ref"].split("/")[-1]]


def test_schema_rejects_unknown_keys_at_every_chart_owned_level():
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for key in ("image", "metrics", "serviceAccount", "rbac", "resources"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    for key in ("service", "serviceMonitor"):
        assert schema["properties"]["metrics"]["properties"][key]["additionalProperties"] is False, key


def test_at_least_five_bad_values_files():
    assert len(BAD_VALUES) >= 5


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[p.stem for p in BAD_VALUES])
def test_schema_rejects_wrong_values_naming_the_field(bad):
    expect = bad.read_text().splitlines()[0].removeprefix("# expect:").strip()
    assert expect, f"{bad} must start with '# expect: <error text>'"
    proc = template_text([bad], check=False)
    assert proc.returncode != 0, f"{bad.name} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert expect in proc.stderr, f"expected {expect!r} in:\n{proc.stderr}"


# ---------------------------------------------------------------------------
# NOTES.txt
# ---------------------------------------------------------------------------
def _notes(tmp_path: Path, *sets: str) -> str:
    """Render NOTES.txt (helm template skips it) through tpl in a throw-away copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-source.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        "data:\n  notes: {{ tpl (.Files.Get \"notes-source.txt\") . | quote }}\n")
    text = template_text(sets=sets, chart=chart).stdout
    cm = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "ConfigMap")
    return cm["data"]["notes"]


def test_notes_tell_what_to_run_next(tmp_path):
    notes = _notes(tmp_path)
    assert f"rollout status deployment/{FULLNAME}" in notes
    assert "kubectl -n <namespace> create secret generic s3-creds" in notes
    assert "AWS_ACCESS_KEY_ID" in notes and "AWS_SECRET_ACCESS_KEY" in notes
    assert "apply -f examples/trainingjob.yaml" in notes and "get tj -w" in notes
    assert f"port-forward service/{FULLNAME}-metrics 9090" in notes
    assert "every namespace" in notes
    ns_notes = _notes(tmp_path / "ns", "watchNamespaces={team-a,team-b}")
    assert "only these namespaces: team-a, team-b" in ns_notes


def test_issue12_reclaim_warnings_reach_the_operator_as_env_and_flags(tmp_path, monkeypatch):
    from trainingjob_operator.snapshot_requests import DEFAULT_RECLAIM_TAINTS, ReclaimConfig, parse_taint_list

    env = env_of(one(objects("default"), "Deployment"))
    assert parse_taint_list(env["TJ_OPERATOR_RECLAIM_TAINTS"]) == DEFAULT_RECLAIM_TAINTS == ReclaimConfig().taints
    assert env["TJ_OPERATOR_RECLAIM_POD_CONDITION"] == "true"
    assert int(env["TJ_OPERATOR_RECLAIM_HOLD_SECONDS"]) == ReclaimConfig().hold_seconds == 120
    off = env_of(one(render({"reclaimWarnings": {"nodeTaints": [], "podDisruptionTarget": False, "holdSeconds": 0}},
                            tmp_dir=tmp_path), "Deployment"))
    assert (off["TJ_OPERATOR_RECLAIM_TAINTS"], off["TJ_OPERATOR_RECLAIM_POD_CONDITION"]) == ("", "false")
    for name in ("TJ_OPERATOR_RECLAIM_TAINTS", "TJ_OPERATOR_RECLAIM_POD_CONDITION", "TJ_OPERATOR_RECLAIM_HOLD_SECONDS"):
        monkeypatch.setenv(name, off[name])
    args = parse_args([])
    assert parse_taint_list(args.reclaim_taints) == () and args.reclaim_pod_condition == "false"
    assert args.reclaim_hold_seconds == 0
