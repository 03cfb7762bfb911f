"""Label and field selectors, parsed and matched as kube-apiserver does."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable


class SelectorError(ValueError):
    """An unparsable selector (answered with 400 BadRequest)."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # '=', '!=', 'in', 'notin', 'exists', '!'
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == 'exists':
            return self.key in labels
        if self.op == '!':
            return self.key not in labels
        if self.op in ('=', 'in'):
            return self.key in labels and labels[self.key] in self.values
        if self.op in ('!=', 'notin'):
            return self.key not in labels or labels[self.key] not in self.values
        return False  # pragma: no cover


_KEY = r'[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?'
_VALUE = r'([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?'


def _split_top(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ''
    for ch in selector:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_labels(selector: str | None) -> list[Requirement]:
    if not selector:
        return []
    reqs: list[Requirement] = []
    for part in _split_top(selector):
        m = re.fullmatch(r'(\S+?)\s+(in|notin)\s*\((.*)\)', part)
        if m:
            values = tuple(v.strip() for v in m.group(3).split(',') if v.strip())
            if not values:
                raise SelectorError('unable to parse requirement: found \')\', expected: identifier')
            reqs.append(Requirement(m.group(1), m.group(2), values))
            continue
        m = re.fullmatch(r'(\S+?)\s*(==|!=|=)\s*(\S*)', part)
        if m:
            key, op, value = m.groups()
            if not re.fullmatch(_VALUE, value):
                raise SelectorError(f'unable to parse requirement: values[0][{key}]: Invalid value: "{value}"')
            reqs.append(Requirement(key, '=' if op in ('=', '==') else '!=', (value,)))
            continue
        if part.startswith('!'):
            key = part[1:].strip()
            if not re.fullmatch(_KEY, key):
                raise SelectorError(f'unable to parse requirement: invalid label key "{key}"')
            reqs.append(Requirement(key, '!'))
            continue
        if re.fullmatch(_KEY, part):
            reqs.append(Requirement(part, 'exists'))
            continue
        raise SelectorError(f'unable to parse requirement: invalid label key "{part}"')
    return reqs


def match_labels(reqs: list[Requirement], obj: dict) -> bool:
    labels = (obj.get('metadata') or {}).get('labels') or {}
    return all(r.matches(labels) for r in reqs)


def label_selector_from_dict(selector: dict | None) -> list[Requirement]:
    """A metav1.LabelSelector (matchLabels/matchExpressions) as requirements."""
    reqs: list[Requirement] = []
    for k, v in ((selector or {}).get('matchLabels') or {}).items():
        reqs.append(Requirement(k, '=', (v,)))
    for expr in (selector or {}).get('matchExpressions') or []:
        op = {'In': 'in', 'NotIn': 'notin', 'Exists': 'exists', 'DoesNotExist': '!'}[expr['operator']]
        reqs.append(Requirement(expr['key'], op, tuple(expr.get('values') or ())))
    return reqs


# --------------------------------------------------------------------------- field selectors

def _get(obj: dict, dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split('.'):
        if not isinstance(cur, dict):
            return ''
        cur = cur.get(part)
    if cur is None:
        return ''
    if isinstance(cur, bool):
        return 'true' if cur else 'false'
    return str(cur)


# Per resource (group, plural): the field labels the real server supports beyond metadata.*.
FIELD_LABELS: dict[tuple[str, str], set[str]] = {
    ('', 'pods'): {'spec.nodeName', 'spec.restartPolicy', 'spec.schedulerName', 'spec.serviceAccountName',
                   'spec.hostNetwork', 'status.phase', 'status.podIP', 'status.nominatedNodeName'},
    ('', 'nodes'): {'spec.unschedulable'},
    ('', 'secrets'): {'type'},
    ('', 'namespaces'): {'status.phase'},
    ('', 'events'): {'involvedObject.kind', 'involvedObject.namespace', 'involvedObject.name',
                     'involvedObject.uid', 'involvedObject.apiVersion', 'involvedObject.resourceVersion',
                     'involvedObject.fieldPath', 'reason', 'reportingComponent', 'source', 'type'},
    ('events.k8s.io', 'events'): {'regarding.kind', 'regarding.namespace', 'regarding.name', 'regarding.uid',
                                  'reason', 'type', 'reportingController'},
}


def parse_fields(selector: str | None, group: str, plural: str) -> list[tuple[str, str, str]]:
    if not selector:
        return []
    allowed = {'metadata.name', 'metadata.namespace'} | FIELD_LABELS.get((group, plural), set())
    out: list[tuple[str, str, str]] = []
    for part in _split_top(selector):
        m = re.fullmatch(r'([^=!]+?)\s*(==|!=|=)\s*(.*)', part)
        if not m:
            raise SelectorError(f'invalid selector: \'{selector}\'; can\'t understand \'{part}\'')
        key, op, value = m.groups()
        if key not in allowed:
            raise SelectorError(f'field label not supported: {key}')
        out.append((key, '!=' if op == '!=' else '=', value))
    return out


def match_fields(reqs: list[tuple[str, str, str]], obj: dict) -> bool:
    for key, op, value in reqs:
        if key == 'source':
            actual = _get(obj, 'source.component')
        else:
            actual = _get(obj, key)
        if (actual == value) != (op == '='):
            return False
    return True


def make_filter(label_selector: str | None, field_selector: str | None,
                group: str, plural: str) -> Callable[[dict], bool]:
    labels = parse_labels(label_selector)
    fields = parse_fields(field_selector, group, plural)
    return lambda obj: match_labels(labels, obj) and match_fields(fields, obj)
