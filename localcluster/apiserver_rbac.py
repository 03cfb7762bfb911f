"""Authentication and RBAC authorization like kube-apiserver's, for the stand-in.

* **Authentication**: bearer tokens. ``POST .../serviceaccounts/NAME/token``
  (TokenRequest) issues a token for ``system:serviceaccount:NS:NAME`` (groups
  ``system:serviceaccounts``, ``system:serviceaccounts:NS``,
  ``system:authenticated``). An unknown token is 401. A request with no
  token at all is the stand-in's loopback admin (group ``system:masters``),
  as kube-apiserver's old insecure port was: that is what the tests' own
  client, kubectl and the node agent use.
* **Authorization**: the RBAC authorizer's rules over the Roles,
  ClusterRoles, RoleBindings and ClusterRoleBindings stored in the API
  (created through it, e.g. the chart's rendered RBAC): verbs, apiGroups,
  resources with ``resource/subresource`` and ``*``, resourceNames,
  nonResourceURLs (exact or ``prefix*``), subjects of kind User, Group and
  ServiceAccount, ClusterRoles aggregated through ``aggregationRule``.
  ``system:masters`` is allowed everything. Bootstrap roles:
  ``system:discovery`` (bound to ``system:authenticated``), ``cluster-admin``,
  and ``admin`` / ``edit`` / ``view`` (aggregating the roles labelled
  ``rbac.authorization.k8s.io/aggregate-to-<name>: "true"``; their own
  built-in rules are not reproduced).
* **OwnerReferencesPermissionEnforcement** (``--enable-admission-plugins``):
  setting ownerReferences needs ``delete`` on the object; setting
  ``blockOwnerDeletion: true`` needs ``update`` on the owner's
  ``<resource>/finalizers``.

Denials read like the real ones: ``pods is forbidden: User
"system:serviceaccount:ns:sa" cannot list resource "pods" in API group "" in
the namespace "ns"``.
"""
from __future__ import annotations

import contextvars
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from localcluster.apiserver_errors import ApiError, not_found
from localcluster.apiserver_store import ResourceType, Store, now_rfc3339

RBAC_GROUP = 'rbac.authorization.k8s.io'
MASTERS = 'system:masters'
AUTHENTICATED = 'system:authenticated'
OWNER_REFERENCES_PLUGIN = 'OwnerReferencesPermissionEnforcement'
DISCOVERY_URLS = ['/api', '/api/*', '/apis', '/apis/*', '/healthz', '/livez', '/readyz', '/openapi', '/openapi/*',
                  '/version', '/version/']


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


ADMIN = User('localcluster-admin', (MASTERS, AUTHENTICATED))
#: The authenticated user of the request being served (each request is its own task).
CURRENT_USER: contextvars.ContextVar[User] = contextvars.ContextVar('user', default=ADMIN)


@dataclass(frozen=True)
class Request:
    """What is asked: a resource request (``resource`` set) or a non-resource path."""
    verb: str
    api_group: str = ''
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    path: str = ''


def rbac_types() -> list[ResourceType]:
    return [
        ResourceType(RBAC_GROUP, 'roles', 'Role', 'role', True, ['v1']),
        ResourceType(RBAC_GROUP, 'rolebindings', 'RoleBinding', 'rolebinding', True, ['v1']),
        ResourceType(RBAC_GROUP, 'clusterroles', 'ClusterRole', 'clusterrole', False, ['v1']),
        ResourceType(RBAC_GROUP, 'clusterrolebindings', 'ClusterRoleBinding', 'clusterrolebinding', False, ['v1']),
    ]


def bootstrap(store: Store) -> None:
    """The cluster roles every real cluster starts with (the ones the tests need)."""
    cr, crb = store.types[(RBAC_GROUP, 'clusterroles')], store.types[(RBAC_GROUP, 'clusterrolebindings')]

    def put(rt: ResourceType, obj: dict) -> None:
        obj['metadata'].update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        obj['metadata'].setdefault('labels', {})['kubernetes.io/bootstrapping'] = 'rbac-defaults'
        store.put(rt, obj, 'ADDED')

    def role(name: str, rules: list[dict], **extra: Any) -> dict:
        return {'apiVersion': f'{RBAC_GROUP}/v1', 'kind': 'ClusterRole', 'metadata': {'name': name, **extra},
                'rules': rules}

    put(cr, role('cluster-admin', [{'apiGroups': ['*'], 'resources': ['*'], 'verbs': ['*']},
                                   {'nonResourceURLs': ['*'], 'verbs': ['*']}]))
    put(cr, role('system:discovery', [{'nonResourceURLs': DISCOVERY_URLS, 'verbs': ['get']}]))
    put(crb, {'apiVersion': f'{RBAC_GROUP}/v1', 'kind': 'ClusterRoleBinding', 'metadata': {'name': 'system:discovery'},
              'roleRef': {'apiGroup': RBAC_GROUP, 'kind': 'ClusterRole', 'name': 'system:discovery'},
              'subjects': [{'apiGroup': RBAC_GROUP, 'kind': 'Group', 'name': AUTHENTICATED}]})
    # admin aggregates edit, edit aggregates view (the built-ins carry those labels).
    for name, into in (('admin', None), ('edit', 'admin'), ('view', 'edit')):
        labels = {f'rbac.authorization.k8s.io/aggregate-to-{into}': 'true'} if into else {}
        obj = role(name, [], labels=labels)
        obj['aggregationRule'] = {'clusterRoleSelectors': [
            {'matchLabels': {f'rbac.authorization.k8s.io/aggregate-to-{name}': 'true'}}]}
        put(cr, obj)


class Authorizer:
    """Tokens -> users, and the RBAC decision for a user and a request."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tokens: dict[str, User] = {}

    # -- authentication ------------------------------------------------------
    def authenticate(self, authorization: str | None) -> User:
        if not authorization:
            return ADMIN
        scheme, _, token = authorization.partition(' ')
        user = self.tokens.get(token.strip()) if scheme.lower() == 'bearer' else None
        if user is None:
            raise ApiError(401, 'Unauthorized', 'Unauthorized')
        return user

    def issue_token(self, namespace: str, name: str) -> str:
        token = secrets.token_urlsafe(32)
        self.tokens[token] = User(f'system:serviceaccount:{namespace}:{name}',
                                  ('system:serviceaccounts', f'system:serviceaccounts:{namespace}', AUTHENTICATED))
        return token

    # -- authorization ---------------------------------------------------------
    def allowed(self, user: User, req: Request) -> bool:
        if MASTERS in user.groups:
            return True
        for namespace, rules in self._rules_for(user):
            if req.resource is not None and namespace is not None and req.namespace != namespace:
                continue
            if req.resource is None and namespace is not None:
                continue  # non-resource URLs are granted by ClusterRoleBindings only
            if any(_rule_allows(rule, req) for rule in rules):
                return True
        return False

    def check(self, user: User, req: Request) -> None:
        if not self.allowed(user, req):
            raise forbidden(user, req)

    def _rules_for(self, user: User) -> Iterable[tuple[str | None, list[dict]]]:
        for b in self.store.items(self.store.types[(RBAC_GROUP, 'clusterrolebindings')]):
            if _bound(b, user, None):
                yield None, self._role_rules(b.get('roleRef') or {}, None)
        for b in self.store.items(self.store.types[(RBAC_GROUP, 'rolebindings')]):
            ns = b['metadata'].get('namespace')
            if _bound(b, user, ns):
                yield ns, self._role_rules(b.get('roleRef') or {}, ns)

    def _role_rules(self, ref: dict, namespace: str | None) -> list[dict]:
        if ref.get('kind') == 'Role' and namespace is not None:
            role = self.store.get(self.store.types[(RBAC_GROUP, 'roles')], namespace, ref.get('name', ''))
            return list((role or {}).get('rules') or [])
        if ref.get('kind') == 'ClusterRole':
            return self._cluster_role_rules(ref.get('name', ''), set())
        return []

    def _cluster_role_rules(self, name: str, seen: set[str]) -> list[dict]:
        if name in seen:
            return []
        seen.add(name)
        rt = self.store.types[(RBAC_GROUP, 'clusterroles')]
        role = self.store.get(rt, None, name)
        if role is None:
            return []
        rules = list(role.get('rules') or [])
        selectors = ((role.get('aggregationRule') or {}).get('clusterRoleSelectors')) or []
        for other in self.store.items(rt):
            labels = other['metadata'].get('labels') or {}
            if any(all(labels.get(k) == v for k, v in (sel.get('matchLabels') or {}).items()) for sel in selectors):
                rules += self._cluster_role_rules(other['metadata']['name'], seen)
        return rules


def _bound(binding: dict, user: User, namespace: str | None) -> bool:
    for s in binding.get('subjects') or []:
        kind, name = s.get('kind'), s.get('name')
        if kind == 'User' and name == user.name:
            return True
        if kind == 'Group' and name in user.groups:
            return True
        if kind == 'ServiceAccount' and user.name == f'system:serviceaccount:{s.get("namespace") or namespace}:{name}':
            return True
    return False


def _rule_allows(rule: dict, req: Request) -> bool:
    verbs = rule.get('verbs') or []
    if req.verb not in verbs and '*' not in verbs:
        return False
    if req.resource is None:
        return any(u == req.path or u == '*' or (u.endswith('*') and req.path.startswith(u[:-1]))
                   for u in rule.get('nonResourceURLs') or [])
    groups = rule.get('apiGroups') or []
    if req.api_group not in groups and '*' not in groups:
        return False
    full = f'{req.resource}/{req.subresource}' if req.subresource else req.resource
    resources = rule.get('resources') or []
    if not (full in resources or '*' in resources or (req.subresource and f'*/{req.subresource}' in resources)):
        return False
    names = rule.get('resourceNames') or []
    return not names or (req.name is not None and req.name in names)


def forbidden(user: User, req: Request, prefix: str = '') -> ApiError:
    """403 worded like the RBAC authorizer's."""
    if req.resource is None:
        return ApiError(403, 'Forbidden', f'forbidden: User "{user.name}" cannot {req.verb} path "{req.path}"')
    full = f'{req.resource}/{req.subresource}' if req.subresource else req.resource
    scope = f'in the namespace "{req.namespace}"' if req.namespace else 'at the cluster scope'
    what = f'{req.resource}.{req.api_group}' if req.api_group else req.resource
    subject = f'{what} "{req.name}"' if req.name else what
    reason = f'User "{user.name}" cannot {req.verb} resource "{full}" in API group "{req.api_group}" {scope}'
    return ApiError(403, 'Forbidden', f'{subject} is forbidden: {prefix}{reason}',
                    {'name': req.name or '', 'group': req.api_group, 'kind': req.resource})


def check_owner_references(auth: Authorizer, user: User, store: Store, rt: ResourceType, obj: dict,
                           old: dict | None) -> None:
    """OwnerReferencesPermissionEnforcement: who may set ownerReferences and blockOwnerDeletion."""
    meta = obj.get('metadata') or {}
    refs = meta.get('ownerReferences') or []
    old_refs = ((old or {}).get('metadata') or {}).get('ownerReferences') or []
    if refs == old_refs:
        return
    ns = meta.get('namespace')
    auth.check(user, Request('delete', rt.group, rt.plural, None, ns, meta.get('name')))
    old_blocking = {r.get('uid') for r in old_refs if r.get('blockOwnerDeletion')}
    for ref in refs:
        if not ref.get('blockOwnerDeletion') or ref.get('uid') in old_blocking:
            continue
        group = ref.get('apiVersion', '').rpartition('/')[0]
        owner = next((t for t in store.types.values() if t.group == group and t.kind == ref.get('kind')), None)
        if owner is None:
            raise ApiError(403, 'Forbidden', f'{rt.plural} "{meta.get("name", "")}" is forbidden: cannot set '
                           f'blockOwnerDeletion in this case because cannot find RESTMapping for APIVersion '
                           f'{ref.get("apiVersion")} Kind {ref.get("kind")}')
        req = Request('update', owner.group, owner.plural, 'finalizers', ns if owner.namespaced else None,
                      ref.get('name'))
        if not auth.allowed(user, req):
            scope = f'in the namespace "{ns}"' if owner.namespaced and ns else 'at the cluster scope'
            raise ApiError(403, 'Forbidden', f'{rt.plural} "{meta.get("name", "")}" is forbidden: cannot set '
                           f'blockOwnerDeletion if an ownerReference refers to a resource you can\'t set finalizers '
                           f'on: User "{user.name}" cannot update resource "{owner.plural}/finalizers" in API group '
                           f'"{owner.group}" {scope}', {'name': meta.get('name', ''), 'group': rt.group,
                                                         'kind': rt.plural})


class AuthMixin:
    """The API server's side of it (a mixin of :class:`localcluster.apiserver.APIServer`)."""

    store: Store
    admission_plugins: frozenset
    authorizer: Authorizer

    def _init_auth(self) -> None:
        for rt in rbac_types():
            self.store.types[(rt.group, rt.plural)] = rt
        self.store.types[('', 'serviceaccounts')].subresources['token'] = ['create']
        bootstrap(self.store)
        self.authorizer = Authorizer(self.store)

    def _authorize(self, raw: Any, route: Any, entry: dict) -> None:
        """RBAC: 403 with the real wording unless a binding allows the request."""
        if route is None or route.plural is None:
            req = Request(raw.method.lower(), path=raw.path)
        else:
            req = Request(entry['verb'], route.group, route.plural, route.subresource, route.namespace, route.name)
        self.authorizer.check(CURRENT_USER.get(), req)

    def _check_owner_references(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        if OWNER_REFERENCES_PLUGIN in self.admission_plugins:
            check_owner_references(self.authorizer, CURRENT_USER.get(), self.store, rt, obj, old)

    def _token_request(self, route: Any, data: Any) -> dict:
        """TokenRequest: a bearer token for the ServiceAccount (it must exist)."""
        sa_type = self.store.types[('', 'serviceaccounts')]
        if self.store.get(sa_type, route.namespace, route.name or '') is None:
            raise not_found(sa_type, route.name or '')
        seconds = int(((data or {}).get('spec') or {}).get('expirationSeconds') or 3600)
        return {'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest',
                'metadata': {'name': route.name, 'namespace': route.namespace},
                'spec': {'audiences': [], 'expirationSeconds': seconds},
                'status': {'token': self.authorizer.issue_token(route.namespace or '', route.name or ''),
                           'expirationTimestamp': now_rfc3339(seconds)}}
