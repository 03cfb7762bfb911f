"""The API server stand-in behaves like kube-apiserver for what kopf, kubectl and the node agent use.

One server per module (a subprocess on a free port, killed by PID at teardown);
each test uses its own object names.
"""
from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART_CRD = REPO / 'charts' / 'trainingjob-operator' / 'crds' / 'trainingjobs.yaml'
KUBECTL = shutil.which('kubectl') or '/usr/bin/kubectl'

WIDGET_CRD = {
    'apiVersion': 'apiextensions.k8s.io/v1', 'kind': 'CustomResourceDefinition',
    'metadata': {'name': 'widgets.example.com'},
    'spec': {
        'group': 'example.com', 'scope': 'Namespaced',
        'names': {'plural': 'widgets', 'singular': 'widget', 'kind': 'Widget', 'shortNames': ['wd'],
                  'categories': ['all']},
        'versions': [{
            'name': 'v1', 'served': True, 'storage': True,
            'subresources': {'status': {}},
            'additionalPrinterColumns': [
                {'name': 'Size', 'type': 'integer', 'jsonPath': '.spec.size'},
                {'name': 'Phase', 'type': 'string', 'jsonPath': '.status.phase'},
                {'name': 'Preemptions', 'type': 'integer', 'jsonPath': '.status.restarts.preemptions'},
                {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}],
            'schema': {'openAPIV3Schema': {
                'type': 'object',
                'properties': {
                    'spec': {
                        'type': 'object', 'required': ['image'],
                        'x-kubernetes-validations': [
                            {'rule': 'self.size <= 8 || self.image.startsWith("big/")',
                             'message': 'more than 8 requires a big/ image'},
                            {'rule': 'self.image == oldSelf.image', 'message': 'image is immutable'}],
                        'properties': {
                            'image': {'type': 'string', 'minLength': 1},
                            'size': {'type': 'integer', 'minimum': 1, 'maximum': 100, 'default': 1},
                            'mode': {'type': 'string', 'enum': ['fast', 'safe'], 'default': 'safe'},
                            'name': {'type': 'string', 'pattern': '^[a-z]+$', 'maxLength': 5},
                            'port': {'x-kubernetes-int-or-string': True},
                            'tags': {'type': 'array', 'maxItems': 2, 'items': {'type': 'string'}},
                            'extra': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                        }},
                    'status': {'type': 'object', 'properties': {
                        'phase': {'type': 'string'},
                        'restarts': {'type': 'object', 'properties': {'preemptions': {'type': 'integer'}}}}},
                }}},
        }],
    },
}


# --------------------------------------------------------------------------- fixtures & helpers

class Api:
    def __init__(self, url: str, state_dir: pathlib.Path) -> None:
        self.url = url
        self.state_dir = state_dir
        self.kubeconfig = state_dir / 'kubeconfig'

    def call(self, method: str, path: str, body=None, ctype: str = 'application/json',
             headers: dict | None = None) -> tuple[int, dict]:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Content-Type': ctype, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b'null')
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b'null')

    def ok(self, method: str, path: str, body=None, ctype: str = 'application/json', **kw) -> dict:
        status, got = self.call(method, path, body, ctype, **kw)
        assert status < 300, (status, got)
        return got

    def watch(self, path: str, seconds: float, on_open=None) -> list[dict]:
        """Collect a watch stream's events until the server ends it (timeoutSeconds)."""
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=seconds + 5)
        sep = '&' if '?' in path else '?'
        conn.request('GET', f'{path}{sep}watch=true&timeoutSeconds={seconds}')
        resp = conn.getresponse()
        assert resp.status == 200
        if on_open:
            on_open()
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
        conn.close()
        return events

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        proc = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, env=env, timeout=30)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc


def wait_for(fn, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('condition not met in time')
        time.sleep(interval)


@pytest.fixture(scope='module')
def api(tmp_path_factory) -> Api:
    state_dir = tmp_path_factory.mktemp('apiserver')
    proc = subprocess.Popen([sys.executable, '-m', 'localcluster.apiserver', '--state-dir', str(state_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info_path = state_dir / 'apiserver.json'
        wait_for(lambda: info_path.exists() or proc.poll() is not None, timeout=15)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ''
        info = json.loads(info_path.read_text())
        assert info['pid'] == proc.pid
        client = Api(info['url'], state_dir)
        client.ok('POST', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', WIDGET_CRD)
        yield client
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0  # a clean exit on SIGTERM


def widget(name: str, **spec) -> dict:
    return {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'metadata': {'name': name},
            'spec': {'image': 'img', **spec}}


W = '/apis/example.com/v1/namespaces/default/widgets'
CM = '/api/v1/namespaces/default/configmaps'
PODS = '/api/v1/namespaces/default/pods'


def pod(name: str, **meta) -> dict:
    return {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': name, **meta},
            'spec': {'containers': [{'name': 'main', 'image': 'busybox:1', 'env': [{'name': 'A', 'value': '1'}]}]}}


# --------------------------------------------------------------------------- tests

def test_cli_writes_kubeconfig_and_discovery_lists_crds(api: Api) -> None:
    kubeconfig = yaml.safe_load(api.kubeconfig.read_text())
    assert kubeconfig['clusters'][0]['cluster']['server'] == api.url
    assert kubeconfig['contexts'][0]['context']['namespace'] == 'default'
    assert kubeconfig['current-context'] == kubeconfig['contexts'][0]['name']

    nslist = api.ok('GET', '/api/v1/namespaces')
    assert nslist['kind'] == 'NamespaceList' and nslist['apiVersion'] == 'v1'
    assert int(nslist['metadata']['resourceVersion']) > 0
    assert 'default' in {n['metadata']['name'] for n in nslist['items']}

    groups = api.ok('GET', '/apis')
    assert {'name': 'example.com'}.items() <= next(g for g in groups['groups'] if g['name'] == 'example.com').items()
    resources = {r['name']: r for r in api.ok('GET', '/apis/example.com/v1')['resources']}
    assert resources['widgets']['shortNames'] == ['wd']
    assert resources['widgets']['categories'] == ['all']
    assert resources['widgets']['namespaced'] is True
    assert resources['widgets']['kind'] == 'Widget'
    assert 'watch' in resources['widgets']['verbs']
    assert resources['widgets/status']['verbs'] == ['get', 'patch', 'update']
    core = {r['name'] for r in api.ok('GET', '/api/v1')['resources']}
    assert {'pods', 'pods/status', 'pods/binding', 'pods/eviction', 'nodes', 'events', 'secrets'} <= core


def test_create_get_conflicts_and_not_found(api: Api) -> None:
    created = api.ok('POST', CM, {'metadata': {'name': 'cm1'}, 'data': {'a': '1'}})
    meta = created['metadata']
    assert meta['uid'] and meta['creationTimestamp'] and meta['resourceVersion']
    assert created['kind'] == 'ConfigMap' and created['apiVersion'] == 'v1'

    status, body = api.call('POST', CM, {'metadata': {'name': 'cm1'}})
    assert status == 409 and body['kind'] == 'Status' and body['reason'] == 'AlreadyExists'
    assert body['message'] == 'configmaps "cm1" already exists'

    updated = api.ok('PUT', f'{CM}/cm1', dict(created, data={'a': '2'}))
    assert int(updated['metadata']['resourceVersion']) > int(meta['resourceVersion'])
    status, body = api.call('PUT', f'{CM}/cm1', dict(created, data={'a': '3'}))  # stale resourceVersion
    assert status == 409 and body['reason'] == 'Conflict'
    assert 'the object has been modified' in body['message']

    status, body = api.call('GET', f'{CM}/nope')
    assert status == 404 and body['reason'] == 'NotFound' and body['message'] == 'configmaps "nope" not found'
    assert body['details'] == {'name': 'nope', 'group': '', 'kind': 'configmaps'}

    generated = api.ok('POST', CM, {'metadata': {'generateName': 'gen-'}})
    assert generated['metadata']['name'].startswith('gen-') and len(generated['metadata']['name']) == 9

    status, body = api.call('POST', CM, {'metadata': {'name': 'Bad_Name'}})
    assert status == 422 and body['reason'] == 'Invalid'
    assert body['details']['causes'][0]['field'] == 'metadata.name'
    assert 'RFC 1123 subdomain' in body['message']

    status, body = api.call('POST', '/api/v1/namespaces/missing/configmaps', {'metadata': {'name': 'x'}})
    assert status == 404 and body['message'] == 'namespaces "missing" not found'


def test_no_op_update_keeps_resource_version(api: Api) -> None:
    created = api.ok('POST', CM, {'metadata': {'name': 'noop'}, 'data': {'a': '1'}})
    same = api.ok('PATCH', f'{CM}/noop', {'data': {'a': '1'}}, 'application/merge-patch+json')
    assert same['metadata']['resourceVersion'] == created['metadata']['resourceVersion']


def test_patch_types(api: Api) -> None:
    api.ok('POST', PODS, pod('patchme'))
    merged = api.ok('PATCH', f'{PODS}/patchme', {'metadata': {'labels': {'a': 'b'}}}, 'application/merge-patch+json')
    assert merged['metadata']['labels'] == {'a': 'b'}
    jp = api.ok('PATCH', f'{PODS}/patchme', [{'op': 'add', 'path': '/metadata/annotations', 'value': {'x': 'y'}},
                                              {'op': 'remove', 'path': '/metadata/labels/a'}],
                'application/json-patch+json')
    assert jp['metadata']['annotations'] == {'x': 'y'} and jp['metadata'].get('labels') == {}
    # Strategic merge: containers merged by name (the other container stays), status conditions by type.
    api.ok('POST', PODS, dict(pod('smp'), spec={'containers': [{'name': 'a', 'image': 'busybox:1'},
                                                               {'name': 'b', 'image': 'busybox:1'}]}))
    smp = api.ok('PATCH', f'{PODS}/smp', {'spec': {'containers': [{'name': 'b', 'image': 'busybox:2'}]}},
                 'application/strategic-merge-patch+json')
    assert [(c['name'], c['image']) for c in smp['spec']['containers']] == [('a', 'busybox:1'), ('b', 'busybox:2')]
    api.ok('PATCH', f'{PODS}/smp/status', {'status': {'conditions': [{'type': 'PodScheduled', 'status': 'True'}]}},
           'application/strategic-merge-patch+json')
    st = api.ok('PATCH', f'{PODS}/smp/status', {'status': {'conditions': [{'type': 'Ready', 'status': 'False'}]}},
                'application/strategic-merge-patch+json')
    assert [c['type'] for c in st['status']['conditions']] == ['PodScheduled', 'Ready']
    st = api.ok('PATCH', f'{PODS}/smp/status', {'status': {'conditions': [{'type': 'Ready', 'status': 'True'}]}},
                'application/strategic-merge-patch+json')
    assert [(c['type'], c['status']) for c in st['status']['conditions']] == [('PodScheduled', 'True'),
                                                                            ('Ready', 'True')]
    # Pod spec fields other than images are immutable, like the real server.
    status, body = api.call('PATCH', f'{PODS}/patchme', {'spec': {'restartPolicy': 'Never'}},
                            'application/merge-patch+json')
    assert status == 422 and body['details']['causes'][0]['field'] == 'spec'
    # Custom resources do not take strategic merge patches.
    api.ok('POST', W, widget('nosmp'))
    status, body = api.call('PATCH', f'{W}/nosmp', {'spec': {'size': 2}}, 'application/strategic-merge-patch+json')
    assert status == 415 and body['reason'] == 'UnsupportedMediaType'


def test_label_and_field_selectors(api: Api) -> None:
    for name, labels in [('sel-a', {'app': 'x', 'tier': 'web'}), ('sel-b', {'app': 'y'}), ('sel-c', {})]:
        api.ok('POST', CM, {'metadata': {'name': name, 'labels': labels}})

    def names(query: str) -> set[str]:
        items = api.ok('GET', f'{CM}?{urllib.parse.urlencode({"labelSelector": query})}')['items']
        return {i['metadata']['name'] for i in items if i['metadata']['name'].startswith('sel-')}
    assert names('app=x') == {'sel-a'}
    assert names('app==x') == {'sel-a'}
    assert names('app!=x') == {'sel-b', 'sel-c'}
    assert names('app in (x,y)') == {'sel-a', 'sel-b'}
    assert names('app notin (x)') == {'sel-b', 'sel-c'}
    assert names('tier') == {'sel-a'}
    assert names('!tier') == {'sel-b', 'sel-c'}
    assert names('app,!tier') == {'sel-b'}
    got = api.ok('GET', f'{CM}?fieldSelector=metadata.name%3Dsel-b')['items']
    assert [i['metadata']['name'] for i in got] == ['sel-b']
    status, body = api.call('GET', f'{CM}?fieldSelector=spec.bogus%3D1')
    assert status == 400 and body['reason'] == 'BadRequest'

    api.ok('POST', PODS, pod('sel-pod'))
    api.ok('POST', f'{PODS}/sel-pod/binding', {'apiVersion': 'v1', 'kind': 'Binding', 'metadata': {'name': 'sel-pod'},
                                               'target': {'kind': 'Node', 'name': 'node-1'}})
    on_node = api.ok('GET', '/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1')['items']
    assert [p['metadata']['name'] for p in on_node] == ['sel-pod']
    pending = api.ok('GET', f'{PODS}?fieldSelector=status.phase%3DPending,metadata.name%3Dsel-pod')['items']
    assert len(pending) == 1 and pending[0]['status']['phase'] == 'Pending'
    assert api.ok('GET', f'{PODS}?fieldSelector=status.phase%3DRunning')['items'] == []


def test_watch_events_follow_changes_and_selectors(api: Api) -> None:
    rv = api.ok('GET', CM)['metadata']['resourceVersion']
    api.ok('POST', CM, {'metadata': {'name': 'w-1', 'labels': {'watch': 'me'}}})
    api.ok('PATCH', f'{CM}/w-1', {'data': {'k': 'v'}}, 'application/merge-patch+json')
    api.ok('PATCH', f'{CM}/w-1', {'metadata': {'labels': {'watch': None}}}, 'application/merge-patch+json')
    api.ok('DELETE', f'{CM}/w-1')

    events = api.watch(f'{CM}?resourceVersion={rv}&fieldSelector=metadata.name%3Dw-1', 1)
    assert [e['type'] for e in events] == ['ADDED', 'MODIFIED', 'MODIFIED', 'DELETED']
    assert events[1]['object']['data'] == {'k': 'v'}
    rvs = [int(e['object']['metadata']['resourceVersion']) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)

    # With a label selector, losing the label is a DELETED for that watcher.
    labelled = api.watch(f'{CM}?resourceVersion={rv}&labelSelector=watch%3Dme', 1)
    assert [e['type'] for e in labelled] == ['ADDED', 'MODIFIED', 'DELETED']

    # Without a resourceVersion, existing objects come first as ADDED, then live events, with bookmarks allowed.
    api.ok('POST', CM, {'metadata': {'name': 'w-2'}})
    live = api.watch(f'{CM}?fieldSelector=metadata.name%3Dw-2&allowWatchBookmarks=true', 1,
                     on_open=lambda: api.ok('DELETE', f'{CM}/w-2'))
    assert [e['type'] for e in live if e['type'] != 'BOOKMARK'] == ['ADDED', 'DELETED']


def test_finalizers_hold_deletion(api: Api) -> None:
    api.ok('POST', CM, {'metadata': {'name': 'fin', 'finalizers': ['example.com/hold']}})
    deleted = api.ok('DELETE', f'{CM}/fin')
    assert deleted['metadata']['deletionTimestamp']
    still = api.ok('GET', f'{CM}/fin')
    assert still['metadata']['deletionTimestamp'] and still['metadata']['finalizers'] == ['example.com/hold']
    status, body = api.call('PATCH', f'{CM}/fin', {'metadata': {'finalizers': ['example.com/hold', 'new']}},
                            'application/merge-patch+json')
    assert status == 422 and 'no new finalizers' in body['message']
    api.ok('PATCH', f'{CM}/fin', {'metadata': {'finalizers': None}}, 'application/merge-patch+json')
    assert api.call('GET', f'{CM}/fin')[0] == 404


def test_graceful_pod_deletion_and_eviction(api: Api) -> None:
    api.ok('POST', PODS, pod('unbound'))
    api.ok('DELETE', f'{PODS}/unbound')
    assert api.call('GET', f'{PODS}/unbound')[0] == 404  # unbound pods go at once

    api.ok('POST', PODS, pod('bound'))
    bind = {'apiVersion': 'v1', 'kind': 'Binding', 'metadata': {'name': 'bound'}, 'target': {'name': 'node-1'}}
    status, _ = api.call('POST', f'{PODS}/bound/binding', bind)
    assert status == 201
    bound = api.ok('GET', f'{PODS}/bound')
    assert bound['spec']['nodeName'] == 'node-1'
    assert any(c['type'] == 'PodScheduled' and c['status'] == 'True' for c in bound['status']['conditions'])
    assert api.call('POST', f'{PODS}/bound/binding', bind)[0] == 409  # already bound

    deleting = api.ok('DELETE', f'{PODS}/bound', {'kind': 'DeleteOptions', 'apiVersion': 'v1',
                                                  'gracePeriodSeconds': 45})
    assert deleting['metadata']['deletionGracePeriodSeconds'] == 45 and deleting['metadata']['deletionTimestamp']
    assert api.ok('GET', f'{PODS}/bound')['metadata']['deletionGracePeriodSeconds'] == 45  # waits for the kubelet
    api.ok('PATCH', f'{PODS}/bound/status', {'status': {'phase': 'Failed'}}, 'application/merge-patch+json')
    assert api.ok('GET', f'{PODS}/bound')['status']['phase'] == 'Failed'  # the kubelet reports, then deletes
    api.ok('DELETE', f'{PODS}/bound?gracePeriodSeconds=0')  # what the node agent does when the pod has stopped
    assert api.call('GET', f'{PODS}/bound')[0] == 404

    api.ok('POST', PODS, pod('default-grace'))
    api.ok('POST', f'{PODS}/default-grace/binding', dict(bind, metadata={'name': 'default-grace'}))
    assert api.ok('DELETE', f'{PODS}/default-grace')['metadata']['deletionGracePeriodSeconds'] == 30

    api.ok('POST', PODS, pod('evictme'))
    api.ok('POST', f'{PODS}/evictme/binding', dict(bind, metadata={'name': 'evictme'}))
    status, _ = api.call('POST', f'{PODS}/evictme/eviction', {
        'apiVersion': 'policy/v1', 'kind': 'Eviction', 'metadata': {'name': 'evictme', 'namespace': 'default'}})
    assert status == 201
    evicted = api.ok('GET', f'{PODS}/evictme')
    cond = next(c for c in evicted['status']['conditions'] if c['type'] == 'DisruptionTarget')
    assert cond['reason'] == 'EvictionByEvictionAPI' and cond['status'] == 'True'
    assert evicted['metadata']['deletionTimestamp'] and evicted['metadata']['deletionGracePeriodSeconds'] == 30


def test_cascading_garbage_collection(api: Api) -> None:
    owner = api.ok('POST', W, widget('gc-owner'))
    ref = {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'name': 'gc-owner', 'uid': owner['metadata']['uid']}
    child = api.ok('POST', CM, {'metadata': {'name': 'gc-child', 'ownerReferences': [ref]}})
    child_ref = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'name': 'gc-child', 'uid': child['metadata']['uid']}
    api.ok('POST', CM, {'metadata': {'name': 'gc-grandchild', 'ownerReferences': [child_ref]}})
    api.ok('POST', PODS, dict(pod('gc-pod'), metadata={'name': 'gc-pod', 'ownerReferences': [ref]}))
    api.ok('POST', f'{PODS}/gc-pod/binding', {'metadata': {'name': 'gc-pod'}, 'target': {'name': 'node-1'}})
    api.ok('POST', CM, {'metadata': {'name': 'gc-unrelated'}})

    api.ok('DELETE', f'{W}/gc-owner', {'propagationPolicy': 'Background'})
    wait_for(lambda: api.call('GET', f'{CM}/gc-child')[0] == 404)
    wait_for(lambda: api.call('GET', f'{CM}/gc-grandchild')[0] == 404)
    gc_pod = wait_for(lambda: api.ok('GET', f'{PODS}/gc-pod')['metadata'].get('deletionTimestamp') and
                      api.ok('GET', f'{PODS}/gc-pod'))
    assert gc_pod['metadata']['deletionGracePeriodSeconds'] == 30  # bound pods are deleted gracefully
    assert api.call('GET', f'{CM}/gc-unrelated')[0] == 200


def test_status_subresource_and_generation(api: Api) -> None:
    created = api.ok('POST', W, dict(widget('st'), status={'phase': 'Ignored'}))
    assert 'status' not in created and created['metadata']['generation'] == 1
    assert created['spec'] == {'image': 'img', 'size': 1, 'mode': 'safe'}  # defaults applied

    via_status = api.ok('PATCH', f'{W}/st/status', {'spec': {'size': 7}, 'status': {'phase': 'Running'}},
                        'application/merge-patch+json')
    assert via_status['status'] == {'phase': 'Running'} and via_status['spec']['size'] == 1
    assert via_status['metadata']['generation'] == 1

    via_main = api.ok('PATCH', f'{W}/st', {'spec': {'size': 2}, 'status': {'phase': 'Hacked'}},
                      'application/merge-patch+json')
    assert via_main['status'] == {'phase': 'Running'} and via_main['spec']['size'] == 2
    assert via_main['metadata']['generation'] == 2

    labelled = api.ok('PATCH', f'{W}/st', {'metadata': {'labels': {'x': 'y'}}}, 'application/merge-patch+json')
    assert labelled['metadata']['generation'] == 2  # metadata changes do not bump generation

    status, body = api.call('PUT', f'{W}/st', dict(labelled, spec={'image': 'img'}, metadata=dict(
        labelled['metadata'], resourceVersion='1')))
    assert status == 409

    # Pods: status writes ignore spec; main writes ignore status.
    api.ok('POST', PODS, pod('stpod'))
    p = api.ok('PATCH', f'{PODS}/stpod/status', {'status': {'phase': 'Running'}, 'spec': {'nodeName': 'x'}},
               'application/merge-patch+json')
    assert p['status']['phase'] == 'Running' and 'nodeName' not in p['spec']


def test_schema_validation_errors_and_pruning(api: Api) -> None:
    status, body = api.call('POST', W, {'apiVersion': 'example.com/v1', 'kind': 'Widget',
                                        'metadata': {'name': 'bad'},
                                        'spec': {'size': 0, 'mode': 'turbo', 'name': 'ABC123', 'tags': ['a', 'b', 'c'],
                                                 'port': 1.5}})
    assert status == 422 and body['reason'] == 'Invalid' and body['kind'] == 'Status'
    fields = {c['field']: c for c in body['details']['causes']}
    assert set(fields) >= {'spec.image', 'spec.size', 'spec.mode', 'spec.name', 'spec.tags', 'spec.port'}
    assert fields['spec.image']['reason'] == 'FieldValueRequired'
    assert fields['spec.mode']['reason'] == 'FieldValueNotSupported'
    assert body['message'].startswith('Widget.example.com "bad" is invalid: [')
    assert ('spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1'
            in body['message'])
    assert 'spec.mode: Unsupported value: "turbo": supported values: "fast", "safe"' in body['message']
    assert "spec.name in body should match '^[a-z]+$'" in body['message']
    assert body['details']['name'] == 'bad' and body['details']['group'] == 'example.com'

    status, body = api.call('POST', W, widget('toobig', size=10))
    assert status == 422
    assert body['message'] == ('Widget.example.com "toobig" is invalid: spec: Invalid value: "object": '
                               'more than 8 requires a big/ image')

    ok = api.ok('POST', W, dict(widget('pruned', port='http', extra={'free': {'form': 1}}),
                                spec={'image': 'img', 'unknown': 1, 'extra': {'free': {'form': 1}}}))
    assert 'unknown' not in ok['spec'] and ok['spec']['extra'] == {'free': {'form': 1}}
    status, body = api.call('POST', f'{W}?fieldValidation=Strict', widget('strict', bogus=1))
    assert status == 400 and 'unknown field "spec.bogus"' in body['message']

    # Transition rule with oldSelf.
    status, body = api.call('PATCH', f'{W}/pruned', {'spec': {'image': 'other'}}, 'application/merge-patch+json')
    assert status == 422 and 'image is immutable' in body['message']


@pytest.mark.skipif(not CHART_CRD.exists(), reason='the chart CRD is written by another part')
def test_chart_crd_validates_trainingjobs(api: Api) -> None:
    crd = yaml.safe_load(CHART_CRD.read_text())
    status, body = api.call('POST', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', crd)
    assert status in (201, 409), body
    group = crd['spec']['group']
    version = next(v['name'] for v in crd['spec']['versions'] if v.get('storage'))
    plural = crd['spec']['names']['plural']
    path = f'/apis/{group}/{version}/namespaces/default/{plural}'
    status, body = api.call('POST', path, {'apiVersion': f'{group}/{version}', 'kind': crd['spec']['names']['kind'],
                                           'metadata': {'name': 'zero'}, 'spec': {'nodes': 0}})
    assert status == 422
    assert any(c['field'] == 'spec.nodes' for c in body['details']['causes'])
    assert 'spec.nodes: Invalid value: 0: spec.nodes in body should be greater than or equal to 1' in body['message']


def test_kubectl_apply_get_table_and_delete(api: Api, tmp_path: pathlib.Path) -> None:
    manifest = tmp_path / 'w.yaml'
    manifest.write_text(yaml.safe_dump(widget('kubectl-w', size=3)))
    out = api.kubectl('apply', '-f', str(manifest)).stdout
    assert 'widget.example.com/kubectl-w created' in out
    api.ok('PATCH', f'{W}/kubectl-w/status', {'status': {'phase': 'Running', 'restarts': {'preemptions': 4}}},
           'application/merge-patch+json')
    table = api.kubectl('get', 'wd', 'kubectl-w').stdout.splitlines()
    assert table[0].split() == ['NAME', 'SIZE', 'PHASE', 'PREEMPTIONS', 'AGE']
    assert table[1].split()[:4] == ['kubectl-w', '3', 'Running', '4']
    manifest.write_text(yaml.safe_dump(widget('kubectl-w', size=4)))
    assert 'configured' in api.kubectl('apply', '-f', str(manifest)).stdout
    assert api.ok('GET', f'{W}/kubectl-w')['spec']['size'] == 4

    manifest.write_text(yaml.safe_dump(widget('kubectl-bad', size=0)))
    bad = api.kubectl('apply', '-f', str(manifest), check=False)
    assert bad.returncode != 0 and 'spec.size in body should be greater than or equal to 1' in bad.stderr

    cm = tmp_path / 'cm.yaml'
    cm.write_text(yaml.safe_dump({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'kubectl-cm'},
                                  'data': {'a': '1'}}))
    api.kubectl('apply', '-f', str(cm))
    cm.write_text(yaml.safe_dump({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'kubectl-cm'},
                                  'data': {'a': '2'}}))
    api.kubectl('apply', '-f', str(cm))  # a strategic merge patch for a core type
    assert api.ok('GET', f'{CM}/kubectl-cm')['data'] == {'a': '2'}
    assert 'kubectl-w' in api.kubectl('get', 'all').stdout  # categories
    api.kubectl('describe', 'wd', 'kubectl-w')
    api.kubectl('delete', 'wd', 'kubectl-w')
    assert api.call('GET', f'{W}/kubectl-w')[0] == 404


def test_kopf_run_standalone_smoke(api: Api, tmp_path: pathlib.Path) -> None:
    handlers = tmp_path / 'handlers.py'
    handlers.write_text(textwrap.dedent('''
        import kopf

        @kopf.on.create('example.com', 'v1', 'widgets', labels={'kopf': 'yes'})
        def created(body, spec, patch, **_):
            patch.status['phase'] = f"seen-{spec['size']}"
            kopf.info(body, reason='Seen', message='widget seen by kopf')
    '''))
    env = dict(os.environ, KUBECONFIG=str(api.kubeconfig))
    kopf = shutil.which('kopf', path=str(pathlib.Path(sys.executable).parent)) or 'kopf'
    proc = subprocess.Popen([kopf, 'run', '--standalone', '--all-namespaces', str(handlers)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        api.ok('POST', W, dict(widget('kopf-w', size=5), metadata={'name': 'kopf-w', 'labels': {'kopf': 'yes'}}))
        got = wait_for(lambda: (api.ok('GET', f'{W}/kopf-w').get('status') or {}).get('phase') == 'seen-5', 20)
        assert got
        events = wait_for(lambda: api.ok('GET', '/api/v1/namespaces/default/events?fieldSelector='
                                                'involvedObject.name%3Dkopf-w')['items'], 10)
        assert events[0]['reason'] == 'Seen' and events[0]['involvedObject']['kind'] == 'Widget'
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    output = proc.stdout.read().decode() if proc.stdout else ''
    assert 'Traceback' not in output, output


def test_request_log_records_kubernetes_verbs(api: Api) -> None:
    api.ok('POST', CM, {'metadata': {'name': 'logged'}})
    api.ok('PATCH', f'{W}/st/status', {'status': {'phase': 'Logged'}}, 'application/merge-patch+json')
    entries = [json.loads(line) for line in (api.state_dir / 'api-requests.jsonl').read_text().splitlines()]
    keys = {'ts', 'method', 'path', 'query', 'user_agent', 'status', 'verb', 'api_group', 'api_version', 'resource',
            'subresource', 'namespace', 'name', 'user'}
    # A successful create also names what it made (bench/scale.py tells the jobs' pod POSTs apart by it),
    # and a DELETE says whether it removed the object (bench/scale.py times "the old gang is gone" by it).
    assert all(set(e) - {'created', 'removed'} == keys for e in entries)
    create = [e for e in entries if e['verb'] == 'create' and e['resource'] == 'configmaps']
    assert create and create[-1]['status'] == 201 and create[-1]['namespace'] == 'default'
    assert create[-1]['created'] == 'logged'
    patch = [e for e in entries if e['verb'] == 'patch' and e['subresource'] == 'status']
    assert patch[-1]['api_group'] == 'example.com' and patch[-1]['name'] == 'st' and patch[-1]['resource'] == 'widgets'
    assert any(e['verb'] == 'watch' for e in entries)
    made = api.ok('POST', CM, {'metadata': {'name': 'removed-later'}})
    status, got = api.call('DELETE', f"{CM}/{made['metadata']['name']}")
    assert status == 200, (status, got, made['metadata'])
    deleted = [e for e in (json.loads(line) for line in (api.state_dir / 'api-requests.jsonl').read_text().splitlines())
               if e['verb'] == 'delete']
    assert deleted[-1]['name'] == 'removed-later' and deleted[-1]['removed'] is True
    assert any(e['verb'] == 'list' and e['resource'] == 'namespaces' and e['api_group'] == '' for e in entries)


def test_bad_requests_get_status_bodies(api: Api) -> None:
    status, body = api.call('POST', CM, b'{not json')
    assert status == 400 and body['kind'] == 'Status'
    status, body = api.call('GET', '/apis/nope.example/v1/things')
    assert status == 404 and body['reason'] == 'NotFound'
    status, body = api.call('PATCH', f'{CM}/logged', [{'op': 'replace', 'path': '/nope/x', 'value': 1}],
                            'application/json-patch+json')
    assert status == 422 and body['kind'] == 'Status'
    status, body = api.call('GET', f'{CM}?labelSelector=a%20in%20(')
    assert status == 400
    assert api.ok('GET', '/version')['major'] == '1'  # still serving


def test_client_watch_reads_chunks_not_single_bytes(api: Api, monkeypatch) -> None:
    """Issue 9 defect 1 / issue 10: ``Client.watch`` read the stream one byte per call."""
    import requests

    from localcluster.kube import Client, split_lines

    assert list(split_lines([b'{"a"', b':1}\n{"b":2}\n', b'', b'{"c":3}'])) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    rv = api.ok('GET', CM)['metadata']['resourceVersion']
    for i in range(20):
        api.ok('POST', CM, {'metadata': {'name': f'chunk-{i}', 'labels': {'chunky': 'yes'}}, 'data': {'k': 'v' * 200}})
    reads = []
    original = requests.models.Response.iter_content

    def counting(self, chunk_size=1, decode_unicode=False):
        for chunk in original(self, chunk_size=chunk_size, decode_unicode=decode_unicode):
            reads.append(len(chunk))
            yield chunk

    monkeypatch.setattr(requests.models.Response, 'iter_content', counting)
    client = Client(api.url)
    got = [(t, o['metadata']['name']) for t, o in client.watch(
        'configmaps', 'default', label_selector='chunky=yes', resource_version=rv, timeout=1)]
    assert got == [('ADDED', f'chunk-{i}') for i in range(20)]
    total = sum(reads)
    assert total > 20 * 200
    assert len(reads) <= 40, f'{len(reads)} reads for {total} bytes: the stream is read byte by byte'


def test_builtin_pods_decoded_and_validated_like_the_real_server(api: Api) -> None:
    """Issue 9 defect 14: unknown pod fields, types, quantities, ranges, required fields."""
    bad = pod('strict-0')
    bad['spec']['securityContext'] = {'privileged': True, 'runAsUser': 1000}
    status, got = api.call('POST', f'{PODS}?fieldValidation=Strict', bad)
    assert status == 400 and got['reason'] == 'BadRequest', got
    assert got['message'] == ('Pod in version "v1" cannot be handled as a Pod: strict decoding error: '
                              'unknown field "spec.securityContext.privileged"')
    # Without Strict the field is dropped, with a warning (fieldValidation=Warn is the default).
    req = urllib.request.Request(api.url + PODS, data=json.dumps(bad).encode(), method='POST',
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=10) as resp:
        created = json.loads(resp.read())
        assert 'unknown field \\"spec.securityContext.privileged\\"' in resp.headers.get('Warning', '')
    assert created['spec']['securityContext'] == {'runAsUser': 1000}
    api.ok('DELETE', f'{PODS}/strict-0')

    def refused(name: str, edit, code: int, text: str) -> None:
        body = pod(name)
        edit(body['spec'])
        status, got = api.call('POST', f'{PODS}?fieldValidation=Strict', body)
        assert status == code and text in got['message'], (name, status, got)

    refused('q-bad', lambda s: s['containers'][0].update(resources={'limits': {'cpu': 'lots'}}), 400,
            'quantities must match the regular expression')
    refused('t-bad', lambda s: s.update(securityContext={'runAsUser': 'root'}), 400,
            'cannot unmarshal string into Go struct field PodSecurityContext.spec.securityContext.runAsUser '
            'of type int64')
    refused('r-bad', lambda s: s.update(securityContext={'runAsUser': -1}), 422,
            'Pod "r-bad" is invalid: spec.securityContext.runAsUser: Invalid value: -1: must be between 0 and '
            '2147483647, inclusive')
    refused('i-bad', lambda s: s['containers'][0].pop('image'), 422, 'spec.containers[0].image: Required value')
    refused('l-bad', lambda s: s['containers'][0].update(resources={'limits': {'cpu': '1'}, 'requests': {'cpu': '2'}}),
            422, 'must be less than or equal to cpu limit')
    refused('c-bad', lambda s: s.update(containers=[]), 422, 'spec.containers: Required value')
    refused('u-bad', lambda s: s['containers'][0].update(bogus=1), 400, 'unknown field "spec.containers[0].bogus"')


def _sa_token(api: Api, ns: str, name: str) -> str:
    api.call('POST', f'/api/v1/namespaces/{ns}/serviceaccounts', {'metadata': {'name': name}})
    got = api.ok('POST', f'/api/v1/namespaces/{ns}/serviceaccounts/{name}/token', {'spec': {}})
    return got['status']['token']


RBAC = '/apis/rbac.authorization.k8s.io/v1'


def test_rbac_is_enforced_for_service_account_tokens(api: Api) -> None:
    token = _sa_token(api, 'default', 'robot')
    auth = {'Authorization': f'Bearer {token}'}
    status, got = api.call('GET', PODS, headers=auth)
    assert status == 403 and got['reason'] == 'Forbidden'
    assert got['message'] == ('pods is forbidden: User "system:serviceaccount:default:robot" cannot list resource '
                              '"pods" in API group "" in the namespace "default"')
    status, got = api.call('GET', '/apis/example.com/v1/widgets', headers=auth)
    assert got['message'] == ('widgets.example.com is forbidden: User "system:serviceaccount:default:robot" cannot '
                              'list resource "widgets" in API group "example.com" at the cluster scope')
    assert api.call('GET', '/apis', headers=auth)[0] == 200  # system:discovery, for every authenticated user
    assert api.call('GET', PODS, headers={'Authorization': 'Bearer nope'})[0] == 401
    # A Role + RoleBinding in default: list pods there, and nothing more.
    api.ok('POST', f'{RBAC}/namespaces/default/roles', {'metadata': {'name': 'pod-reader'}, 'rules': [
        {'apiGroups': [''], 'resources': ['pods', 'pods/status'], 'verbs': ['list', 'get']}]})
    api.ok('POST', f'{RBAC}/namespaces/default/rolebindings', {
        'metadata': {'name': 'robot-reads'}, 'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role',
                                                         'name': 'pod-reader'},
        'subjects': [{'kind': 'ServiceAccount', 'name': 'robot', 'namespace': 'default'}]})
    assert api.call('GET', PODS, headers=auth)[0] == 200
    status, got = api.call('DELETE', f'{PODS}/nothing', headers=auth)
    assert status == 403 and got['message'].startswith('pods "nothing" is forbidden: User '
                                                       '"system:serviceaccount:default:robot" cannot delete resource')
    status, got = api.call('GET', '/api/v1/namespaces/kube-system/pods', headers=auth)
    assert status == 403 and 'in the namespace "kube-system"' in got['message']
    # Aggregation: a ClusterRole labelled aggregate-to-edit is part of edit (and admin), bound here by a RoleBinding.
    api.ok('POST', f'{RBAC}/clusterroles', {'metadata': {'name': 'widgets-edit', 'labels': {
        'rbac.authorization.k8s.io/aggregate-to-edit': 'true'}}, 'rules': [
        {'apiGroups': ['example.com'], 'resources': ['widgets'], 'verbs': ['create', 'get', 'list']}]})
    api.ok('POST', f'{RBAC}/namespaces/default/rolebindings', {
        'metadata': {'name': 'robot-admin'}, 'roleRef': {'apiGroup': 'rbac.authorization.k8s.io',
                                                         'kind': 'ClusterRole', 'name': 'admin'},
        'subjects': [{'kind': 'ServiceAccount', 'name': 'robot', 'namespace': 'default'}]})
    assert api.call('GET', W, headers=auth)[0] == 200
    assert api.call('GET', '/apis/example.com/v1/namespaces/kube-system/widgets', headers=auth)[0] == 403


def test_owner_references_permission_enforcement(tmp_path: pathlib.Path) -> None:
    from localcluster.apiserver import start_in_thread

    server = start_in_thread(tmp_path, admission_plugins={'OwnerReferencesPermissionEnforcement'})
    try:
        api = Api(server.url, tmp_path)
        api.ok('POST', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', WIDGET_CRD)
        owner = api.ok('POST', W, widget('boss'))
        token = _sa_token(api, 'default', 'maker')
        auth = {'Authorization': f'Bearer {token}'}
        api.ok('POST', f'{RBAC}/namespaces/default/roles', {'metadata': {'name': 'maker'}, 'rules': [
            {'apiGroups': [''], 'resources': ['configmaps'], 'verbs': ['create', 'delete']}]})
        api.ok('POST', f'{RBAC}/namespaces/default/rolebindings', {
            'metadata': {'name': 'maker'}, 'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role',
                                                       'name': 'maker'},
            'subjects': [{'kind': 'ServiceAccount', 'name': 'maker', 'namespace': 'default'}]})
        ref = {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'name': 'boss', 'uid': owner['metadata']['uid'],
               'controller': True, 'blockOwnerDeletion': True}
        status, got = api.call('POST', CM, {'metadata': {'name': 'owned', 'ownerReferences': [ref]}}, headers=auth)
        assert status == 403, got
        assert ('cannot set blockOwnerDeletion if an ownerReference refers to a resource you can\'t set finalizers '
                'on: User "system:serviceaccount:default:maker" cannot update resource "widgets/finalizers" in API '
                'group "example.com" in the namespace "default"') in got['message']
        api.ok('POST', f'{RBAC}/namespaces/default/roles', {'metadata': {'name': 'finalizers'}, 'rules': [
            {'apiGroups': ['example.com'], 'resources': ['widgets/finalizers'], 'verbs': ['update']}]})
        api.ok('POST', f'{RBAC}/namespaces/default/rolebindings', {
            'metadata': {'name': 'finalizers'}, 'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role',
                                                            'name': 'finalizers'},
            'subjects': [{'kind': 'ServiceAccount', 'name': 'maker', 'namespace': 'default'}]})
        assert api.call('POST', CM, {'metadata': {'name': 'owned', 'ownerReferences': [ref]}}, headers=auth)[0] == 201
    finally:
        server.stop()
