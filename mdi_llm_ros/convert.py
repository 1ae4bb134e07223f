"""The request contract on the wire: GenerateParams / GenerationResult <-> service and action messages.

One place, written from the dataclasses' fields: the coordinator and every client convert
the same way, and a field added to the contract and to the .srv/.action files travels
without another line here. Imports neither torch nor rclpy (only the messages' classes,
which the callers pass in).
"""
from __future__ import annotations

from .core.request import GenerateParams, GenerationResult, field_names

_PARAMS = field_names(GenerateParams)
_RESULT = [n for n in field_names(GenerationResult) if n != "token_ids"]


def _wire(value):
    """A dataclass value as the generated message setters take it."""
    return list(value) if isinstance(value, tuple) else value


def fill_request(msg, p: GenerateParams):
    """Copy a request into a Generate.Request or a Generate.Goal; returns `msg`."""
    for name in _PARAMS:
        if hasattr(msg, name):
            setattr(msg, name, _wire(getattr(p, name)))
    return msg


def params_from(msg) -> GenerateParams:
    """The request a Generate.Request / Generate.Goal carries."""
    values = {}
    for name in _PARAMS:
        if hasattr(msg, name):
            v = getattr(msg, name)
            values[name] = tuple(int(x) if not isinstance(x, str) else x for x in v) \
                if not isinstance(v, (str, bytes, bool, int, float)) else v
    return GenerateParams(**values)


def fill_result(msg, r: GenerationResult):
    """Copy a result into a Generate.Response or a Generate.Result; returns `msg`."""
    for name in _RESULT:
        if hasattr(msg, name):
            value = getattr(r, name)
            setattr(msg, name, float(value) if isinstance(value, float) else value)
    return msg


def result_from(msg) -> GenerationResult:
    """The result a Generate.Response / Generate.Result carries."""
    return GenerationResult(**{name: getattr(msg, name) for name in _RESULT if hasattr(msg, name)})
