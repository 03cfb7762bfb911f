"""Decoding and validation of built-in kinds (pods, services) like kube-apiserver's.

The real server decodes a request body into Go structs before anything else:

* a value of the wrong JSON type is a 400 (``json: cannot unmarshal string
  into Go struct field PodSecurityContext.spec.securityContext.runAsUser of
  type int64``), and so is a quantity that does not parse;
* a field the struct does not have is dropped, with a ``Warning`` header
  (``fieldValidation`` unset or ``Warn``), silently (``Ignore``), or refused
  with 400 ``strict decoding error: unknown field "spec.securityContext.privileged"``
  (``Strict``);

then validates the object (422 ``Pod "x" is invalid: ...``): required fields,
names, ranges, enums, requests against limits. The struct shapes come from
the OpenAPI schemas of Kubernetes v1.32 (the version this stand-in reports)
that PyPI ``kubernetes-validate`` ships offline. Only ``spec`` and
``metadata`` are decoded strictly; status writes (the kubelet's) are not.
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any

from localcluster import crdschema
from localcluster.apiserver_errors import ApiError, bad_request

SCHEMA_VERSION = 'v1.32.0-local-strict'
QUANTITY = re.compile(r'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$')
QUANTITY_MESSAGE = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
DNS1123_LABEL = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?')
INT32_MAX = 2147483647
KINDS = {('', 'pods'): 'io.k8s.api.core.v1.Pod', ('', 'services'): 'io.k8s.api.core.v1.Service'}
_REF = '#/$defs/'
_GO_TYPES = {'integer': 'int64', 'number': 'float64', 'string': 'string', 'boolean': 'bool', 'array': 'slice',
             'object': 'struct'}
_SUFFIX = {'': 1, 'n': 1e-9, 'u': 1e-6, 'm': 1e-3, 'k': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12, 'P': 1e15, 'E': 1e18,
           'Ki': 2 ** 10, 'Mi': 2 ** 20, 'Gi': 2 ** 30, 'Ti': 2 ** 40, 'Pi': 2 ** 50, 'Ei': 2 ** 60}


@functools.lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    import kubernetes_validate

    path = pathlib.Path(kubernetes_validate.__file__).parent / 'kubernetes-json-schema' / SCHEMA_VERSION
    return json.loads((path / '_definitions.json').read_text())['$defs']


def quantity_value(text: str) -> float | None:
    """The number a Kubernetes quantity stands for, or ``None`` if it does not parse."""
    m = QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if not m:
        return None
    try:
        number = float(m.group(1))
    except ValueError:
        return None
    suffix = m.group(2)
    if suffix in _SUFFIX:
        return number * _SUFFIX[suffix]
    if suffix[:1] in 'eE':
        try:
            return number * 10 ** int(suffix[1:])
        except ValueError:
            return None
    return None


class _Decoder:
    """Walks a value along the schema: type errors raise, unknown fields are collected and dropped."""

    def __init__(self, kind: str, version: str) -> None:
        self.kind, self.version = kind, version
        self.unknown: list[str] = []

    def fail(self, message: str) -> ApiError:
        return bad_request(f'{self.kind} in version "{self.version}" cannot be handled as a {self.kind}: {message}')

    def walk(self, value: Any, schema: dict, path: str, struct: str) -> Any:
        ref = schema.get('$ref')
        if ref:
            name = ref[len(_REF):]
            if name == 'io.k8s.apimachinery.pkg.api.resource.Quantity':
                if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))
                                          or quantity_value(str(value)) is None):
                    raise self.fail(QUANTITY_MESSAGE)
                return value
            if name == 'io.k8s.apimachinery.pkg.util.intstr.IntOrString':
                if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                    raise self.fail(f'json: cannot unmarshal {crdschema.json_type(value)} into Go struct field '
                                    f'{struct}.{path} of type intstr.IntOrString')
                return value
            target = _definitions().get(name, {})
            return self.walk(value, target, path, name.rsplit('.', 1)[-1])
        if value is None:
            return value
        types = schema.get('type')
        types = [types] if isinstance(types, str) else [t for t in (types or []) if t != 'null']
        if types and crdschema.json_type(value) not in types and not (crdschema.json_type(value) == 'integer' and 'number' in types):
            raise self.fail(f'json: cannot unmarshal {crdschema.json_type(value)} into Go struct field {struct}.{path} '
                            f'of type {_GO_TYPES.get(types[0], types[0])}')
        if isinstance(value, list):
            items = schema.get('items') or {}
            return [self.walk(v, items, f'{path}[{i}]', struct) for i, v in enumerate(value)]
        if isinstance(value, dict):
            props = schema.get('properties')
            extra = schema.get('additionalProperties')
            out = {}
            for k, v in value.items():
                sub = f'{path}.{k}' if path else k
                if props is not None and k in props:
                    out[k] = self.walk(v, props[k], sub, struct)
                elif isinstance(extra, dict):
                    out[k] = self.walk(v, extra, f'{path}[{k}]' if path else k, struct)
                elif props is not None or extra is False:
                    self.unknown.append(sub)
                else:
                    out[k] = v
            return out
        return value


def decode(key: tuple[str, str], kind: str, version: str, obj: dict, field_validation: str) -> tuple[dict, dict]:
    """Decode ``obj`` (a pod or Service) as the real server does; returns (object, warning headers).

    Raises:
        ApiError: 400 for a type error, a bad quantity, or unknown fields under ``Strict``.
    """
    root = _definitions()[KINDS[key]]
    dec = _Decoder(kind, version)
    out = dict(obj)
    for field in ('metadata', 'spec'):
        if field in obj:
            out[field] = dec.walk(obj[field], root['properties'][field], field, kind)
    warnings: dict[str, str] = {}
    if dec.unknown and field_validation == 'Strict':
        listed = ', '.join(f'unknown field "{u}"' for u in dec.unknown)
        raise dec.fail(f'strict decoding error: {listed}')
    if dec.unknown and field_validation != 'Ignore':
        warnings['Warning'] = ', '.join(f'299 - "unknown field \\"{u}\\""' for u in dec.unknown)
    return out, warnings


def validate_pod_spec(spec: dict, path: str = 'spec') -> list[crdschema.FieldError]:
    """The checks of ``ValidatePodSpec`` a TrainingJob's podTemplate can trip."""
    errors: list[crdschema.FieldError] = []
    E = crdschema.FieldError
    containers = spec.get('containers')
    if not containers:
        errors.append(E('Required', f'{path}.containers'))
    names: set[str] = set()
    for i, c in enumerate(containers or []):
        cp = f'{path}.containers[{i}]'
        name = c.get('name')
        if not name:
            errors.append(E('Required', f'{cp}.name'))
        elif not DNS1123_LABEL.fullmatch(name) or len(name) > 63:
            errors.append(E('Invalid', f'{cp}.name', name, "a lowercase RFC 1123 label must consist of lower case "
                            "alphanumeric characters or '-', and must start and end with an alphanumeric character"))
        elif name in names:
            errors.append(E('Duplicate', f'{cp}.name', name))
        names.add(name or '')
        if not c.get('image'):
            errors.append(E('Required', f'{cp}.image'))
        errors += _resources(c.get('resources') or {}, f'{cp}.resources')
        errors += _security_context(c.get('securityContext') or {}, f'{cp}.securityContext')
    errors += _security_context(spec.get('securityContext') or {}, f'{path}.securityContext', pod=True)
    policy = spec.get('restartPolicy')
    if policy is not None and policy not in ('Always', 'OnFailure', 'Never'):
        errors.append(E('NotSupported', f'{path}.restartPolicy', policy,
                        'supported values: "Always", "OnFailure", "Never"'))
    dns = spec.get('dnsPolicy')
    if dns is not None and dns not in ('ClusterFirstWithHostNet', 'ClusterFirst', 'Default', 'None'):
        errors.append(E('NotSupported', f'{path}.dnsPolicy', dns,
                        'supported values: "ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"'))
    grace = spec.get('terminationGracePeriodSeconds')
    if isinstance(grace, int) and grace < 0:
        errors.append(E('Invalid', f'{path}.terminationGracePeriodSeconds', grace, 'must be greater than or equal to 0'))
    return errors


def _resources(res: dict, path: str) -> list[crdschema.FieldError]:
    errors = []
    limits, requests = res.get('limits') or {}, res.get('requests') or {}
    for which, values in (('limits', limits), ('requests', requests)):
        for name, q in values.items():
            v = quantity_value(str(q))
            if v is not None and v < 0:
                errors.append(crdschema.FieldError('Invalid', f'{path}.{which}[{name}]', q,
                                                   'must be greater than or equal to 0'))
    for name, q in requests.items():
        if name in limits:
            req, lim = quantity_value(str(q)), quantity_value(str(limits[name]))
            if req is not None and lim is not None and req > lim:
                errors.append(crdschema.FieldError('Invalid', f'{path}.requests', q,
                                                   f'must be less than or equal to {name} limit of {limits[name]}'))
    return errors


def _security_context(sc: dict, path: str, *, pod: bool = False) -> list[crdschema.FieldError]:
    errors = []
    fields = ['runAsUser', 'runAsGroup'] + (['fsGroup'] if pod else [])
    for f in fields:
        v = sc.get(f)
        if isinstance(v, int) and not 0 <= v <= INT32_MAX:
            errors.append(crdschema.FieldError('Invalid', f'{path}.{f}', v,
                                               f'must be between 0 and {INT32_MAX}, inclusive'))
    for i, g in enumerate(sc.get('supplementalGroups') or [] if pod else []):
        if isinstance(g, int) and not 0 <= g <= INT32_MAX:
            errors.append(crdschema.FieldError('Invalid', f'{path}.supplementalGroups[{i}]', g,
                                               f'must be between 0 and {INT32_MAX}, inclusive'))
    if not pod and sc.get('privileged') and sc.get('allowPrivilegeEscalation') is False:
        errors.append(crdschema.FieldError('Invalid', path, None,
                                           'cannot set `allowPrivilegeEscalation` to false and `privileged` to true'))
    return errors
