"""Server-side printing: ``meta.k8s.io/v1`` Tables, as ``kubectl get`` asks for them.

For custom resources the columns come from the CRD's ``additionalPrinterColumns``
and are rendered like apiextensions-apiserver's TableConvertor: a ``date``
column is rendered on the server as a human-readable age ("5m", "3h2m");
integers and numbers stay JSON numbers; strings are printed with kubectl's
JSONPath printer (lists joined with spaces).
"""
from __future__ import annotations

import datetime
import json
import re
from typing import Any

NAME_COLUMN = {'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
               'description': 'Name must be unique within a namespace. Is required when creating resources, '
                              'although some resources may allow a client to request the generation of an '
                              'appropriate name automatically. Name is primarily intended for creation '
                              'idempotence and configuration definition. Cannot be updated. More info: '
                              'https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names'}
AGE_DESCRIPTION = ('CreationTimestamp is a timestamp representing the server time when this object was created. '
                   'It is not guaranteed to be set in happens-before order across separate operations. '
                   'Clients may not set this value. It is represented in RFC3339 form and is in UTC.')


def parse_time(value: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
    except (ValueError, AttributeError):
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    if seconds < -1:
        return '<invalid>'
    if seconds < 0:
        return '0s'
    s = int(seconds)
    if s < 60 * 2:
        return f'{s}s'
    minutes = s // 60
    if minutes < 10:
        sec = s % 60
        return f'{minutes}m' if sec == 0 else f'{minutes}m{sec}s'
    if minutes < 60 * 3:
        return f'{minutes}m'
    hours = s // 3600
    if hours < 8:
        m = (s // 60) % 60
        return f'{hours}h' if m == 0 else f'{hours}h{m}m'
    if hours < 48:
        return f'{hours}h'
    if hours < 24 * 8:
        h = hours % 24
        return f'{hours // 24}d' if h == 0 else f'{hours // 24}d{h}h'
    if hours < 24 * 365 * 2:
        return f'{hours // 24}d'
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f'{hours // 24 // 365}y' if dy == 0 else f'{hours // 24 // 365}y{dy}d'
    return f'{hours // 24 // 365}y'


def age(timestamp: str | None) -> str:
    t = parse_time(timestamp or '')
    if t is None:
        return '<unknown>'
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())


# --------------------------------------------------------------------------- JSONPath (kubectl subset)

_TOKEN = re.compile(r"""\.\.?([A-Za-z0-9_$\-/]+)|\[\?\(@\.([^=!<>\s]+)\s*(==|!=)\s*['"]?([^'")]*)['"]?\)\]|\[(\*|-?\d+)\]|\['([^']*)'\]""")


def jsonpath(obj: Any, expr: str) -> list[Any]:
    """Evaluate a simple JSONPath (``.a.b``, ``[0]``, ``[*]``, ``[?(@.k=="v")]``). Returns all matches."""
    expr = expr.strip()
    if expr.startswith('{') and expr.endswith('}'):
        expr = expr[1:-1]
    if expr.startswith('$'):
        expr = expr[1:]
    current = [obj]
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f'unrecognized JSONPath at {expr[pos:]!r}')
        pos = m.end()
        nxt: list[Any] = []
        field, fkey, fop, fval, index, quoted = m.groups()
        field = field if field is not None else quoted
        for cur in current:
            if field is not None:
                if isinstance(cur, dict) and field in cur:
                    nxt.append(cur[field])
            elif fkey is not None:
                if isinstance(cur, list):
                    for item in cur:
                        got = jsonpath(item, '.' + fkey)
                        val = str(got[0]) if got else None
                        if isinstance(got[0] if got else None, bool):
                            val = 'true' if got[0] else 'false'
                        if (val == fval) == (fop == '=='):
                            nxt.append(item)
            elif index == '*':
                if isinstance(cur, list):
                    nxt.extend(cur)
                elif isinstance(cur, dict):
                    nxt.extend(cur.values())
            elif index is not None:
                if isinstance(cur, list):
                    i = int(index)
                    if -len(cur) <= i < len(cur):
                        nxt.append(cur[i])
        current = nxt
    return current


def _print_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return '<nil>'
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(',', ':'))
    return str(value)


def _cell(column: dict, obj: dict) -> Any:
    try:
        results = jsonpath(obj, column.get('jsonPath', ''))
    except ValueError:
        return None
    if not results:
        return None
    value = results[0]
    ctype = column.get('type', 'string')
    if ctype == 'string':
        return _print_value(value)
    if ctype == 'date':
        return age(value) if isinstance(value, str) else '<unknown>'
    if ctype == 'integer':
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if ctype == 'number':
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if ctype == 'boolean':
        return value if isinstance(value, bool) else None
    return _print_value(value)


def crd_columns(version: dict) -> list[dict]:
    cols = version.get('additionalPrinterColumns')
    if not cols:
        cols = [{'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}]
    return cols


def _partial(obj: dict, include: str) -> Any:
    if include == 'None':
        return None
    if include == 'Object':
        return obj
    return {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1', 'metadata': obj.get('metadata', {})}


# --------------------------------------------------------------------------- built-in rows

def _pod_row(pod: dict) -> list[Any]:
    spec, status = pod.get('spec') or {}, pod.get('status') or {}
    containers = spec.get('containers') or []
    statuses = status.get('containerStatuses') or []
    ready = sum(1 for c in statuses if c.get('ready'))
    restarts = sum(int(c.get('restartCount') or 0) for c in statuses)
    reason = status.get('reason') or status.get('phase') or 'Pending'
    for cs in statuses:
        state = cs.get('state') or {}
        if 'waiting' in state and state['waiting'].get('reason'):
            reason = state['waiting']['reason']
        elif 'terminated' in state:
            term = state['terminated']
            reason = term.get('reason') or (f'Signal:{term["signal"]}' if term.get('signal') else
                                             f'ExitCode:{term.get("exitCode", 0)}')
    if (pod.get('metadata') or {}).get('deletionTimestamp') and status.get('reason') != 'NodeLost':
        reason = 'Terminating'
    return [f'{ready}/{len(containers)}', reason, restarts, age((pod.get('metadata') or {}).get('creationTimestamp')),
            status.get('podIP') or '<none>', spec.get('nodeName') or '<none>',
            status.get('nominatedNodeName') or '<none>', '<none>']


_POD_COLUMNS = [
    {'name': 'Ready', 'type': 'string', 'format': '', 'priority': 0,
     'description': 'The aggregate readiness state of this pod for accepting traffic.'},
    {'name': 'Status', 'type': 'string', 'format': '', 'priority': 0,
     'description': 'The aggregate status of the containers in this pod.'},
    {'name': 'Restarts', 'type': 'string', 'format': '', 'priority': 0,
     'description': 'The number of times the containers in this pod have been restarted and when the last '
                    'container in this pod has restarted.'},
    {'name': 'Age', 'type': 'string', 'format': '', 'priority': 0, 'description': AGE_DESCRIPTION},
    {'name': 'IP', 'type': 'string', 'format': '', 'priority': 1, 'description': 'IP address allocated to the pod.'},
    {'name': 'Node', 'type': 'string', 'format': '', 'priority': 1,
     'description': 'Name of the node the pod is assigned to.'},
    {'name': 'Nominated Node', 'type': 'string', 'format': '', 'priority': 1,
     'description': 'Nominated node name, if any.'},
    {'name': 'Readiness Gates', 'type': 'string', 'format': '', 'priority': 1,
     'description': 'Readiness gates, if any.'},
]


def _node_row(node: dict) -> list[Any]:
    conds = {c.get('type'): c.get('status') for c in (node.get('status') or {}).get('conditions') or []}
    status = 'Ready' if conds.get('Ready') == 'True' else 'NotReady' if 'Ready' in conds else 'Unknown'
    if (node.get('spec') or {}).get('unschedulable'):
        status += ',SchedulingDisabled'
    labels = (node.get('metadata') or {}).get('labels') or {}
    roles = ','.join(sorted(k.split('/', 1)[1] for k in labels if k.startswith('node-role.kubernetes.io/'))) or '<none>'
    version = ((node.get('status') or {}).get('nodeInfo') or {}).get('kubeletVersion', '')
    return [status, roles, age((node.get('metadata') or {}).get('creationTimestamp')), version]


_NODE_COLUMNS = [
    {'name': 'Status', 'type': 'string', 'format': '', 'priority': 0, 'description': 'The status of the node'},
    {'name': 'Roles', 'type': 'string', 'format': '', 'priority': 0, 'description': 'The roles of the node'},
    {'name': 'Age', 'type': 'string', 'format': '', 'priority': 0, 'description': AGE_DESCRIPTION},
    {'name': 'Version', 'type': 'string', 'format': '', 'priority': 0,
     'description': 'Kubelet Version reported by the node.'},
]

_AGE_ONLY = [{'name': 'Age', 'type': 'string', 'format': '', 'priority': 0, 'description': AGE_DESCRIPTION}]


def table(objects: list[dict], *, crd_version: dict | None, plural: str, resource_version: str,
          include_object: str = 'Metadata', with_columns: bool = True) -> dict:
    """Build a Table for a list of objects of one resource."""
    if crd_version is not None:
        cols = crd_columns(crd_version)
        column_defs = [NAME_COLUMN] + [{'name': c['name'], 'type': c.get('type', 'string'),
                                        'format': c.get('format', ''), 'description': c.get('description', ''),
                                        'priority': c.get('priority', 0)} for c in cols]
        rows = [[o['metadata']['name']] + [_cell(c, o) for c in cols] for o in objects]
    elif plural == 'pods':
        column_defs = [NAME_COLUMN] + _POD_COLUMNS
        rows = [[o['metadata']['name']] + _pod_row(o) for o in objects]
    elif plural == 'nodes':
        column_defs = [NAME_COLUMN] + _NODE_COLUMNS
        rows = [[o['metadata']['name']] + _node_row(o) for o in objects]
    else:
        column_defs = [NAME_COLUMN] + _AGE_ONLY
        rows = [[o['metadata']['name'], age(o['metadata'].get('creationTimestamp'))] for o in objects]
    return {
        'kind': 'Table',
        'apiVersion': 'meta.k8s.io/v1',
        'metadata': {'resourceVersion': resource_version},
        'columnDefinitions': column_defs if with_columns else [],
        'rows': [{'cells': cells, 'object': _partial(o, include_object)} for cells, o in zip(rows, objects)],
    }
