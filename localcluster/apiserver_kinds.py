"""Kind-specific rules: metadata validation, create-time defaults (pods, services,
namespaces, secrets, CRDs), CRD admission and registration, pod update rules.

A mixin of :class:`localcluster.apiserver.APIServer`.
"""
from __future__ import annotations

import base64
import copy
import re
from typing import Any

from localcluster import apiserver_builtin as builtin
from localcluster import crdschema
from localcluster.apiserver_errors import invalid
from localcluster.apiserver_store import ResourceType, now_rfc3339, type_from_crd

DNS1123_LABEL = r'[a-z0-9]([-a-z0-9]*[a-z0-9])?'
DNS1123_SUBDOMAIN = r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*'
LABEL_KINDS = {('', 'namespaces'), ('', 'services')}


class KindsMixin:
    store: Any
    _ip_counter: int

    def _validate_meta(self, rt: ResourceType, obj: dict) -> list[crdschema.FieldError]:
        errors: list[crdschema.FieldError] = []
        meta = obj.get('metadata') or {}
        name = meta.get('name', '')
        if (rt.group, rt.plural) in LABEL_KINDS:
            if len(name) > 63:
                errors.append(crdschema.FieldError('Invalid', 'metadata.name', name, 'must be no more than 63 characters'))
            elif not re.fullmatch(DNS1123_LABEL, name):
                errors.append(crdschema.FieldError(
                    'Invalid', 'metadata.name', name,
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"))
        elif rt.plural != 'events':
            if len(name) > 253:
                errors.append(crdschema.FieldError('Invalid', 'metadata.name', name, 'must be no more than 253 characters'))
            elif not re.fullmatch(DNS1123_SUBDOMAIN, name):
                errors.append(crdschema.FieldError(
                    'Invalid', 'metadata.name', name,
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"))
        for key in (meta.get('labels') or {}):
            if not re.fullmatch(r'([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?'
                                r'[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?', key):
                errors.append(crdschema.FieldError('Invalid', 'metadata.labels', key,
                                                   "name part must consist of alphanumeric characters, '-', '_' or "
                                                   "'.', and must start and end with an alphanumeric character"))
        for key, value in (meta.get('labels') or {}).items():
            if not isinstance(value, str) or not re.fullmatch(r'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?', value) \
                    or len(value) > 63:
                errors.append(crdschema.FieldError('Invalid', 'metadata.labels', value,
                                                   "a valid label must be an empty string or consist of alphanumeric "
                                                   "characters, '-', '_' or '.', and must start and end with an "
                                                   "alphanumeric character"))
        for i, ref in enumerate(meta.get('ownerReferences') or []):
            for f in ('apiVersion', 'kind', 'name', 'uid'):
                if not ref.get(f):
                    errors.append(crdschema.FieldError('Invalid', f'metadata.ownerReferences.{f.lower()}',
                                                       ref.get(f, ''), f'{f.lower()} must not be empty'
                                                       if f != 'uid' else 'uid must not be empty'))
        return errors

    def _decode_builtin(self, rt: ResourceType, route: Any, obj: dict, query: dict,
                        warnings: dict) -> tuple[dict, dict]:
        """Pods and Services decoded like Go structs: type errors, quantities, unknown fields (fieldValidation)."""
        key = (rt.group, rt.plural)
        if key not in builtin.KINDS:
            return obj, warnings
        obj, more = builtin.decode(key, rt.kind, route.version, obj, query.get('fieldValidation', ''))
        return obj, {**warnings, **more}

    def _validate_builtin(self, rt: ResourceType, obj: dict) -> None:
        if (rt.group, rt.plural) == ('', 'pods'):
            errors = builtin.validate_pod_spec(obj.get('spec') or {})
            if errors:
                raise invalid(rt, (obj.get('metadata') or {}).get('name', ''), errors)

    def _prepare_create(self, rt: ResourceType, obj: dict) -> None:
        key = (rt.group, rt.plural)
        if key == ('', 'pods'):
            self._default_pod(obj)
        elif key == ('', 'services'):
            spec = obj.setdefault('spec', {})
            spec.setdefault('type', 'ClusterIP')
            spec.setdefault('sessionAffinity', 'None')
            if spec.get('clusterIP') in (None, ''):
                self._ip_counter += 1
                spec['clusterIP'] = f'10.96.{self._ip_counter // 250}.{self._ip_counter % 250 + 1}'
            spec.setdefault('clusterIPs', [spec['clusterIP']])
            for port in spec.get('ports') or []:
                port.setdefault('protocol', 'TCP')
                port.setdefault('targetPort', port.get('port'))
            obj['status'] = {'loadBalancer': {}}
        elif key == ('', 'namespaces'):
            obj.setdefault('spec', {}).setdefault('finalizers', ['kubernetes'])
            obj['status'] = {'phase': 'Active'}
            obj['metadata'].setdefault('labels', {})['kubernetes.io/metadata.name'] = obj['metadata']['name']
        elif key == ('', 'secrets'):
            obj.setdefault('type', 'Opaque')
            if 'stringData' in obj:
                data = obj.setdefault('data', {})
                for k, v in (obj.pop('stringData') or {}).items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
        elif key == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._validate_crd(obj)
            spec = obj.get('spec') or {}
            names = spec.get('names') or {}
            accepted = dict(names)
            accepted.setdefault('singular', names.get('kind', '').lower())
            accepted.setdefault('listKind', names.get('kind', '') + 'List')
            storage = [v['name'] for v in spec.get('versions') or [] if v.get('storage')]
            now = now_rfc3339()
            obj['status'] = {'acceptedNames': accepted, 'storedVersions': storage, 'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                 'message': 'no conflicts found', 'lastTransitionTime': now},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                 'message': 'the initial names have been accepted', 'lastTransitionTime': now}]}
            spec.setdefault('scope', 'Namespaced')
            for v in spec.get('versions') or []:
                v.setdefault('served', True)

    def _default_pod(self, pod: dict) -> None:
        spec = pod.setdefault('spec', {})
        spec.setdefault('restartPolicy', 'Always')
        spec.setdefault('terminationGracePeriodSeconds', 30)
        spec.setdefault('dnsPolicy', 'ClusterFirst')
        spec.setdefault('schedulerName', 'default-scheduler')
        spec.setdefault('securityContext', {})
        spec.setdefault('enableServiceLinks', True)
        spec.setdefault('priority', 0)
        spec.setdefault('serviceAccountName', spec.get('serviceAccount') or 'default')
        spec.setdefault('serviceAccount', spec['serviceAccountName'])
        spec.setdefault('preemptionPolicy', 'PreemptLowerPriority')
        spec.setdefault('tolerations', [
            {'key': 'node.kubernetes.io/not-ready', 'operator': 'Exists', 'effect': 'NoExecute',
             'tolerationSeconds': 300},
            {'key': 'node.kubernetes.io/unreachable', 'operator': 'Exists', 'effect': 'NoExecute',
             'tolerationSeconds': 300}])
        qos_limits, qos_requests, any_res = [], [], False
        for c in (spec.get('initContainers') or []) + (spec.get('containers') or []):
            image = c.get('image', '')
            tag = image.rsplit('/', 1)[-1]
            c.setdefault('imagePullPolicy', 'Always' if (':' not in tag or tag.endswith(':latest')) and '@' not in image
                         else 'IfNotPresent')
            c.setdefault('terminationMessagePath', '/dev/termination-log')
            c.setdefault('terminationMessagePolicy', 'File')
            res = c.setdefault('resources', {})
            if res.get('limits') and not res.get('requests'):
                res['requests'] = dict(res['limits'])
            if res.get('limits') or res.get('requests'):
                any_res = True
            qos_limits.append(res.get('limits') or {})
            qos_requests.append(res.get('requests') or {})
            for p in c.get('ports') or []:
                p.setdefault('protocol', 'TCP')
        guaranteed = any_res and all(
            lim.get('cpu') and lim.get('memory') and lim == req for lim, req in zip(qos_limits, qos_requests))
        qos = 'Guaranteed' if guaranteed else 'Burstable' if any_res else 'BestEffort'
        pod['status'] = {'phase': 'Pending', 'qosClass': qos}

    def _validate_crd(self, crd: dict) -> None:
        rt_crd = self.store.types[('apiextensions.k8s.io', 'customresourcedefinitions')]
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        name = crd['metadata']['name']
        errors: list[crdschema.FieldError] = []
        if not spec.get('group'):
            errors.append(crdschema.FieldError('Required', 'spec.group'))
        if not names.get('plural'):
            errors.append(crdschema.FieldError('Required', 'spec.names.plural'))
        if not names.get('kind'):
            errors.append(crdschema.FieldError('Required', 'spec.names.kind'))
        if names.get('plural') and spec.get('group') and name != f'{names["plural"]}.{spec["group"]}':
            errors.append(crdschema.FieldError('Invalid', 'metadata.name', name,
                                               "must be spec.names.plural+\".\"+spec.group"))
        versions = spec.get('versions') or []
        if not versions:
            errors.append(crdschema.FieldError('Invalid', 'spec.versions', None, 'must have exactly one version marked '
                                               'as storage version'))
        elif sum(1 for v in versions if v.get('storage')) != 1:
            errors.append(crdschema.FieldError('Invalid', 'spec.versions', versions,
                                               'must have exactly one version marked as storage version'))
        for i, v in enumerate(versions):
            schema = (v.get('schema') or {}).get('openAPIV3Schema')
            if schema:
                for problem in crdschema.check_rules(schema):
                    errors.append(crdschema.FieldError('Invalid', f'spec.versions[{i}].schema.openAPIV3Schema',
                                                       'object', problem))
        if errors:
            raise invalid(rt_crd, name, errors)

    def _register_crd(self, crd: dict) -> None:
        rt = type_from_crd(crd)
        existing = self.store.types.get((rt.group, rt.plural))
        if existing is not None and existing.crd is None:
            return  # never shadow a built-in
        self.store.types[(rt.group, rt.plural)] = rt

    def _check_pod_update(self, rt: ResourceType, old: dict, new: dict) -> None:
        def mutable_view(spec: dict) -> dict:
            s = copy.deepcopy(spec or {})
            for key in ('containers', 'initContainers'):
                for c in s.get(key) or []:
                    c.pop('image', None)
            s.pop('activeDeadlineSeconds', None)
            s.pop('tolerations', None)
            s.pop('terminationGracePeriodSeconds', None)
            s.pop('schedulingGates', None)
            return s
        if mutable_view(old.get('spec')) != mutable_view(new.get('spec')):
            raise invalid(rt, old['metadata']['name'], [crdschema.FieldError(
                'Forbidden', 'spec', detail='pod updates may not change fields other than `spec.containers[*].image`,'
                '`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to '
                'existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was '
                'previously negative)')])
