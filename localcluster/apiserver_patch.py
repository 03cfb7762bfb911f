"""PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch.

Strategic merge patch follows k8s.io/apimachinery/pkg/util/strategicpatch for
the core types' list fields that carry ``patchStrategy: merge`` (merged by
their ``patchMergeKey``), plus the directives ``$patch: replace|delete|merge``,
``$deleteFromPrimitiveList/<field>`` and ``$setElementOrder/<field>``
(the latter is accepted and applied to order). Fields not in the table are
replaced, as they are for types without a merge strategy.
"""
from __future__ import annotations

import copy
from typing import Any


class PatchError(Exception):
    """A patch that cannot be applied (answered with 422 / 400)."""


# --------------------------------------------------------------------------- merge patch

def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------- JSON patch

def _unescape(token: str) -> str:
    return token.replace('~1', '/').replace('~0', '~')


def _split(path: str) -> list[str]:
    if path == '':
        return []
    if not path.startswith('/'):
        raise PatchError(f'invalid JSON pointer: {path!r}')
    return [_unescape(t) for t in path[1:].split('/')]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for t in tokens:
        if isinstance(doc, dict):
            if t not in doc:
                raise PatchError(f'doc is missing path: "/{"/".join(tokens)}"')
            doc = doc[t]
        elif isinstance(doc, list):
            try:
                doc = doc[int(t)]
            except (ValueError, IndexError):
                raise PatchError(f'doc is missing path: "/{"/".join(tokens)}"')
        else:
            raise PatchError(f'doc is missing path: "/{"/".join(tokens)}"')
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == '-':
            parent.append(value)
        else:
            try:
                idx = int(last)
            except ValueError:
                raise PatchError(f'invalid index: {last}')
            if idx < 0 or idx > len(parent):
                raise PatchError(f'add operation does not apply: index out of bounds: {idx}')
            parent.insert(idx, value)
    else:
        raise PatchError('add operation does not apply: parent is not a container')
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError('cannot remove the whole document')
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f'remove operation does not apply: doc is missing path: "/{"/".join(tokens)}"')
        return parent.pop(last)
    if isinstance(parent, list):
        try:
            return parent.pop(int(last))
        except (ValueError, IndexError):
            raise PatchError(f'remove operation does not apply: doc is missing path: "/{"/".join(tokens)}"')
    raise PatchError('remove operation does not apply')


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise PatchError('json patch must be a list of operations')
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or 'op' not in op:
            raise PatchError(f'invalid operation: {op!r}')
        kind = op['op']
        tokens = _split(op.get('path', ''))
        if kind == 'add':
            doc = _add(doc, tokens, copy.deepcopy(op.get('value')))
        elif kind == 'remove':
            _remove(doc, tokens)
        elif kind == 'replace':
            _walk(doc, tokens)  # must exist
            if not tokens:
                doc = copy.deepcopy(op.get('value'))
            else:
                parent = _walk(doc, tokens[:-1])
                if isinstance(parent, list):
                    parent[int(tokens[-1])] = copy.deepcopy(op.get('value'))
                else:
                    parent[tokens[-1]] = copy.deepcopy(op.get('value'))
        elif kind == 'move':
            value = _remove(doc, _split(op.get('from', '')))
            doc = _add(doc, tokens, value)
        elif kind == 'copy':
            value = copy.deepcopy(_walk(doc, _split(op.get('from', ''))))
            doc = _add(doc, tokens, value)
        elif kind == 'test':
            if _walk(doc, tokens) != op.get('value'):
                raise PatchError(f'testing value {op.get("path")} failed: test failed')
        else:
            raise PatchError(f'Unexpected kind: {kind}')
    return doc


# --------------------------------------------------------------------------- strategic merge patch

# (field name) -> merge key, for lists merged by key; None = merge primitives as a set.
# Keyed by the list field's name; the same names carry the same strategy across core types.
MERGE_KEYS: dict[str, str | None] = {
    'containers': 'name',
    'initContainers': 'name',
    'ephemeralContainers': 'name',
    'env': 'name',
    'volumes': 'name',
    'volumeMounts': 'mountPath',
    'volumeDevices': 'devicePath',
    'ports': 'containerPort',  # pod container ports; service ports use 'port' (see below)
    'conditions': 'type',
    'imagePullSecrets': 'name',
    'hostAliases': 'ip',
    'ownerReferences': 'uid',
    'finalizers': None,
    'topologySpreadConstraints': 'topologyKey',
    'resourceClaims': 'name',
    'schedulingGates': 'name',
    'containerStatuses': None,  # status lists: replaced (no strategy)
    'addresses': 'type',
    'taints': None,
}
_NO_STRATEGY = {'containerStatuses', 'initContainerStatuses', 'ephemeralContainerStatuses', 'taints'}


def _merge_key(field: str, parent_path: tuple[str, ...], items: list) -> str | None | bool:
    """Return the merge key, None for primitive set merge, or False for 'replace'."""
    if field in _NO_STRATEGY or field not in MERGE_KEYS:
        return False
    if field == 'ports':
        if parent_path and parent_path[-1] == 'spec' and (len(parent_path) < 2 or parent_path[-2] != 'containers'):
            return 'port'  # Service.spec.ports
        return 'containerPort'
    return MERGE_KEYS[field]


def strategic_merge(original: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(original, dict):
        original = {}
    directive = patch.get('$patch')
    if directive == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    if directive == 'delete':
        return None
    result = copy.deepcopy(original)
    orders: dict[str, list] = {}
    for key, value in patch.items():
        if key == '$patch' or key == '$retainKeys':
            continue
        if key.startswith('$setElementOrder/'):
            orders[key.split('/', 1)[1]] = value
            continue
        if key.startswith('$deleteFromPrimitiveList/'):
            fld = key.split('/', 1)[1]
            if isinstance(result.get(fld), list):
                result[fld] = [x for x in result[fld] if x not in value]
            continue
        if value is None:
            result.pop(key, None)
            continue
        if isinstance(value, list):
            strategy = _merge_key(key, path, value)
            if strategy is False or not isinstance(result.get(key), list):
                merged = [v for v in value if not (isinstance(v, dict) and v.get('$patch') == 'delete')]
                merged = [{k: x for k, x in v.items() if k != '$patch'} if isinstance(v, dict) else v for v in merged]
                if strategy is None and isinstance(result.get(key), list):
                    merged = result[key] + [v for v in value if v not in result[key]]
                result[key] = copy.deepcopy(merged)
            elif strategy is None:
                result[key] = result[key] + [v for v in value if v not in result[key]]
            else:
                result[key] = _merge_list(result[key], value, strategy, path + (key,))
            continue
        if isinstance(value, dict):
            merged = strategic_merge(result.get(key), value, path + (key,))
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
            continue
        result[key] = copy.deepcopy(value)
    for fld, order in orders.items():
        if isinstance(result.get(fld), list):
            result[fld] = _apply_order(result[fld], order, _merge_key(fld, path, []))
    return result


def _merge_list(original: list, patch: list, key: str, path: tuple[str, ...]) -> list:
    result = copy.deepcopy(original)
    if any(isinstance(p, dict) and p.get('$patch') == 'replace' for p in patch):
        return [copy.deepcopy({k: v for k, v in p.items() if k != '$patch'})
                for p in patch if isinstance(p, dict) and p.get('$patch') != 'replace']
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            result.append(copy.deepcopy(item))
            continue
        idx = next((i for i, o in enumerate(result) if isinstance(o, dict) and o.get(key) == item[key]), None)
        if item.get('$patch') == 'delete':
            if idx is not None:
                result.pop(idx)
            continue
        if idx is None:
            result.append(copy.deepcopy({k: v for k, v in item.items() if k != '$patch'}))
        else:
            result[idx] = strategic_merge(result[idx], item, path)
    return result


def _apply_order(items: list, order: list, key: Any) -> list:
    if not key:
        ranked = [x for x in order if x in items]
        return ranked + [x for x in items if x not in ranked]

    def ident(x: Any) -> Any:
        return x.get(key) if isinstance(x, dict) else x
    wanted = [ident(x) for x in order]
    ordered = sorted((x for x in items if ident(x) in wanted), key=lambda x: wanted.index(ident(x)))
    return ordered + [x for x in items if ident(x) not in wanted]
