"""Error codes shared by the engine, the ROS service/action and the CLI.

Every refused or failed request carries one of these codes plus a message that
says what went wrong and what to do; the README lists them.
"""
from __future__ import annotations


class ErrorCode:
    """String codes (stable API: clients match on them)."""

    EMPTY_PROMPT = "EMPTY_PROMPT"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    INVALID_MAX_NEW_TOKENS = "INVALID_MAX_NEW_TOKENS"
    INVALID_TEMPERATURE = "INVALID_TEMPERATURE"
    INVALID_TOP_K = "INVALID_TOP_K"
    INVALID_TOP_P = "INVALID_TOP_P"
    INVALID_SEED = "INVALID_SEED"
    INVALID_STOP = "INVALID_STOP"
    INVALID_TEXT = "INVALID_TEXT"
    INVALID_PRIORITY = "INVALID_PRIORITY"
    INVALID_RESUME = "INVALID_RESUME"
    UNAUTHORIZED = "UNAUTHORIZED"
    BUSY = "BUSY"
    NOT_READY = "NOT_READY"
    NODE_LOST = "NODE_LOST"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    RING_FAULT = "RING_FAULT"
    INTERNAL = "INTERNAL"


class MdiError(Exception):
    """Base class of errors that carry an ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestError(MdiError):
    """A request was refused or failed; other requests are unaffected."""


class ModelError(RuntimeError):
    """A model cannot be found, prepared or served; the message says what to do."""


class ConfigError(ValueError):
    """The cluster config is invalid; the message names the key and the fix."""


class ActivationRejected(Exception):
    """A ring message was dropped by a node; `cause` is the NodeStatus counter name."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail
