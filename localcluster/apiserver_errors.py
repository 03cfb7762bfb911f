"""Errors answered with ``Status`` bodies worded like kube-apiserver's."""
from __future__ import annotations

from typing import TYPE_CHECKING

from localcluster import crdschema

if TYPE_CHECKING:
    from localcluster.apiserver_store import ResourceType


class ApiError(Exception):
    """An error answered with a ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                'message': self.message, 'reason': self.reason, 'code': self.code}
        if self.details:
            body['details'] = self.details
        return body


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, 'NotFound', f'{rt.group_resource} "{name}" not found',
                    {'name': name, 'group': rt.group, 'kind': rt.plural})


def conflict(rt: ResourceType, name: str, message: str | None = None) -> ApiError:
    return ApiError(409, 'Conflict', f'Operation cannot be fulfilled on {rt.group_resource} "{name}": ' + (
        message or 'the object has been modified; please apply your changes to the latest version and try again'),
        {'name': name, 'group': rt.group, 'kind': rt.plural})


def invalid(rt: ResourceType, name: str, errors: list[crdschema.FieldError]) -> ApiError:
    return ApiError(422, 'Invalid', crdschema.invalid_message(rt.group_kind, name, errors),
                    {'name': name, 'group': rt.group, 'kind': rt.kind, 'causes': [e.cause() for e in errors]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, 'BadRequest', message)
