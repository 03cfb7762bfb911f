"""Pod binding and eviction, deletion (grace periods, finalizers), garbage collection.

A mixin of :class:`localcluster.apiserver.APIServer`; it uses ``self.store``
and ``self._spawn`` from there.
"""
from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING, Any

from localcluster import crdschema
from localcluster.apiserver_errors import bad_request, conflict, invalid, not_found
from localcluster.apiserver_store import ResourceType, now_rfc3339

if TYPE_CHECKING:
    from localcluster.apiserver import Route


class LifecycleMixin:
    store: Any

    # ================================================================= pod binding / eviction

    def _bind(self, route: Route, data: Any) -> dict:
        pods = self.store.types[('', 'pods')]
        if not isinstance(data, dict):
            raise bad_request('the object provided is unrecognized (must be of type Binding)')
        name = route.name or (data.get('metadata') or {}).get('name')
        pod = self.store.get(pods, route.namespace, name or '')
        if pod is None:
            raise not_found(pods, name or '')
        target = (data.get('target') or {}).get('name')
        if not target:
            raise invalid(self.store.types[('', 'bindings')], name or '',
                          [crdschema.FieldError('Required', 'target.name')])
        if pod['metadata'].get('deletionTimestamp'):
            raise conflict(pods, name or '', 'pod is being deleted, cannot be assigned to a host')
        if pod['spec'].get('nodeName'):
            raise conflict(pods, name or '', f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"')
        new = copy.deepcopy(pod)
        new['spec']['nodeName'] = target
        conds = new.setdefault('status', {}).setdefault('conditions', [])
        conds[:] = [c for c in conds if c.get('type') != 'PodScheduled']
        conds.append({'type': 'PodScheduled', 'status': 'True', 'lastProbeTime': None,
                      'lastTransitionTime': now_rfc3339()})
        self.store.put(pods, new, 'MODIFIED', pod)
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success', 'code': 201}

    def _evict(self, rt: ResourceType, route: Route, data: Any) -> dict:
        pod = self.store.get(rt, route.namespace, route.name or '')
        if pod is None:
            raise not_found(rt, route.name or '')
        opts = (data or {}).get('deleteOptions') or {} if isinstance(data, dict) else {}
        if not pod['metadata'].get('deletionTimestamp'):
            new = copy.deepcopy(pod)
            conds = new.setdefault('status', {}).setdefault('conditions', [])
            conds[:] = [c for c in conds if c.get('type') != 'DisruptionTarget']
            conds.append({'type': 'DisruptionTarget', 'status': 'True', 'reason': 'EvictionByEvictionAPI',
                          'message': 'Eviction API: evicting', 'lastProbeTime': None,
                          'lastTransitionTime': now_rfc3339()})
            self.store.put(rt, new, 'MODIFIED', pod)
        self._delete(rt, self.store.get(rt, route.namespace, route.name or ''), opts.get('gracePeriodSeconds'),
                     opts.get('propagationPolicy'))
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success', 'code': 201}

    # ================================================================= deletion

    def _delete_options(self, data: dict, query: dict) -> tuple[int | None, str | None, dict]:
        grace = data.get('gracePeriodSeconds', query.get('gracePeriodSeconds'))
        try:
            grace = int(grace) if grace is not None else None
        except ValueError:
            raise bad_request(f'invalid gracePeriodSeconds: {grace}')
        policy = data.get('propagationPolicy') or query.get('propagationPolicy')
        if data.get('orphanDependents') is True or query.get('orphanDependents') == 'true':
            policy = policy or 'Orphan'
        if policy not in (None, 'Background', 'Foreground', 'Orphan'):
            raise invalid(self.store.types[('', 'pods')], '', [crdschema.FieldError(
                'NotSupported', 'propagationPolicy', policy, 'supported values: "Foreground", "Background", '
                                                             '"Orphan", "nil"')])
        return grace, policy, data.get('preconditions') or {}

    def _delete_request(self, rt: ResourceType, route: Route, data: dict, query: dict, dry_run: bool) -> dict:
        obj = self.store.get(rt, route.namespace, route.name or '')
        if obj is None:
            raise not_found(rt, route.name or '')
        grace, policy, pre = self._delete_options(data if isinstance(data, dict) else {}, query)
        if pre.get('uid') and pre['uid'] != obj['metadata']['uid']:
            raise conflict(rt, obj['metadata']['name'], f'Precondition failed: UID in precondition: {pre["uid"]}, '
                                                        f'UID in object meta: {obj["metadata"]["uid"]}')
        if pre.get('resourceVersion') and pre['resourceVersion'] != obj['metadata']['resourceVersion']:
            raise conflict(rt, obj['metadata']['name'], f'Precondition failed: ResourceVersion in precondition: '
                                                        f'{pre["resourceVersion"]}, ResourceVersion in object meta: '
                                                        f'{obj["metadata"]["resourceVersion"]}')
        if dry_run:
            return obj
        return self._delete(rt, obj, grace, policy)

    def _delete(self, rt: ResourceType, obj: dict, grace: int | None, policy: str | None) -> dict:
        """Delete one object as kube-apiserver does; returns what the DELETE answers with."""
        meta = obj['metadata']
        key = (rt.group, rt.plural)
        if key == ('', 'namespaces'):
            return self._delete_namespace(rt, obj)
        if key == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            return self._delete_crd(rt, obj)
        graceful = False
        if key == ('', 'pods'):
            bound = bool((obj.get('spec') or {}).get('nodeName'))
            terminal = (obj.get('status') or {}).get('phase') in ('Succeeded', 'Failed')
            if grace is None:
                grace = int((obj.get('spec') or {}).get('terminationGracePeriodSeconds', 30) or 0)
            if not bound or terminal:
                grace = 0
            graceful = grace > 0
        new = copy.deepcopy(obj)
        nmeta = new['metadata']
        if policy == 'Orphan' and not meta.get('deletionTimestamp'):
            nmeta['finalizers'] = list(nmeta.get('finalizers') or []) + ['orphan']
        if graceful or nmeta.get('finalizers'):
            g = grace if graceful else 0
            current = meta.get('deletionGracePeriodSeconds')
            if meta.get('deletionTimestamp') and current is not None and current <= g:
                return obj  # already deleting, with a grace period no longer than the requested one
            nmeta['deletionTimestamp'] = now_rfc3339(g)
            nmeta['deletionGracePeriodSeconds'] = g
            if 'generation' in nmeta and not meta.get('deletionTimestamp'):
                nmeta['generation'] = int(nmeta['generation']) + 1
            if not graceful and meta.get('deletionTimestamp') and g == current:
                return obj
            self.store.put(rt, new, 'MODIFIED', obj)
            if 'orphan' in (nmeta.get('finalizers') or []):
                self._spawn(self._orphan_then_finalize(rt, new))
            return new
        return self._remove(rt, new, policy)

    def _remove(self, rt: ResourceType, obj: dict, policy: str | None = None) -> dict:
        gone = self.store.remove(rt, obj)
        if policy != 'Orphan':
            self._spawn(self._collect_garbage(obj['metadata']['uid']))
        if rt.crd is None and (rt.group, rt.plural) == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            pass
        return gone

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Background propagation: delete dependents whose owners are all gone, recursively (via _remove)."""
        await asyncio.sleep(0)
        alive = {o['metadata'].get('uid') for _, o in self.store.all_objects()}
        for rt, obj in list(self.store.all_objects()):
            refs = obj['metadata'].get('ownerReferences') or []
            if not any(r.get('uid') == owner_uid for r in refs):
                continue
            current = self.store.get(rt, obj['metadata'].get('namespace'), obj['metadata']['name'])
            if current is None or current['metadata'].get('uid') != obj['metadata'].get('uid'):
                continue
            if any(r.get('uid') in alive for r in refs if r.get('uid') != owner_uid):
                new = copy.deepcopy(current)
                new['metadata']['ownerReferences'] = [r for r in refs if r.get('uid') in alive]
                self.store.put(rt, new, 'MODIFIED', current)
                continue
            if current['metadata'].get('deletionTimestamp'):
                continue  # already being deleted (finalizers or a grace period pending)
            self._delete(rt, current, None, 'Background')

    async def _orphan_then_finalize(self, rt: ResourceType, obj: dict) -> None:
        await asyncio.sleep(0)
        uid = obj['metadata']['uid']
        for drt, dep in list(self.store.all_objects()):
            refs = dep['metadata'].get('ownerReferences') or []
            if any(r.get('uid') == uid for r in refs):
                new = copy.deepcopy(dep)
                new['metadata']['ownerReferences'] = [r for r in refs if r.get('uid') != uid]
                if not new['metadata']['ownerReferences']:
                    del new['metadata']['ownerReferences']
                self.store.put(drt, new, 'MODIFIED', dep)
        current = self.store.get(rt, obj['metadata'].get('namespace'), obj['metadata']['name'])
        if current is None or current['metadata']['uid'] != uid:
            return
        new = copy.deepcopy(current)
        new['metadata']['finalizers'] = [f for f in new['metadata'].get('finalizers') or [] if f != 'orphan']
        if not new['metadata']['finalizers']:
            del new['metadata']['finalizers']
            self.store.put(rt, new, 'MODIFIED', current)
            self.store.remove(rt, new)
        else:
            self.store.put(rt, new, 'MODIFIED', current)

    def _delete_namespace(self, rt: ResourceType, ns: dict) -> dict:
        if ns['metadata'].get('deletionTimestamp'):
            return ns
        new = copy.deepcopy(ns)
        new['metadata']['deletionTimestamp'] = now_rfc3339()
        new['metadata']['deletionGracePeriodSeconds'] = 0
        new['status'] = {'phase': 'Terminating'}
        self.store.put(rt, new, 'MODIFIED', ns)
        self._spawn(self._finalize_namespace(rt, new['metadata']['name'], new['metadata']['uid']))
        return new

    async def _finalize_namespace(self, rt: ResourceType, name: str, uid: str) -> None:
        deleted_once: set[str] = set()
        while True:
            remaining = 0
            for drt, obj in list(self.store.all_objects()):
                if not drt.namespaced or obj['metadata'].get('namespace') != name:
                    continue
                remaining += 1
                if obj['metadata']['uid'] not in deleted_once and not obj['metadata'].get('deletionTimestamp'):
                    deleted_once.add(obj['metadata']['uid'])
                    self._delete(drt, obj, None, 'Background')
            if remaining == 0:
                break
            await asyncio.sleep(0.2)
        ns = self.store.get(rt, None, name)
        if ns is not None and ns['metadata']['uid'] == uid:
            self.store.remove(rt, ns)

    def _delete_crd(self, rt: ResourceType, crd: dict) -> dict:
        if crd['metadata'].get('deletionTimestamp'):
            return crd
        new = copy.deepcopy(crd)
        new['metadata']['deletionTimestamp'] = now_rfc3339()
        new['metadata']['deletionGracePeriodSeconds'] = 0
        new['metadata']['finalizers'] = list(new['metadata'].get('finalizers') or []) + [
            'customresourcecleanup.apiextensions.k8s.io']
        self.store.put(rt, new, 'MODIFIED', crd)
        self._spawn(self._finalize_crd(rt, new))
        return new

    async def _finalize_crd(self, rt: ResourceType, crd: dict) -> None:
        spec = crd.get('spec') or {}
        cr_type = self.store.types.get((spec.get('group', ''), (spec.get('names') or {}).get('plural', '')))
        while cr_type is not None:
            items = self.store.items(cr_type)
            if not items:
                break
            for obj in items:
                if not obj['metadata'].get('deletionTimestamp'):
                    self._delete(cr_type, obj, None, 'Background')
            await asyncio.sleep(0.2)
        if cr_type is not None and cr_type.crd is not None:
            self.store.drop_resource(cr_type)
        current = self.store.get(rt, None, crd['metadata']['name'])
        if current is not None and current['metadata']['uid'] == crd['metadata']['uid']:
            new = copy.deepcopy(current)
            new['metadata']['finalizers'] = [f for f in new['metadata'].get('finalizers') or []
                                             if f != 'customresourcecleanup.apiextensions.k8s.io']
            if new['metadata']['finalizers']:
                self.store.put(rt, new, 'MODIFIED', current)
            else:
                del new['metadata']['finalizers']
                self.store.put(rt, new, 'MODIFIED', current)
                self.store.remove(rt, new)
