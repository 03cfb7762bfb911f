"""Just enough OpenAPI v3 for kubectl.

``kubectl apply/create`` (default ``--validate=strict``) asks ``/openapi/v3``
whether the PATCH operation of the object's GVK accepts the ``fieldValidation``
query parameter; if it does, kubectl leaves validation to the server (which
rejects unknown fields of custom resources with 400, as the real one does).
Without this document kubectl refuses with "failed to download openapi".

Each group-version document lists, per resource, the collection and item
paths with the verbs' operations carrying ``x-kubernetes-group-version-kind``
and ``x-kubernetes-action``; PATCH declares the media types the server takes
(strategic merge patch is not declared, so kubectl computes it from its own
scheme for built-in kinds and falls back to JSON merge patch for custom ones,
like against a real server). Custom resources' schemas are published under
``components.schemas`` so ``kubectl explain`` works.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localcluster.apiserver_store import ResourceType, Store

_QUERY = {'in': 'query', 'schema': {'type': 'string', 'uniqueItems': True}}
_PARAMS = [dict(_QUERY, name=n) for n in ('dryRun', 'fieldManager', 'fieldValidation', 'pretty')]


def gv_path(group: str, version: str) -> str:
    return f'apis/{group}/{version}' if group else f'api/{version}'


def _schema_name(rt: 'ResourceType', version: str) -> str:
    group = rt.group or 'core'
    rev = '.'.join(reversed(group.split('.'))) if rt.group else 'io.k8s.api.core'
    return f'{rev}.{version}.{rt.kind}'


def gv_document(store: 'Store', group: str, version: str) -> dict | None:
    paths: dict[str, dict] = {}
    schemas: dict[str, dict] = {}
    found = False
    for rt in store.types.values():
        if rt.group != group or version not in rt.versions:
            continue
        found = True
        gvk = {'group': group, 'version': version, 'kind': rt.kind}
        ref = {'$ref': f'#/components/schemas/{_schema_name(rt, version)}'}
        body_schema = {'schema': ref}
        prefix = '/' + gv_path(group, version) + ('/namespaces/{namespace}' if rt.namespaced else '')

        def op(action: str, op_id: str, with_body: bool = False, patch: bool = False) -> dict:
            o: dict = {'operationId': op_id, 'parameters': list(_PARAMS),
                       'responses': {'200': {'description': 'OK', 'content': {'application/json': body_schema}}},
                       'x-kubernetes-action': action, 'x-kubernetes-group-version-kind': gvk}
            if patch:
                o['requestBody'] = {'content': {t: {'schema': {'type': 'object'}} for t in (
                    'application/json-patch+json', 'application/merge-patch+json', 'application/apply-patch+yaml')},
                    'required': True}
            elif with_body:
                o['requestBody'] = {'content': {'*/*': body_schema}, 'required': True}
            return o
        kind = rt.kind
        paths[f'{prefix}/{rt.plural}'] = {
            'get': op('list', f'list{kind}'), 'post': op('post', f'create{kind}', with_body=True)}
        paths[f'{prefix}/{rt.plural}/{{name}}'] = {
            'get': op('get', f'read{kind}'), 'put': op('put', f'replace{kind}', with_body=True),
            'patch': op('patch', f'patch{kind}', patch=True), 'delete': op('delete', f'delete{kind}')}
        schema: dict = {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}
        if rt.crd is not None and rt.schema(version):
            schema = json.loads(json.dumps(rt.schema(version)))
        schema['x-kubernetes-group-version-kind'] = [gvk]
        schemas[_schema_name(rt, version)] = schema
    if not found:
        return None
    return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes', 'version': 'v1.32.0'}, 'paths': paths,
            'components': {'schemas': schemas}}


def index(store: 'Store') -> dict:
    out: dict[str, dict] = {}
    gvs = {('', 'v1')} | {(rt.group, v) for rt in store.types.values() for v in rt.versions}
    for group, version in sorted(gvs):
        doc = gv_document(store, group, version)
        if doc is None:
            continue
        digest = hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()[:128]
        out[gv_path(group, version)] = {'serverRelativeURL': f'/openapi/v3/{gv_path(group, version)}?hash={digest}'}
    return {'paths': out}
