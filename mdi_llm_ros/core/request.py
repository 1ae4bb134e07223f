"""The request contract: what a caller asks, what it gets back, and which values are valid.

This module imports neither torch nor rclpy: robot clients, the CLI and the coordinator
all check requests with the same table of limits (`LIMITS`) and the same messages, so a
value that the wire could not carry (a uint32 field given 2**32 + 4) is refused before it
is sent, with the code the coordinator would give, instead of wrapping around.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Callable

from .errors import ErrorCode, RequestError

UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_PROMPT_CHARS = 1_000_000
MAX_PRIORITY = 255                 # uint8 on the wire
MAX_RESUME_TOKENS = 1_000_000


@dataclass(frozen=True)
class Limit:
    """The valid range of one numeric request field, and the code a value outside it gets."""

    code: str
    low: float
    high: float
    meaning: str          # what the range means, for the message

    def check(self, name: str, value, integer: bool) -> None:
        ok_type = (isinstance(value, int) and not isinstance(value, bool)) if integer else \
            (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok_type:
            kind = "an integer" if integer else "a number"
            raise RequestError(self.code, f"{name} must be {kind} ({self.meaning}), got {value!r}")
        if (not integer and not math.isfinite(value)) or not self.low <= value <= self.high:
            raise RequestError(self.code, f"{name} must be {self.meaning}, got {value!r}")


# One table for every side: the wire type's range where it is narrower than the meaning.
LIMITS: dict[str, Limit] = {
    "max_new_tokens": Limit(ErrorCode.INVALID_MAX_NEW_TOKENS, 1, UINT32_MAX, f"in 1..{UINT32_MAX}"),
    "temperature": Limit(ErrorCode.INVALID_TEMPERATURE, 0.0, FLOAT32_MAX,
                         "a finite number >= 0 (0 = greedy) that fits a float32"),
    "top_k": Limit(ErrorCode.INVALID_TOP_K, 0, INT32_MAX, f"in 0..{INT32_MAX} (0 = off)"),
    "top_p": Limit(ErrorCode.INVALID_TOP_P, math.ulp(0.0), 1.0, "in (0, 1] (1 = off)"),
    "seed": Limit(ErrorCode.INVALID_SEED, -1, INT64_MAX, f">= 0 and <= {INT64_MAX}, or -1 for a random seed"),
    "priority": Limit(ErrorCode.INVALID_PRIORITY, 0, MAX_PRIORITY, f"in 0..{MAX_PRIORITY} (0 = normal)"),
}
INTEGER_FIELDS = ("max_new_tokens", "top_k", "seed", "priority")


@dataclass(frozen=True)
class GenerateParams:
    """One request as the service, the action and the CLI give it (defaults: srv/Generate.srv)."""

    prompt: str
    use_chat_template: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1
    stop: tuple[str, ...] = field(default_factory=tuple)
    parse_special_tokens: bool = False     # special tokens written in the prompt become control tokens
    priority: int = 0                       # higher is served sooner
    resume_token_ids: tuple[int, ...] = field(default_factory=tuple)   # tokens already received


def defaults() -> GenerateParams:
    """The default of every field (prompt empty): one place for the CLI's and the config's defaults."""
    return GenerateParams(prompt="")


def check_text(name: str, text: str) -> None:
    r"""Refuse text the wire or the tokenizer would change silently: NUL (DDS strings end there),
    other control characters than \n \r \t, and replacement or surrogate characters.
    """
    if "\ufffd" in text or any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise RequestError(ErrorCode.INVALID_TEXT,
                           f"{name} contains invalid UTF-8 (replacement or surrogate characters)")
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\n\r\t"), None)
    if bad is not None:
        what = "a NUL character" if bad == "\x00" else f"control character {bad!r}"
        raise RequestError(ErrorCode.INVALID_TEXT, f"{name} contains {what}; only \\n, \\r and \\t are allowed")


def validate_params(p: GenerateParams, max_context: int | None = None) -> None:
    """Refuse a request whose fields are out of range, with a code naming the field.

    `max_context` None: the checks a client can make before sending (every field against its
    range on the wire); the coordinator also checks max_new_tokens against its context.
    """
    if not isinstance(p.prompt, str) or not p.prompt.strip():
        raise RequestError(ErrorCode.EMPTY_PROMPT, "prompt is empty; send some text to continue")
    if len(p.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(ErrorCode.PROMPT_TOO_LONG,
                           f"prompt has {len(p.prompt)} characters (max {MAX_PROMPT_CHARS})")
    check_text("prompt", p.prompt)
    for name, limit in LIMITS.items():
        limit.check(name, getattr(p, name), name in INTEGER_FIELDS)
    if max_context is not None and p.max_new_tokens > max_context:
        raise RequestError(ErrorCode.INVALID_MAX_NEW_TOKENS,
                           f"max_new_tokens must be in 1..{max_context} (the model context), got {p.max_new_tokens}")
    if not isinstance(p.stop, (tuple, list)) or len(p.stop) > MAX_STOP_STRINGS:
        raise RequestError(ErrorCode.INVALID_STOP, f"{len(p.stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for s in p.stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
            raise RequestError(ErrorCode.INVALID_STOP,
                               f"stop string {str(s)[:20]!r} must have 1..{MAX_STOP_LENGTH} characters")
        check_text("a stop string", s)
    if len(p.resume_token_ids) > MAX_RESUME_TOKENS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX for t in p.resume_token_ids):
        raise RequestError(ErrorCode.INVALID_RESUME,
                           "resume_token_ids must be token ids (0..2**31-1) that this request already received")
    if max_context is not None and len(p.resume_token_ids) >= p.max_new_tokens:
        raise RequestError(ErrorCode.INVALID_RESUME,
                           f"{len(p.resume_token_ids)} tokens to resume from, but max_new_tokens is "
                           f"{p.max_new_tokens}: the request has already ended")


@dataclass
class GenerationResult:
    """The one terminal answer of a request (the service's response, the action's result)."""

    success: bool
    error_code: str = ""
    error_message: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""          # eos | length | stop | cancelled | error
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    interrupted_s: float = 0.0       # time lost to a coordinator failover, if one happened

    @classmethod
    def failure(cls, code: str, message: str) -> "GenerationResult":
        """A request that ended (or never started) with an error code."""
        return cls(success=False, error_code=code, error_message=message, finish_reason="error")

    def summary(self) -> str:
        """One line of stats, as `mdi-llm generate` prints it after the text."""
        return (f"[{self.finish_reason}] {self.prompt_tokens} prompt + {self.generated_tokens} generated tokens, "
                f"first token {self.time_to_first_token:.2f} s, {self.tokens_per_second:.1f} tokens/s")


def field_names(cls) -> list[str]:
    """The fields of a request/result dataclass: what the message converters copy."""
    return [f.name for f in fields(cls)]


PieceCallback = Callable[[str, list[int], int], None]   # (text piece, the tokens it completes, tokens so far)
