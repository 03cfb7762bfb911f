"""A one-process Kubernetes API server stand-in for tests and the local demo.

Built on KMock 0.8's :class:`kmock.KubernetesEmulator`: it keeps KMock's
request parsing and Kubernetes error rendering, and replaces KMock's object
handling (plain dict merging) with kube-apiserver semantics: resourceVersions
and conflicts, status subresources, graceful pod deletion, finalizers, garbage
collection, CRD discovery, structural-schema validation with CEL, server-side
Tables, selectors and watches. See ``localcluster/README.md`` ("API server")
for what is faithful and what is not.

Run it::

    python -m localcluster.apiserver --state-dir DIR [--host 127.0.0.1] [--port 0]

It writes ``DIR/kubeconfig`` and ``DIR/apiserver.json`` ({"url", "pid"}) once it
serves, logs every request to ``DIR/api-requests.jsonl`` and runs until
SIGTERM/SIGINT. In-process: ``async with APIServer(state_dir=...) as api:``
(``api.url``), or ``start_in_thread(state_dir)``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import pathlib
import random
import signal
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import yaml

import kmock

from localcluster import apiserver_openapi as openapi
from localcluster import apiserver_patch as patching
from localcluster import apiserver_rbac as rbac
from localcluster import apiserver_select as selecting
from localcluster import apiserver_tables as tables
from localcluster import crdschema
from localcluster.apiserver_errors import ApiError, bad_request, conflict, invalid, not_found
from localcluster.apiserver_kinds import KindsMixin
from localcluster.apiserver_lifecycle import LifecycleMixin
from localcluster.apiserver_store import ResourceType, Store, now_rfc3339

log = logging.getLogger('localcluster.apiserver')

GIT_VERSION = {'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-localcluster', 'gitCommit': 'localcluster',
               'gitTreeState': 'clean', 'buildDate': '2025-01-01T00:00:00Z', 'goVersion': 'go1.23',
               'compiler': 'gc', 'platform': 'linux/amd64'}

GENERATE_CHARS = 'bcdfghjklmnpqrstvwxz2456789'
WATCH_BOOKMARK_SECONDS = 15.0


@dataclass
class Route:
    """What a request addresses, Kubernetes-wise."""
    group: str
    version: str
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    legacy_watch: bool = False


def parse_route(path: str) -> Route | None:
    parts = [urllib.parse.unquote(p) for p in path.strip('/').split('/') if p]
    if len(parts) >= 2 and parts[0] == 'api':
        group, version, rest = '', parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == 'apis':
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    route = Route(group, version)
    if rest and rest[0] == 'watch':
        route.legacy_watch = True
        rest = rest[1:]
    if not rest:
        return route
    if rest[0] == 'namespaces' and len(rest) >= 3:
        route.namespace = rest[1]
        rest = rest[2:]
    elif rest[0] == 'namespaces' and len(rest) == 2:
        route.plural, route.name = 'namespaces', rest[1]
        return route
    route.plural = rest[0]
    if len(rest) >= 2:
        route.name = rest[1]
    if len(rest) >= 3:
        route.subresource = '/'.join(rest[2:])
    if route.plural == 'namespaces' and route.name is None and route.namespace is not None:
        pass
    return route


def _namespaces_route_fix(route: Route) -> Route:
    # /api/v1/namespaces/NAME/status|finalize parses as namespace=NAME, plural=status.
    if route.group == '' and route.namespace is not None and route.plural in ('status', 'finalize') \
            and route.name is None:
        return Route('', route.version, 'namespaces', None, route.namespace, route.plural, route.legacy_watch)
    return route


def verb_of(method: str, route: Route | None, query: dict) -> str:
    if route is None or route.plural is None:
        return method.lower()
    if method == 'GET':
        if route.legacy_watch or query.get('watch') in ('true', '1'):
            return 'watch'
        return 'get' if route.name else 'list'
    if method == 'POST':
        return 'create'
    if method == 'PUT':
        return 'update'
    if method == 'PATCH':
        return 'patch'
    if method == 'DELETE':
        return 'delete' if route.name else 'deletecollection'
    return method.lower()


def _json_response(body: Any, status: int = 200, headers: dict | None = None) -> aiohttp.web.Response:
    return aiohttp.web.Response(text=json.dumps(body), status=status, content_type='application/json',
                                headers=headers)


def _wants_table(accept: str) -> bool:
    return 'as=Table' in accept


def _meta(obj: dict) -> dict:
    return obj.setdefault('metadata', {})


def _strip_meta_for_compare(obj: dict) -> dict:
    o = copy.deepcopy(obj)
    o.get('metadata', {}).pop('resourceVersion', None)
    o.get('metadata', {}).pop('managedFields', None)
    return o


@attrs.define(kw_only=True)
class APIServer(KindsMixin, LifecycleMixin, rbac.AuthMixin, kmock.KubernetesEmulator):
    """The stand-in kube-apiserver. Use ``async with APIServer(...) as api`` or :meth:`serve_forever`."""

    state_dir: pathlib.Path | None = attrs.field(default=None, converter=lambda p: pathlib.Path(p) if p else None)
    host: str = '127.0.0.1'
    port: int = 0
    store: Store = attrs.field(factory=Store)
    _url: str = attrs.field(default='', init=False)
    _runner: aiohttp.web.ServerRunner | None = attrs.field(default=None, init=False)
    _log_file: Any = attrs.field(default=None, init=False)
    _tasks: set = attrs.field(factory=set, init=False)
    _ip_counter: int = attrs.field(default=10, init=False)
    #: Admission plugins switched on (``OwnerReferencesPermissionEnforcement``).
    admission_plugins: frozenset = attrs.field(factory=frozenset, converter=frozenset)
    authorizer: rbac.Authorizer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._init_auth()
        now = now_rfc3339()
        ns_type = self.store.types[('', 'namespaces')]
        for name in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
            self.store.put(ns_type, {'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {
                'name': name, 'uid': str(uuid.uuid4()), 'creationTimestamp': now,
                'labels': {'kubernetes.io/metadata.name': name}},
                'spec': {'finalizers': ['kubernetes']}, 'status': {'phase': 'Active'}}, 'ADDED')
        sa_type = self.store.types[('', 'serviceaccounts')]
        self.store.put(sa_type, {'apiVersion': 'v1', 'kind': 'ServiceAccount', 'metadata': {
            'name': 'default', 'namespace': 'default', 'uid': str(uuid.uuid4()), 'creationTimestamp': now}}, 'ADDED')

    # ================================================================= lifecycle

    @property  # type: ignore[override]
    def url(self) -> str:
        """``http://HOST:PORT`` once started (KMock's own ``url`` needs KMock's test servers)."""
        return self._url

    async def start(self) -> str:
        server = aiohttp.web.Server(self.__call__, handler_cancellation=True, access_log=None)
        self._runner = aiohttp.web.ServerRunner(server, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self._url = f'http://{self.host}:{self.port}'
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.state_dir / 'api-requests.jsonl', 'a', buffering=1)
            write_kubeconfig(self.state_dir / 'kubeconfig', self.url)
            tmp = self.state_dir / 'apiserver.json.tmp'
            tmp.write_text(json.dumps({'url': self.url, 'pid': os.getpid()}))
            tmp.replace(self.state_dir / 'apiserver.json')
        return self.url

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> 'APIServer':
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ================================================================= HTTP entry

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:  # type: ignore[override]
        started = time.time()
        query = dict(raw.query)
        route = parse_route(raw.path)
        if route is not None:
            route = _namespaces_route_fix(route)
        entry = {
            'ts': started, 'method': raw.method, 'path': raw.path, 'query': raw.query_string,
            'user_agent': raw.headers.get('User-Agent', ''), 'status': None,
            'verb': verb_of(raw.method, route, query),
            'api_group': route.group if route else None, 'api_version': route.version if route else None,
            'resource': route.plural if route else None, 'subresource': route.subresource if route else None,
            'namespace': route.namespace if route else None, 'name': route.name if route else None,
        }
        if route is not None and route.plural == 'namespaces' and route.name and route.namespace is None:
            entry['namespace'] = None
        entry['user'] = None
        try:
            try:
                user = self.authorizer.authenticate(raw.headers.get('Authorization'))
                rbac.CURRENT_USER.set(user)
                entry['user'] = user.name
                body = await raw.read()
                response = await self._dispatch(raw, route, query, body, entry)
            except ApiError as e:
                response = _json_response(e.status(), e.code)
            except ConnectionResetError:  # the client went away (a watcher killed mid-stream): nothing to answer
                response = aiohttp.web.Response(status=499)
                entry['status'] = 499
            except Exception as e:  # never crash the server: answer 500 with a Status
                log.exception('internal error serving %s %s', raw.method, raw.path)
                response = _json_response(ApiError(500, 'InternalError', f'Internal error occurred: {e!r}',
                                                   {'causes': [{'message': traceback.format_exc()}]}).status(), 500)
            return response
        finally:
            if entry['status'] is None:
                entry['status'] = response.status if 'response' in locals() else 500
            self._log(entry)

    def _log(self, entry: dict) -> None:
        if self._log_file is not None and not entry.get('_logged'):
            entry['_logged'] = True
            self._log_file.write(json.dumps({k: v for k, v in entry.items() if not k.startswith('_')}) + '\n')

    async def _dispatch(self, raw: aiohttp.web.BaseRequest, route: Route | None, query: dict, body: bytes,
                        entry: dict) -> aiohttp.web.StreamResponse:
        path = raw.path.rstrip('/') or '/'
        self._authorize(raw, route, entry)
        if raw.method == 'GET' and route is None:
            if path == '/version':
                return _json_response(GIT_VERSION)
            if path in ('/healthz', '/readyz', '/livez'):
                return aiohttp.web.Response(text='ok')
            if path == '/api':
                return _json_response({'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': [
                    {'clientCIDR': '0.0.0.0/0', 'serverAddress': f'{self.host}:{self.port}'}]})
            if path == '/apis':
                return _json_response(self._api_group_list())
            if path.startswith('/apis/') and path.count('/') == 2:
                group = path.split('/')[2]
                groups = self.store.groups()
                if group in groups:
                    return _json_response(self._api_group(group, groups[group]))
            if path == '/':
                return _json_response({'paths': self._root_paths()})
            if path == '/openapi/v3':
                return _json_response(openapi.index(self.store))
            if path.startswith('/openapi/v3/'):
                rest = path[len('/openapi/v3/'):].split('/')
                doc = None
                if len(rest) == 2 and rest[0] == 'api':
                    doc = openapi.gv_document(self.store, '', rest[1])
                elif len(rest) == 3 and rest[0] == 'apis':
                    doc = openapi.gv_document(self.store, rest[1], rest[2])
                if doc is not None:
                    return _json_response(doc)
        if route is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if route.plural is None:
            if raw.method == 'GET':
                return _json_response(self._resource_list(route.group, route.version))
            raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')

        rt = self.store.lookup(route.group, route.version, route.plural)
        if rt is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if rt.namespaced is False and route.namespace is not None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if route.subresource and route.subresource not in rt.subresources:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')

        verb = entry['verb']
        accept = raw.headers.get('Accept', '')
        if verb == 'watch':
            return await self._serve_watch(raw, rt, route, query, accept, entry)
        if verb == 'list':
            return _json_response(self._serve_list(rt, route, query, accept))
        if verb == 'get':
            obj = self.store.get(rt, route.namespace, route.name)
            if obj is None:
                raise not_found(rt, route.name or '')
            if _wants_table(accept) and not route.subresource:
                return _json_response(tables.table([self._out(rt, obj, route.version)], crd_version=rt.crd_version(
                    route.version), plural=rt.plural, resource_version=str(self.store.rv),
                    include_object=query.get('includeObject', 'Metadata')))
            return _json_response(self._out(rt, obj, route.version))

        data = self._parse_body(raw, body, allow_empty=verb in ('delete', 'deletecollection'))
        dry_run = query.get('dryRun') == 'All'
        if verb == 'create' and route.subresource == 'token' and rt.plural == 'serviceaccounts':
            return _json_response(self._token_request(route, data), 201)
        if verb == 'create':
            if route.subresource == 'binding' or (rt.plural == 'bindings'):
                return _json_response(self._bind(route, data), 201)
            if route.subresource == 'eviction':
                return _json_response(self._evict(rt, route, data), 201)
            if route.name is not None:
                raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')
            obj, warnings = self._create(rt, route, data, query, dry_run)
            entry['created'] = obj['metadata']['name']  # the request log names what a POST made
            return _json_response(self._out(rt, obj, route.version), 201, headers=warnings)
        if verb == 'update':
            obj, warnings = self._update(rt, route, data, query, dry_run)
            return _json_response(self._out(rt, obj, route.version), 200, headers=warnings)
        if verb == 'patch':
            ctype = raw.headers.get('Content-Type', '').split(';')[0].strip()
            obj, warnings, created = self._patch(rt, route, ctype, body, query, dry_run, raw)
            return _json_response(self._out(rt, obj, route.version), 201 if created else 200, headers=warnings)
        if verb == 'delete':
            obj = self._delete_request(rt, route, data or {}, query, dry_run)
            # The request log says whether this DELETE removed the object (not only marked it deleting).
            entry['removed'] = not dry_run and self.store.get(rt, route.namespace, route.name) is None
            return _json_response(self._out(rt, obj, route.version) if obj.get('kind') != 'Status' else obj)
        if verb == 'deletecollection':
            return _json_response(self._delete_collection(rt, route, data or {}, query, dry_run))
        raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')

    # ================================================================= discovery

    def _api_group(self, group: str, versions: list[str]) -> dict:
        return {'kind': 'APIGroup', 'apiVersion': 'v1', 'name': group,
                'versions': [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions],
                'preferredVersion': {'groupVersion': f'{group}/{versions[0]}', 'version': versions[0]}}

    def _api_group_list(self) -> dict:
        groups = self.store.groups()
        return {'kind': 'APIGroupList', 'apiVersion': 'v1',
                'groups': [self._api_group(g, vs) for g, vs in sorted(groups.items())]}

    def _root_paths(self) -> list[str]:
        paths = {'/api', '/api/v1', '/apis', '/version', '/healthz', '/readyz', '/livez'}
        for g, vs in self.store.groups().items():
            paths.add(f'/apis/{g}')
            paths.update(f'/apis/{g}/{v}' for v in vs)
        return sorted(paths)

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        for rt in self.store.types.values():
            if rt.group != group or version not in rt.versions:
                continue
            base = {'name': rt.plural, 'singularName': rt.singular, 'namespaced': rt.namespaced, 'kind': rt.kind,
                    'verbs': rt.verbs}
            if rt.short_names:
                base['shortNames'] = rt.short_names
            if rt.categories:
                base['categories'] = rt.categories
            resources.append(base)
            for sub, verbs in rt.subresources.items():
                kind = {'binding': 'Binding', 'eviction': 'Eviction', 'scale': 'Scale'}.get(sub, rt.kind)
                entry = {'name': f'{rt.plural}/{sub}', 'singularName': '', 'namespaced': rt.namespaced,
                         'kind': kind, 'verbs': verbs}
                if sub == 'eviction':
                    entry.update(group='policy', version='v1')
                resources.append(entry)
        if not resources and group != '':
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if group == '' and version != 'v1':
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': resources}

    # ================================================================= reading

    def _out(self, rt: ResourceType, obj: dict, version: str | None) -> dict:
        """The object as served at the requested version (no conversion: only apiVersion differs)."""
        out = copy.deepcopy(obj)
        out['apiVersion'] = rt.api_version(version)
        out['kind'] = rt.kind
        return out

    def _filter(self, rt: ResourceType, route: Route, query: dict):
        try:
            match = selecting.make_filter(query.get('labelSelector'), query.get('fieldSelector'), rt.group, rt.plural)
        except selecting.SelectorError as e:
            raise bad_request(str(e))
        name = route.name

        def check(obj: dict) -> bool:
            meta = obj.get('metadata', {})
            if route.namespace is not None and meta.get('namespace', '') != route.namespace:
                return False
            if name is not None and meta.get('name') != name:
                return False
            return match(obj)
        return check

    def _serve_list(self, rt: ResourceType, route: Route, query: dict, accept: str) -> dict:
        check = self._filter(rt, route, query)
        items = [o for o in self.store.items(rt, route.namespace) if check(o)]
        metadata: dict[str, Any] = {'resourceVersion': str(self.store.rv)}
        limit = int(query.get('limit') or 0)
        offset = 0
        if query.get('continue'):
            try:
                offset = int(json.loads(urllib.parse.unquote(query['continue']))['o'])
            except Exception:
                raise bad_request('continue key is not valid')
        if limit > 0:
            rest = items[offset + limit:]
            items = items[offset:offset + limit]
            if rest:
                metadata['continue'] = json.dumps({'o': offset + limit}, separators=(',', ':'))
                metadata['remainingItemCount'] = len(rest)
        elif offset:
            items = items[offset:]
        items = [self._out(rt, o, route.version) for o in items]
        if _wants_table(accept):
            t = tables.table(items, crd_version=rt.crd_version(route.version), plural=rt.plural,
                             resource_version=metadata['resourceVersion'],
                             include_object=query.get('includeObject', 'Metadata'))
            t['metadata'].update({k: v for k, v in metadata.items() if k != 'resourceVersion'})
            return t
        for item in items:  # list items carry no apiVersion/kind in the real server, but clients tolerate both
            pass
        return {'kind': f'{rt.kind}List', 'apiVersion': rt.api_version(route.version), 'metadata': metadata,
                'items': items}

    async def _serve_watch(self, raw: aiohttp.web.BaseRequest, rt: ResourceType, route: Route, query: dict,
                           accept: str, entry: dict) -> aiohttp.web.StreamResponse:
        check = self._filter(rt, route, query)
        as_table = _wants_table(accept)
        include = query.get('includeObject', 'Metadata')
        bookmarks = query.get('allowWatchBookmarks') in ('true', '1')
        timeout = float(query['timeoutSeconds']) if query.get('timeoutSeconds') else None
        since = query.get('resourceVersion') or ''
        if since and not since.isdigit():
            raise bad_request(f'invalid resource version: {since}')

        # Subscribe before taking the snapshot: no await in between, so no event is lost.
        watcher = self.store.subscribe(rt)
        try:
            if since in ('', '0'):
                initial = [('ADDED', o) for o in self.store.items(rt, route.namespace) if check(o)]
                backlog = []
            else:
                initial = []
                backlog = self.store.events_since(rt, int(since))
                if backlog is None:
                    initial = [('ERROR', {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                                          'message': f'too old resource version: {since} ({self.store.oldest_rv()})',
                                          'reason': 'Expired', 'code': 410})]
                    backlog = []
            response = aiohttp.web.StreamResponse(status=200)
            response.content_type = 'application/json'
            response.headers['Transfer-Encoding'] = 'chunked'
            entry['status'] = 200
            self._log(entry)
            await response.prepare(raw)
            first_table = [True]

            async def send(etype: str, obj: dict) -> None:
                if etype in ('ERROR', 'BOOKMARK'):
                    payload = obj
                elif as_table:
                    payload = tables.table([self._out(rt, obj, route.version)], crd_version=rt.crd_version(
                        route.version), plural=rt.plural, resource_version=obj['metadata'].get('resourceVersion', ''),
                        include_object=include, with_columns=first_table[0])
                    first_table[0] = False
                else:
                    payload = self._out(rt, obj, route.version)
                await response.write(json.dumps({'type': etype, 'object': payload}).encode() + b'\n')

            for etype, obj in initial:
                await send(etype, obj)
            if initial and initial[0][0] == 'ERROR':
                await response.write_eof()
                return response
            last_rv = int(since) if since.isdigit() else self.store.rv
            for event in backlog:
                await self._send_event(event, check, send)
                last_rv = event.rv
            deadline = time.monotonic() + timeout if timeout else None
            while True:
                wait = WATCH_BOOKMARK_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        break
                    if bookmarks and (deadline is None or deadline - time.monotonic() > 0):
                        await send('BOOKMARK', {'kind': rt.kind, 'apiVersion': rt.api_version(route.version),
                                                'metadata': {'resourceVersion': str(self.store.rv)}})
                    continue
                if event.rv <= last_rv:
                    continue
                last_rv = event.rv
                await self._send_event(event, check, send)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            self.store.unsubscribe(watcher)

    async def _send_event(self, event: Any, check: Any, send: Any) -> None:
        if event.type == 'ADDED':
            if check(event.obj):
                await send('ADDED', event.obj)
        elif event.type == 'DELETED':
            if check(event.obj):
                await send('DELETED', event.obj)
        else:
            new_ok = check(event.obj)
            old_ok = event.old is not None and check(event.old)
            if new_ok and old_ok:
                await send('MODIFIED', event.obj)
            elif new_ok:
                await send('ADDED', event.obj)
            elif old_ok:
                await send('DELETED', event.obj)

    # ================================================================= writing: common

    def _parse_body(self, raw: aiohttp.web.BaseRequest, body: bytes, allow_empty: bool = False) -> Any:
        if not body.strip():
            if allow_empty:
                return None
            raise bad_request('the body of the request is empty')
        ctype = raw.headers.get('Content-Type', '')
        try:
            if 'yaml' in ctype:
                return yaml.safe_load(body)
            return json.loads(body)
        except Exception as e:
            if raw.method == 'PATCH':
                return None  # the patch handler parses by content type itself
            raise bad_request(f'couldn\'t get version/kind; json parse error: {e}')

    def _check_namespace(self, rt: ResourceType, route: Route, obj: dict, *, creating: bool) -> str:
        meta = _meta(obj)
        if not rt.namespaced:
            meta.pop('namespace', None)
            return ''
        ns = route.namespace
        if ns is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if meta.get('namespace') and meta['namespace'] != ns:
            raise bad_request('the namespace of the provided object does not match the namespace sent on the request')
        meta['namespace'] = ns
        if creating:
            ns_obj = self.store.get(self.store.types[('', 'namespaces')], None, ns)
            if ns_obj is None:
                raise ApiError(404, 'NotFound', f'namespaces "{ns}" not found',
                               {'name': ns, 'kind': 'namespaces'})
            if ns_obj['metadata'].get('deletionTimestamp') and rt.plural != 'events':
                raise ApiError(403, 'Forbidden', f'{rt.plural} "{meta.get("name") or meta.get("generateName", "")}" is '
                               f'forbidden: unable to create new content in namespace {ns} because it is being '
                               f'terminated', {'name': meta.get('name', ''), 'kind': rt.plural,
                                               'causes': [{'reason': 'NamespaceTerminating',
                                                           'message': f'namespace {ns} is being terminated',
                                                           'field': 'metadata.namespace'}]})
        return ns

    def _check_kind(self, rt: ResourceType, obj: dict, route: Route) -> None:
        if not isinstance(obj, dict):
            raise bad_request(f'the object provided is unrecognized (must be of type {rt.kind})')
        kind = obj.get('kind')
        if kind and kind != rt.kind:
            raise bad_request(f'the API version in the data ({obj.get("apiVersion")}) does not match the expected '
                              f'API version ({rt.api_version(route.version)})' if obj.get('apiVersion') and obj.get(
                                  'apiVersion') != rt.api_version(route.version) else
                              f'{kind} in version "{route.version}" cannot be handled as a {rt.kind}: '
                              f'the object kind does not match')

    def _validate_cr(self, rt: ResourceType, obj: dict, old: dict | None, route: Route, query: dict,
                     only_status: bool | None) -> tuple[dict, dict]:
        """Schema-process a custom resource. Returns (object, warning headers)."""
        warnings: dict[str, str] = {}
        schema = rt.schema(route.version)
        if schema is None:
            return obj, warnings
        res = crdschema.process(schema, obj, old)
        errors = res.errors
        if only_status is True:
            errors = [e for e in errors if e.field == 'status' or e.field.startswith(('status.', 'status['))]
        elif only_status is False and rt.has_status:
            errors = [e for e in errors if not (e.field == 'status' or e.field.startswith(('status.', 'status[')))]
        fv = query.get('fieldValidation', '')
        unknown = res.unknown_fields
        if only_status is True:
            unknown = [u for u in unknown if u.startswith('status')]
        if unknown and fv == 'Strict':
            listed = ', '.join(f'unknown field "{u}"' for u in unknown)
            raise bad_request(f'{rt.kind} in version "{route.version}" cannot be handled as a {rt.kind}: '
                              f'strict decoding error: {listed}')
        if unknown and fv == 'Warn':
            warnings['Warning'] = ', '.join(f'299 - "unknown field \\"{u}\\""' for u in unknown)
        if errors:
            raise invalid(rt, obj.get('metadata', {}).get('name', ''), errors)
        return res.obj, warnings

    # ================================================================= create

    def _create(self, rt: ResourceType, route: Route, data: Any, query: dict, dry_run: bool,
                *, skip_name_retry: bool = False) -> tuple[dict, dict]:
        self._check_kind(rt, data, route)
        obj = copy.deepcopy(data)
        obj['apiVersion'] = rt.api_version(route.version)
        obj['kind'] = rt.kind
        meta = _meta(obj)
        if not isinstance(meta, dict):
            raise bad_request('metadata must be an object')
        ns = self._check_namespace(rt, route, obj, creating=True)
        for f in ('uid', 'resourceVersion', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                  'selfLink', 'generation'):
            meta.pop(f, None)
        if not meta.get('name'):
            if meta.get('generateName'):
                for _ in range(20):
                    candidate = meta['generateName'] + ''.join(random.choice(GENERATE_CHARS) for _ in range(5))
                    if self.store.get(rt, ns, candidate) is None:
                        meta['name'] = candidate
                        break
            else:
                raise invalid(rt, '', [crdschema.FieldError('Required', 'metadata.name',
                                                            detail='name or generateName is required')])
        name = meta['name']
        errors = self._validate_meta(rt, obj)
        if errors:
            raise invalid(rt, name, errors)
        if self.store.get(rt, ns, name) is not None:
            raise ApiError(409, 'AlreadyExists', f'{rt.group_resource} "{name}" already exists',
                           {'name': name, 'group': rt.group, 'kind': rt.plural})
        warnings: dict = {}
        if rt.crd is not None:
            if rt.has_status:
                obj.pop('status', None)
            obj, warnings = self._validate_cr(rt, obj, None, route, query, None)
            meta = obj['metadata']
        obj, warnings = self._decode_builtin(rt, route, obj, query, warnings)
        meta = obj['metadata']
        self._check_owner_references(rt, obj, None)
        self._prepare_create(rt, obj)
        self._validate_builtin(rt, obj)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        if rt.crd is not None or rt.plural == 'customresourcedefinitions':
            meta['generation'] = 1
        if dry_run:
            return obj, warnings
        self.store.put(rt, obj, 'ADDED')
        if rt.plural == 'customresourcedefinitions' and rt.group == 'apiextensions.k8s.io':
            self._register_crd(obj)
        return obj, warnings

    # ================================================================= update / patch

    def _update(self, rt: ResourceType, route: Route, data: Any, query: dict, dry_run: bool) -> tuple[dict, dict]:
        self._check_kind(rt, data, route)
        old = self.store.get(rt, route.namespace, route.name)
        if old is None:
            raise not_found(rt, route.name or '')
        new = copy.deepcopy(data)
        meta = _meta(new)
        if meta.get('name') and meta['name'] != route.name:
            raise bad_request(f'the name of the object ({meta["name"]}) does not match the name on the URL '
                              f'({route.name})')
        rv = meta.get('resourceVersion')
        if rv and rv != old['metadata']['resourceVersion']:
            raise conflict(rt, route.name or '')
        if not rv and rt.crd is not None:
            raise invalid(rt, route.name or '', [crdschema.FieldError(
                'Invalid', 'metadata.resourceVersion', '0x0', 'must be specified for an update')])
        return self._commit_update(rt, route, old, new, query, dry_run)

    def _patch(self, rt: ResourceType, route: Route, ctype: str, body: bytes, query: dict, dry_run: bool,
               raw: aiohttp.web.BaseRequest) -> tuple[dict, dict, bool]:
        old = self.store.get(rt, route.namespace, route.name)
        try:
            if ctype == 'application/apply-patch+yaml':
                patch = yaml.safe_load(body)
            else:
                patch = json.loads(body) if body.strip() else None
        except Exception as e:
            raise bad_request(f'error decoding patch: {e}')
        if ctype == 'application/apply-patch+yaml':
            # Server-side apply, approximated: create if absent, else merge the applied configuration.
            if not isinstance(patch, dict):
                raise bad_request('apply patch must be an object')
            if not query.get('fieldManager'):
                raise bad_request('PATCH, fieldManager parameter is required for apply patch')
            if old is None:
                patch.setdefault('metadata', {})['name'] = route.name
                obj, warnings = self._create(rt, route, patch, query, dry_run)
                return obj, warnings, True
            new = patching.merge_patch(old, patch)
            obj, warnings = self._commit_update(rt, route, old, new, query, dry_run)
            return obj, warnings, False
        if old is None:
            raise not_found(rt, route.name or '')
        try:
            if ctype == 'application/merge-patch+json':
                if not isinstance(patch, dict):
                    raise patching.PatchError('merge patch must be an object')
                new = patching.merge_patch(old, patch)
            elif ctype == 'application/json-patch+json':
                new = patching.json_patch(old, patch)
            elif ctype == 'application/strategic-merge-patch+json':
                if rt.crd is not None:
                    raise ApiError(415, 'UnsupportedMediaType',
                                   'the body of the request was in an unknown format - accepted media types include: '
                                   'application/json-patch+json, application/merge-patch+json, '
                                   'application/apply-patch+yaml')
                if not isinstance(patch, dict):
                    raise patching.PatchError('strategic merge patch must be an object')
                new = patching.strategic_merge(old, patch)
            else:
                raise ApiError(415, 'UnsupportedMediaType',
                               'the body of the request was in an unknown format - accepted media types include: '
                               'application/json-patch+json, application/merge-patch+json, '
                               'application/apply-patch+yaml' + (
                                   ', application/strategic-merge-patch+json' if rt.crd is None else ''))
        except patching.PatchError as e:
            raise ApiError(422, 'Invalid', str(e))
        if not isinstance(new, dict):
            raise bad_request('the patch produced a non-object')
        patch_rv = (patch.get('metadata') or {}).get('resourceVersion') if isinstance(patch, dict) else None
        if patch_rv and patch_rv != old['metadata']['resourceVersion']:
            raise conflict(rt, route.name or '')
        obj, warnings = self._commit_update(rt, route, old, new, query, dry_run)
        return obj, warnings, False

    def _commit_update(self, rt: ResourceType, route: Route, old: dict, new: dict, query: dict,
                       dry_run: bool) -> tuple[dict, dict]:
        name = old['metadata']['name']
        new['apiVersion'] = rt.api_version(route.version)
        new['kind'] = rt.kind
        meta = _meta(new)
        if not isinstance(meta, dict):
            raise bad_request('metadata must be an object')
        old_meta = old['metadata']
        if meta.get('namespace') not in (None, old_meta.get('namespace')) and rt.namespaced:
            raise bad_request('the namespace of the provided object does not match the namespace sent on the request')
        for f in ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                  'generation', 'resourceVersion', 'selfLink'):
            if f in old_meta:
                meta[f] = old_meta[f]
            else:
                meta.pop(f, None)
        sub = route.subresource
        if sub == 'status':
            if rt.crd is not None:
                status = new.get('status')
                new = copy.deepcopy(old)
                new['apiVersion'] = rt.api_version(route.version)
                if status is None:
                    new.pop('status', None)
                else:
                    new['status'] = status
            else:
                keep = copy.deepcopy(old)
                for f in ('labels', 'annotations'):
                    if f in meta:
                        keep['metadata'][f] = meta[f]
                    else:
                        keep['metadata'].pop(f, None)
                if 'status' in new:
                    keep['status'] = new['status']
                else:
                    keep.pop('status', None)
                new = keep
        elif rt.has_status:
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
            else:
                new.pop('status', None)
        if old_meta.get('deletionTimestamp'):
            added = set(new['metadata'].get('finalizers') or []) - set(old_meta.get('finalizers') or [])
            if added:
                raise invalid(rt, name, [crdschema.FieldError(
                    'Forbidden', 'metadata.finalizers', detail='no new finalizers can be added if the object is '
                                                               'being deleted, found new finalizers ' +
                                                               json.dumps(sorted(added)))])
        errors = self._validate_meta(rt, new)
        if errors:
            raise invalid(rt, name, errors)
        warnings: dict = {}
        if sub is None:
            new, warnings = self._decode_builtin(rt, route, new, query, warnings)
            self._check_owner_references(rt, new, old)
        if (rt.group, rt.plural) == ('', 'pods') and sub is None:
            self._check_pod_update(rt, old, new)
        if rt.crd is not None:
            new, warnings = self._validate_cr(rt, new, old, route, query,
                                              True if sub == 'status' else False if rt.has_status else None)
        if (rt.group, rt.plural) == ('apiextensions.k8s.io', 'customresourcedefinitions') and sub is None:
            self._validate_crd(new)
            new['status'] = old.get('status', {})
        if rt.crd is not None or (rt.group, rt.plural) == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            ignored = {'metadata', 'status'} if (rt.has_status or rt.crd is None) else {'metadata'}
            if {k: v for k, v in new.items() if k not in ignored and k not in ('apiVersion', 'kind')} != \
                    {k: v for k, v in old.items() if k not in ignored and k not in ('apiVersion', 'kind')}:
                new['metadata']['generation'] = int(old_meta.get('generation') or 1) + 1
        if _strip_meta_for_compare(new) == _strip_meta_for_compare(dict(old, apiVersion=new['apiVersion'])):
            return old, warnings  # no-op: no new resourceVersion, no event
        if dry_run:
            return new, warnings
        # As ShouldDeleteDuringUpdate: removed once finalizers are empty and the grace period is over (0);
        # a gracefully deleted pod stays until its kubelet (the node agent) deletes it with grace 0.
        if new['metadata'].get('deletionTimestamp') and not new['metadata'].get('finalizers') and \
                not new['metadata'].get('deletionGracePeriodSeconds'):
            self.store.put(rt, new, 'MODIFIED', old)
            self._remove(rt, new)
            return new, warnings
        self.store.put(rt, new, 'MODIFIED', old)
        if (rt.group, rt.plural) == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._register_crd(new)
        return new, warnings

    def _delete_collection(self, rt: ResourceType, route: Route, data: dict, query: dict, dry_run: bool) -> dict:
        check = self._filter(rt, route, query)
        grace, policy, _ = self._delete_options(data if isinstance(data, dict) else {}, query)
        items = []
        for obj in self.store.items(rt, route.namespace):
            if check(obj):
                items.append(self._out(rt, obj if dry_run else self._delete(rt, obj, grace, policy), route.version))
        return {'kind': f'{rt.kind}List', 'apiVersion': rt.api_version(route.version),
                'metadata': {'resourceVersion': str(self.store.rv)}, 'items': items}


# ===================================================================== helpers & CLI

def write_kubeconfig(path: pathlib.Path, url: str, namespace: str = 'default', token: str | None = None) -> None:
    """A kubeconfig for ``url``: the loopback admin, or the identity of ``token`` (a TokenRequest's)."""
    config = {
        'apiVersion': 'v1', 'kind': 'Config',
        'clusters': [{'name': 'localcluster', 'cluster': {'server': url}}],
        'users': [{'name': 'localcluster', 'user': {'token': token} if token else {}}],
        'contexts': [{'name': 'localcluster', 'context': {'cluster': 'localcluster', 'user': 'localcluster',
                                                          'namespace': namespace}}],
        'current-context': 'localcluster',
        'preferences': {},
    }
    tmp = path.with_suffix('.tmp')
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


async def serve(state_dir: pathlib.Path, host: str = '127.0.0.1', port: int = 0,
                stop: asyncio.Event | None = None, admission_plugins: frozenset = frozenset()) -> None:
    """Serve until ``stop`` is set, or until SIGTERM/SIGINT when ``stop`` is None."""
    api = APIServer(state_dir=state_dir, host=host, port=port, admission_plugins=admission_plugins)
    await api.start()
    log.info('API server serving at %s', api.url)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await api.stop()


class ThreadedServer:
    """An in-process server on its own thread and loop (for tests and scripts)."""

    def __init__(self, state_dir: str | pathlib.Path | None = None, host: str = '127.0.0.1', port: int = 0,
                 admission_plugins: frozenset = frozenset()) -> None:
        self.loop = asyncio.new_event_loop()
        self.api = APIServer(state_dir=state_dir, host=host, port=port, admission_plugins=admission_plugins)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name='localcluster-apiserver')

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await self.api.start()
            self._ready.set()
            await self._stop.wait()
            await self.api.stop()
        self.loop.run_until_complete(main())

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(10)
        return self.api.url

    @property
    def url(self) -> str:
        return self.api.url

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def start_in_thread(state_dir: str | pathlib.Path | None = None, host: str = '127.0.0.1',
                    port: int = 0, admission_plugins: frozenset = frozenset()) -> ThreadedServer:
    server = ThreadedServer(state_dir, host, port, admission_plugins)
    server.start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m localcluster.apiserver',
                                     description='Kubernetes API server stand-in (KMock-based).')
    parser.add_argument('--state-dir', required=True, type=pathlib.Path)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', default=0, type=int)
    parser.add_argument('--log-level', default='WARNING')
    parser.add_argument('--enable-admission-plugins', default=os.environ.get('LOCALCLUSTER_ADMISSION_PLUGINS', ''),
                        help='comma-separated: OwnerReferencesPermissionEnforcement')
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format='%(asctime)s %(name)s %(levelname)s %(message)s')
    plugins = frozenset(p.strip() for p in args.enable_admission_plugins.split(',') if p.strip())
    asyncio.run(serve(args.state_dir, args.host, args.port, admission_plugins=plugins))


if __name__ == '__main__':
    main()
