"""Structural-schema handling for custom resources, as a kube-apiserver does it.

One entry point, :func:`process`, takes a CRD version's ``openAPIV3Schema``
and an incoming object (plus the stored one on updates) and returns the object
after pruning and defaulting, with the list of validation errors worded like
the real server's (``field.Error`` from k8s.io/apimachinery and kube-openapi's
validate errors), and the paths of unknown (pruned) fields for
``fieldValidation=Strict``.

Order, as in apiextensions-apiserver: drop non-nullable nulls, apply
``default``s, prune unknown fields, validate (OpenAPI keywords, then
``x-kubernetes-validations`` CEL rules).
"""
from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------
# Errors, worded as k8s.io/apimachinery/pkg/util/validation/field renders them.

_TYPE_REASONS = {
    'Required': 'FieldValueRequired',
    'Invalid': 'FieldValueInvalid',
    'NotSupported': 'FieldValueNotSupported',
    'TooMany': 'FieldValueTooMany',
    'TooLong': 'FieldValueTooLong',
    'Forbidden': 'FieldValueForbidden',
    'Duplicate': 'FieldValueDuplicate',
}
_NO_VALUE = object()


def render_value(value: Any) -> str:
    """How field.Error prints a value (%q for strings, %v for scalars)."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, separators=(',', ':'))


@dataclass
class FieldError:
    """One validation error: type (Required, Invalid, ...), field path, value, detail."""
    type: str
    field: str
    value: Any = _NO_VALUE
    detail: str = ''

    def body(self) -> str:
        """The message without the field path (``ErrorBody`` in Go)."""
        if self.type == 'Required':
            s = 'Required value'
        elif self.type == 'Forbidden':
            s = 'Forbidden'
        elif self.type == 'TooLong':
            s = 'Too long'
        elif self.type == 'TooMany':
            s = 'Too many'
            if self.value is not _NO_VALUE:
                s += f': {render_value(self.value)}'
        else:
            label = {'Invalid': 'Invalid value', 'NotSupported': 'Unsupported value',
                     'Duplicate': 'Duplicate value'}[self.type]
            s = f'{label}: {render_value(None if self.value is _NO_VALUE else self.value)}'
        if self.detail:
            s += f': {self.detail}'
        return s

    def message(self) -> str:
        return f'{self.field}: {self.body()}' if self.field else self.body()

    def cause(self) -> dict[str, str]:
        return {'reason': _TYPE_REASONS.get(self.type, 'FieldValueInvalid'),
                'message': self.body(), 'field': self.field}


def join_path(path: str, key: str) -> str:
    return f'{path}.{key}' if path else key


def invalid_message(kind_group: str, name: str, errors: list[FieldError]) -> str:
    """``TrainingJob.trainingjob.dev "x" is invalid: <err>`` or ``[err1, err2]``."""
    msgs = [e.message() for e in errors]
    joined = msgs[0] if len(msgs) == 1 else '[' + ', '.join(msgs) + ']'
    return f'{kind_group} "{name}" is invalid: {joined}'


# ---------------------------------------------------------------------------
# Pruning, null-dropping and defaulting.

def _is_preserve(schema: dict) -> bool:
    return bool(schema.get('x-kubernetes-preserve-unknown-fields'))


def _embedded(schema: dict) -> bool:
    return bool(schema.get('x-kubernetes-embedded-resource'))


def default_and_prune(value: Any, schema: dict, path: str, unknown: list[str], *, root: bool = False) -> Any:
    """Return ``value`` with defaults applied and unknown fields removed (recording their paths)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props: dict = schema.get('properties') or {}
        addl = schema.get('additionalProperties')
        out: dict = {}
        # Nulls in non-nullable fields are dropped before defaulting.
        for key, sub in value.items():
            sub_schema = props.get(key)
            if sub is None and isinstance(sub_schema, dict) and not sub_schema.get('nullable'):
                continue
            out[key] = sub
        for key, sub_schema in props.items():
            if key not in out and isinstance(sub_schema, dict) and 'default' in sub_schema:
                out[key] = copy.deepcopy(sub_schema['default'])
        result: dict = {}
        for key, sub in out.items():
            keep_meta = (root or _embedded(schema)) and key in ('apiVersion', 'kind', 'metadata')
            if keep_meta:
                # Like the real server: metadata/apiVersion/kind are never pruned by the schema.
                result[key] = sub
            elif key in props:
                result[key] = default_and_prune(sub, props[key], join_path(path, key), unknown)
            elif isinstance(addl, dict):
                result[key] = default_and_prune(sub, addl, f'{path}[{key}]' if path else key, unknown)
            elif _is_preserve(schema) or addl is True:
                result[key] = sub
            else:
                unknown.append(join_path(path, key))
        return result
    if isinstance(value, list) and isinstance(schema.get('items'), dict):
        return [default_and_prune(v, schema['items'], f'{path}[{i}]', unknown) for i, v in enumerate(value)]
    return value


# ---------------------------------------------------------------------------
# OpenAPI keyword validation (kube-openapi wording).

_FORMAT_CHECKS: dict[str, Any] = {}


def _fmt(name: str):
    def deco(fn):
        _FORMAT_CHECKS[name] = fn
        return fn
    return deco


@_fmt('date-time')
@_fmt('datetime')
def _check_datetime(s: str) -> bool:
    return bool(re.fullmatch(r'\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})', s))


@_fmt('date')
def _check_date(s: str) -> bool:
    try:
        datetime.date.fromisoformat(s)
        return bool(re.fullmatch(r'\d{4}-\d{2}-\d{2}', s))
    except ValueError:
        return False


@_fmt('duration')
def _check_duration(s: str) -> bool:
    return bool(re.fullmatch(r'([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+|0', s))


@_fmt('byte')
def _check_byte(s: str) -> bool:
    try:
        base64.b64decode(s, validate=True)
        return True
    except Exception:
        return False


@_fmt('ipv4')
def _check_ipv4(s: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(s), ipaddress.IPv4Address)
    except ValueError:
        return False


@_fmt('ipv6')
def _check_ipv6(s: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(s), ipaddress.IPv6Address)
    except ValueError:
        return False


@_fmt('cidr')
def _check_cidr(s: str) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
        return '/' in s
    except ValueError:
        return False


@_fmt('uuid')
def _check_uuid(s: str) -> bool:
    try:
        uuidlib.UUID(s)
        return True
    except ValueError:
        return False


@_fmt('hostname')
def _check_hostname(s: str) -> bool:
    return bool(re.fullmatch(r'[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*', s)) and len(s) <= 253


@_fmt('email')
def _check_email(s: str) -> bool:
    return bool(re.fullmatch(r'[^@\s]+@[^@\s]+\.[^@\s]+', s))


@_fmt('uri')
def _check_uri(s: str) -> bool:
    return bool(re.fullmatch(r'[a-zA-Z][a-zA-Z0-9+.-]*:[^\s]*', s))


def _json_type(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, int):
        return 'integer'
    if isinstance(value, float):
        return 'integer' if value.is_integer() else 'number'
    if isinstance(value, str):
        return 'string'
    if isinstance(value, list):
        return 'array'
    return 'object'


#: The JSON type name of a decoded value (``integer`` for 2.0 too), shared with apiserver_builtin.
json_type = _json_type


def _type_ok(value: Any, schema: dict) -> bool:
    t = schema.get('type')
    if schema.get('x-kubernetes-int-or-string'):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    if value is None:
        return bool(schema.get('nullable')) or not t
    if not t:
        return True
    actual = _json_type(value)
    if t == 'number':
        return actual in ('integer', 'number')
    return actual == t


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def validate(value: Any, schema: dict, path: str, errors: list[FieldError]) -> bool:
    """Validate OpenAPI keywords; return False if the node's type is wrong (skips CEL there)."""
    if not isinstance(schema, dict):
        return True
    if not _type_ok(value, schema):
        expected = schema.get('type') or 'string'
        actual = _json_type(value)
        if schema.get('x-kubernetes-int-or-string'):
            errors.append(FieldError('Invalid', path, actual,
                                     f'{path} in body must be of type integer,string: "{actual}"'))
        else:
            errors.append(FieldError('Invalid', path, actual,
                                     f'{path} in body must be of type {expected}: "{actual}"'))
        return False
    if value is None:
        return True

    if 'enum' in schema and value not in schema['enum']:
        supported = ', '.join(render_value(v) for v in schema['enum'])
        errors.append(FieldError('NotSupported', path, value, f'supported values: {supported}'))

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 'minimum' in schema:
            lo = schema['minimum']
            if schema.get('exclusiveMinimum') is True and value <= lo:
                errors.append(FieldError('Invalid', path, value, f'{path} in body should be greater than {_num(lo)}'))
            elif value < lo:
                errors.append(FieldError('Invalid', path, value,
                                         f'{path} in body should be greater than or equal to {_num(lo)}'))
        if 'maximum' in schema:
            hi = schema['maximum']
            if schema.get('exclusiveMaximum') is True and value >= hi:
                errors.append(FieldError('Invalid', path, value, f'{path} in body should be less than {_num(hi)}'))
            elif value > hi:
                errors.append(FieldError('Invalid', path, value,
                                         f'{path} in body should be less than or equal to {_num(hi)}'))
        if 'multipleOf' in schema and schema['multipleOf'] and value % schema['multipleOf'] != 0:
            errors.append(FieldError('Invalid', path, value,
                                     f'{path} in body should be a multiple of {_num(schema["multipleOf"])}'))

    if isinstance(value, str):
        if 'minLength' in schema and len(value) < schema['minLength']:
            errors.append(FieldError('Invalid', path, value,
                                     f'{path} in body should be at least {schema["minLength"]} chars long'))
        if 'maxLength' in schema and len(value) > schema['maxLength']:
            errors.append(FieldError('TooLong', path, value,
                                     f'may not be more than {schema["maxLength"]} bytes'))
        if 'pattern' in schema and not re.search(schema['pattern'], value):
            errors.append(FieldError('Invalid', path, value,
                                     f"{path} in body should match '{schema['pattern']}'"))
        fmt = schema.get('format')
        if fmt in _FORMAT_CHECKS and not schema.get('x-kubernetes-int-or-string') and not _FORMAT_CHECKS[fmt](value):
            errors.append(FieldError('Invalid', path, value, f'{path} in body must be of type {fmt}: "{value}"'))

    if isinstance(value, list):
        if 'minItems' in schema and len(value) < schema['minItems']:
            errors.append(FieldError('Invalid', path, len(value),
                                     f'{path} in body should have at least {schema["minItems"]} items'))
        if 'maxItems' in schema and len(value) > schema['maxItems']:
            errors.append(FieldError('TooMany', path, len(value), f'must have at most {schema["maxItems"]} items'))
        list_type = schema.get('x-kubernetes-list-type')
        if list_type == 'set':
            seen: list = []
            for i, item in enumerate(value):
                if item in seen:
                    errors.append(FieldError('Duplicate', f'{path}[{i}]', item))
                seen.append(item)
        elif list_type == 'map':
            keys = schema.get('x-kubernetes-list-map-keys') or []
            seen_keys: list = []
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    k = {key: item.get(key) for key in keys}
                    if k in seen_keys:
                        errors.append(FieldError('Duplicate', f'{path}[{i}]', k))
                    seen_keys.append(k)
        items = schema.get('items')
        if isinstance(items, dict):
            for i, item in enumerate(value):
                validate(item, items, f'{path}[{i}]', errors)

    if isinstance(value, dict):
        props: dict = schema.get('properties') or {}
        for req in schema.get('required') or []:
            if req not in value:
                errors.append(FieldError('Required', join_path(path, req)))
        if 'minProperties' in schema and len(value) < schema['minProperties']:
            errors.append(FieldError('Invalid', path, len(value),
                                     f'{path} in body should have at least {schema["minProperties"]} properties'))
        if 'maxProperties' in schema and len(value) > schema['maxProperties']:
            errors.append(FieldError('TooMany', path, len(value),
                                     f'must have at most {schema["maxProperties"]} items'))
        addl = schema.get('additionalProperties')
        for key, sub in value.items():
            if key in props:
                validate(sub, props[key], join_path(path, key), errors)
            elif isinstance(addl, dict):
                validate(sub, addl, f'{path}[{key}]', errors)
    return True


# ---------------------------------------------------------------------------
# CEL rules (x-kubernetes-validations), evaluated with cel-python.

_CEL_CACHE: dict[str, Any] = {}


def _cel_functions() -> dict[str, Any]:
    import celpy.celtypes as ct

    def lower_ascii(s):
        return ct.StringType(str(s).lower())

    def upper_ascii(s):
        return ct.StringType(str(s).upper())

    def trim(s):
        return ct.StringType(str(s).strip())

    def split(s, sep):
        return ct.ListType([ct.StringType(x) for x in str(s).split(str(sep))])

    def join(lst, sep=ct.StringType('')):
        return ct.StringType(str(sep).join(str(x) for x in lst))

    def replace(s, old, new):
        return ct.StringType(str(s).replace(str(old), str(new)))

    def index_of(s, sub):
        return ct.IntType(str(s).find(str(sub)))

    def last_index_of(s, sub):
        return ct.IntType(str(s).rfind(str(sub)))

    def is_sorted(lst):
        items = list(lst)
        return ct.BoolType(all(items[i] <= items[i + 1] for i in range(len(items) - 1)))

    def sum_(lst):
        total = ct.IntType(0)
        for x in lst:
            total = total + x
        return total

    return {'lowerAscii': lower_ascii, 'upperAscii': upper_ascii, 'trim': trim, 'split': split,
            'join': join, 'replace': replace, 'indexOf': index_of, 'lastIndexOf': last_index_of,
            'isSorted': is_sorted, 'sum': sum_}


def compile_rule(rule: str):
    """Compile a CEL rule once; raises on syntax errors."""
    if rule not in _CEL_CACHE:
        import celpy
        env = celpy.Environment()
        ast = env.compile(rule)
        _CEL_CACHE[rule] = env.program(ast, functions=_cel_functions())
    return _CEL_CACHE[rule]


def check_rules(schema: dict) -> list[str]:
    """Syntax-check every CEL rule in a schema (for CRD admission). Returns error texts."""
    problems: list[str] = []

    def walk(s: Any, path: str) -> None:
        if not isinstance(s, dict):
            return
        for i, rule in enumerate(s.get('x-kubernetes-validations') or []):
            try:
                compile_rule(rule.get('rule', ''))
            except Exception as e:  # celpy raises CELParseError
                problems.append(f'{path}.x-kubernetes-validations[{i}].rule: Invalid value: '
                                f'{render_value(rule.get("rule"))}: compilation failed: {e}')
        for key, sub in (s.get('properties') or {}).items():
            walk(sub, f'{path}.properties[{key}]')
        if isinstance(s.get('items'), dict):
            walk(s['items'], f'{path}.items')
        if isinstance(s.get('additionalProperties'), dict):
            walk(s['additionalProperties'], f'{path}.additionalProperties')

    walk(schema, 'spec.validation.openAPIV3Schema')
    return problems


def _to_cel(value: Any):
    import celpy
    return celpy.json_to_cel(value)


def _cel_truthy(result: Any) -> bool | str:
    """True/False for a boolean result, or an error text."""
    import celpy
    if isinstance(result, celpy.CELEvalError):
        return f'{result.args[0] if result.args else result}'
    import celpy.celtypes as ct
    if isinstance(result, (bool, ct.BoolType)):
        return bool(result)
    return f'validation failed: rule did not evaluate to a bool: {result!r}'


def _schema_type_name(schema: dict, value: Any) -> str:
    if schema.get('type'):
        return schema['type']
    return _json_type(value)


def cel_validate(value: Any, old: Any, schema: dict, path: str, errors: list[FieldError], has_old: bool) -> None:
    """Evaluate CEL rules bottom-up; transition rules only where an old value correlates."""
    if not isinstance(schema, dict) or value is None:
        return
    if not _type_ok(value, schema):
        return
    if isinstance(value, dict):
        props = schema.get('properties') or {}
        addl = schema.get('additionalProperties')
        for key, sub in value.items():
            sub_old = old.get(key) if has_old and isinstance(old, dict) else None
            sub_has_old = has_old and isinstance(old, dict) and key in old
            if key in props:
                cel_validate(sub, sub_old, props[key], join_path(path, key), errors, sub_has_old)
            elif isinstance(addl, dict):
                cel_validate(sub, sub_old, addl, f'{path}[{key}]', errors, sub_has_old)
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        items = schema['items']
        keys = schema.get('x-kubernetes-list-map-keys') or []
        old_by_key: dict = {}
        if has_old and isinstance(old, list) and schema.get('x-kubernetes-list-type') == 'map' and keys:
            for o in old:
                if isinstance(o, dict):
                    old_by_key[json.dumps([o.get(k) for k in keys])] = o
        for i, item in enumerate(value):
            okey = json.dumps([item.get(k) for k in keys]) if isinstance(item, dict) and keys else None
            sub_old = old_by_key.get(okey) if okey is not None else None
            cel_validate(item, sub_old, items, f'{path}[{i}]', errors, okey in old_by_key if okey else False)

    for rule_def in schema.get('x-kubernetes-validations') or []:
        rule = rule_def.get('rule', '')
        is_transition = bool(re.search(r'\boldSelf\b', rule))
        if is_transition and not has_old and not rule_def.get('optionalOldSelf'):
            continue
        activation = {'self': _to_cel(value)}
        if is_transition:
            activation['oldSelf'] = _to_cel(old) if has_old else None
        fld = path
        if rule_def.get('fieldPath'):
            fld = path + rule_def['fieldPath'] if rule_def['fieldPath'].startswith(('.', '[')) \
                else join_path(path, rule_def['fieldPath'])
        try:
            prog = compile_rule(rule)
            outcome = _cel_truthy(prog.evaluate(activation))
        except Exception as e:  # parse errors, evaluation crashes inside celpy
            outcome = f'compilation failed: {e}'
        if outcome is True:
            continue
        if isinstance(outcome, str):
            errors.append(FieldError('Invalid', fld, _schema_type_name(schema, value),
                                     f'rule evaluation error: {outcome}' if 'compilation' not in outcome else outcome))
            continue
        message = rule_def.get('message') or f'failed rule: {rule}'
        if rule_def.get('messageExpression'):
            try:
                msg = compile_rule(rule_def['messageExpression']).evaluate(activation)
                if isinstance(msg, str) and msg.strip():
                    message = str(msg)
            except Exception:
                pass
        reason = rule_def.get('reason') or 'FieldValueInvalid'
        if reason == 'FieldValueRequired':
            errors.append(FieldError('Required', fld, detail=message))
        elif reason == 'FieldValueForbidden':
            errors.append(FieldError('Forbidden', fld, detail=message))
        elif reason == 'FieldValueDuplicate':
            errors.append(FieldError('Duplicate', fld, _schema_type_name(schema, value), message))
        else:
            errors.append(FieldError('Invalid', fld, _schema_type_name(schema, value), message))


# ---------------------------------------------------------------------------

@dataclass
class Result:
    obj: dict
    errors: list[FieldError] = field(default_factory=list)
    unknown_fields: list[str] = field(default_factory=list)


def process(schema: dict | None, obj: dict, old: dict | None = None) -> Result:
    """Prune, default and validate a custom resource object against its version's schema."""
    if not schema:
        return Result(obj)
    unknown: list[str] = []
    result = default_and_prune(obj, schema, '', unknown, root=True)
    errors: list[FieldError] = []
    body = {k: v for k, v in result.items() if k not in ('apiVersion', 'kind', 'metadata')}
    sub_schema = dict(schema)
    sub_schema['required'] = [r for r in schema.get('required') or [] if r not in ('apiVersion', 'kind', 'metadata')]
    validate(body, sub_schema, '', errors)
    old_body = None
    if old is not None:
        old_body = {k: v for k, v in old.items() if k not in ('apiVersion', 'kind', 'metadata')}
    cel_validate(body, old_body, sub_schema, '', errors, old is not None)
    # Root-level rules see the whole object incl. metadata.name; good enough to evaluate on the body.
    return Result(result, errors, unknown)
