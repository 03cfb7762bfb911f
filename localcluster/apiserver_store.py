"""The API server's state: the resource registry (built-ins + CRDs), objects, and watch fan-out.

Everything here is synchronous: the server runs on one asyncio loop and every
mutation is done without awaiting in between, so each request's change is
atomic, and the global ``resourceVersion`` counter orders all events.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import datetime
from dataclasses import dataclass, field
from typing import Iterator

ALL_VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


def now_rfc3339(delta_seconds: float = 0) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delta_seconds)
    return t.strftime('%Y-%m-%dT%H:%M:%SZ')


@dataclass
class ResourceType:
    """One served resource (all its served versions share one storage)."""
    group: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    versions: list[str]                    # served versions, preferred first
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=lambda: list(ALL_VERBS))
    subresources: dict[str, list[str]] = field(default_factory=dict)  # name -> verbs
    crd: dict | None = None                # the CRD object for custom resources

    @property
    def group_kind(self) -> str:
        return f'{self.kind}.{self.group}' if self.group else self.kind

    @property
    def group_resource(self) -> str:
        return f'{self.plural}.{self.group}' if self.group else self.plural

    def api_version(self, version: str | None = None) -> str:
        v = version or self.versions[0]
        return f'{self.group}/{v}' if self.group else v

    def crd_version(self, version: str | None = None) -> dict | None:
        if self.crd is None:
            return None
        v = version or self.versions[0]
        for ver in self.crd.get('spec', {}).get('versions') or []:
            if ver.get('name') == v:
                return ver
        return None

    def schema(self, version: str | None = None) -> dict | None:
        ver = self.crd_version(version)
        if ver is None:
            return None
        return (ver.get('schema') or {}).get('openAPIV3Schema')

    @property
    def has_status(self) -> bool:
        return 'status' in self.subresources


_STATUS = {'status': ['get', 'patch', 'update']}


def builtin_types() -> list[ResourceType]:
    return [
        ResourceType('', 'namespaces', 'Namespace', 'namespace', False, ['v1'], ['ns'],
                     verbs=['create', 'delete', 'get', 'list', 'patch', 'update', 'watch'],
                     subresources={**_STATUS, 'finalize': ['update']}),
        ResourceType('', 'pods', 'Pod', 'pod', True, ['v1'], ['po'], ['all'],
                     subresources={**_STATUS, 'binding': ['create'], 'eviction': ['create']}),
        ResourceType('', 'bindings', 'Binding', 'binding', True, ['v1'], verbs=['create']),
        ResourceType('', 'services', 'Service', 'service', True, ['v1'], ['svc'], ['all'], subresources=dict(_STATUS)),
        ResourceType('', 'secrets', 'Secret', 'secret', True, ['v1']),
        ResourceType('', 'configmaps', 'ConfigMap', 'configmap', True, ['v1'], ['cm']),
        ResourceType('', 'serviceaccounts', 'ServiceAccount', 'serviceaccount', True, ['v1'], ['sa']),
        ResourceType('', 'nodes', 'Node', 'node', False, ['v1'], ['no'], subresources=dict(_STATUS)),
        ResourceType('', 'events', 'Event', 'event', True, ['v1'], ['ev']),
        ResourceType('events.k8s.io', 'events', 'Event', 'event', True, ['v1'], ['ev']),
        ResourceType('coordination.k8s.io', 'leases', 'Lease', 'lease', True, ['v1']),
        ResourceType('apiextensions.k8s.io', 'customresourcedefinitions', 'CustomResourceDefinition',
                     'customresourcedefinition', False, ['v1'], ['crd', 'crds'], ['api-extensions'],
                     subresources=dict(_STATUS)),
    ]


def type_from_crd(crd: dict) -> ResourceType:
    spec = crd.get('spec') or {}
    names = spec.get('names') or {}
    served = [v for v in spec.get('versions') or [] if v.get('served', True)]
    # Preferred version: the highest-priority served one; kube-aware sorting is close enough as
    # "storage version first" for the single/two-version CRDs used here.
    served.sort(key=lambda v: (not v.get('storage', False), v.get('name', '')))
    subresources: dict[str, list[str]] = {}
    first = served[0] if served else {}
    if 'status' in (first.get('subresources') or {}):
        subresources['status'] = ['get', 'patch', 'update']
    if 'scale' in (first.get('subresources') or {}):
        subresources['scale'] = ['get', 'patch', 'update']
    plural = names.get('plural', '')
    return ResourceType(
        group=spec.get('group', ''), plural=plural, kind=names.get('kind', ''),
        singular=names.get('singular') or names.get('kind', '').lower(),
        namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
        versions=[v['name'] for v in served],
        short_names=list(names.get('shortNames') or []),
        categories=list(names.get('categories') or []),
        subresources=subresources, crd=crd,
    )


@dataclass
class Event:
    rv: int
    group: str
    plural: str
    type: str             # ADDED / MODIFIED / DELETED
    obj: dict
    old: dict | None = None


class Watcher:
    """One watch stream's queue of raw events for one resource."""

    def __init__(self, group: str, plural: str) -> None:
        self.group = group
        self.plural = plural
        self.queue: asyncio.Queue[Event] = asyncio.Queue()


class Store:
    HISTORY = 50000

    def __init__(self) -> None:
        self.rv = 1
        self.types: dict[tuple[str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = collections.defaultdict(dict)
        self.history: collections.deque[Event] = collections.deque(maxlen=self.HISTORY)
        self.watchers: set[Watcher] = set()
        for rt in builtin_types():
            self.types[(rt.group, rt.plural)] = rt

    # ----------------------------------------------------------------- registry

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        rt = self.types.get((group, plural))
        if rt is None or version not in rt.versions:
            return None
        return rt

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rt in self.types.values():
            if rt.group:
                vs = out.setdefault(rt.group, [])
                for v in rt.versions:
                    if v not in vs:
                        vs.append(v)
        return out

    # ----------------------------------------------------------------- objects

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        return self.objects[(rt.group, rt.plural)].get((namespace or '', name))

    def items(self, rt: ResourceType, namespace: str | None = None) -> list[dict]:
        objs = self.objects[(rt.group, rt.plural)]
        out = [o for (ns, _), o in objs.items() if namespace is None or ns == namespace]
        out.sort(key=lambda o: (o['metadata'].get('namespace', ''), o['metadata']['name']))
        return out

    def all_objects(self) -> Iterator[tuple[ResourceType, dict]]:
        for (group, plural), objs in list(self.objects.items()):
            rt = self.types.get((group, plural))
            if rt is None:
                continue
            for obj in list(objs.values()):
                yield rt, obj

    def put(self, rt: ResourceType, obj: dict, event_type: str, old: dict | None = None) -> dict:
        rv = self.next_rv()
        obj['metadata']['resourceVersion'] = str(rv)
        key = (obj['metadata'].get('namespace', ''), obj['metadata']['name'])
        self.objects[(rt.group, rt.plural)][key] = obj
        self._emit(Event(rv, rt.group, rt.plural, event_type, obj, old))
        return obj

    def remove(self, rt: ResourceType, obj: dict) -> dict:
        key = (obj['metadata'].get('namespace', ''), obj['metadata']['name'])
        self.objects[(rt.group, rt.plural)].pop(key, None)
        gone = copy.deepcopy(obj)
        rv = self.next_rv()
        gone['metadata']['resourceVersion'] = str(rv)
        self._emit(Event(rv, rt.group, rt.plural, 'DELETED', gone, obj))
        return gone

    def drop_resource(self, rt: ResourceType) -> None:
        self.types.pop((rt.group, rt.plural), None)
        self.objects.pop((rt.group, rt.plural), None)

    # ----------------------------------------------------------------- watching

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        for w in list(self.watchers):
            if w.group == event.group and w.plural == event.plural:
                w.queue.put_nowait(event)

    def subscribe(self, rt: ResourceType) -> Watcher:
        w = Watcher(rt.group, rt.plural)
        self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def events_since(self, rt: ResourceType, rv: int) -> list[Event] | None:
        """Events after ``rv`` for the resource, or None if ``rv`` is older than the kept history."""
        if self.history and self.history[0].rv > rv + 1 and len(self.history) == self.HISTORY:
            return None
        return [e for e in self.history if e.rv > rv and e.group == rt.group and e.plural == rt.plural]

    def oldest_rv(self) -> int:
        return self.history[0].rv if self.history else self.rv
