"""The team's key: HMAC-SHA256 over every message, and replay protection (cluster.secret_file).

The Fast DDS of the PyPI wheels has no security plugins (no SROS2), so authentication is
done here, with Python's standard library: every ring message, heartbeat, request and
result carries a MAC under the key that every device and every allowed caller holds.
Messages also carry their sender, a counter that only grows and the time they were sent,
so a recorded message sent again, or one older than `max_age_s`, is refused as well.
What is not protected: DDS discovery, and the payloads' secrecy (nothing is encrypted).
Imports neither torch nor rclpy: robot clients use it too.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

KEY_BYTES = 32
MAC_BYTES = 32
DEFAULT_MAX_AGE_S = 30.0
# drop causes counted in NodeStatus
UNAUTHENTICATED, REPLAYED, STALE = "unauthenticated", "replayed", "stale"


def new_key_file(path: str | os.PathLike, force: bool = False) -> Path:
    """Write a new random key (hex) readable by its owner only (0600)."""
    p = Path(path)
    if p.exists() and not force:
        raise ConfigError(f"{p} exists already; remove it first (every device and client must then get the "
                          "new one) or choose another file")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(p, 0o600)
    return p


def load_key(path: str | os.PathLike) -> bytes:
    """The key in a file written by `mdi-llm secret new`; refuses a missing, malformed or
    world-readable one, saying what to do.
    """
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cluster.secret_file: cannot read {p} ({exc.strerror}); create it with "
                          f"`mdi-llm secret new {p}` and copy it to every device and client") from exc
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"cluster.secret_file: {p} can be read by other users; `chmod 600 {p}`")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError(f"cluster.secret_file: {p} holds no key of at least 16 bytes in hex; "
                          f"write one with `mdi-llm secret new {p}`")
    return key


def _encode(value, parts: list) -> None:
    """One value as MAC input, unambiguously (type tag, length, bytes), appended to `parts`."""
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "buffer_info"):
        view = memoryview(value).cast("B")
        parts.append(b"b" + len(view).to_bytes(8, "little"))
        parts.append(view)
    elif isinstance(value, str):
        data = value.encode()
        parts.append(b"s" + len(data).to_bytes(8, "little") + data)
    elif isinstance(value, bool):
        parts.append(b"t" if value else b"f")
    elif isinstance(value, int):
        parts.append(b"i" + value.to_bytes(16, "little", signed=True))
    elif isinstance(value, float):
        parts.append(b"d" + struct.pack("<d", value))
    elif isinstance(value, (list, tuple)):
        parts.append(b"l" + len(value).to_bytes(8, "little"))
        for v in value:
            _encode(v, parts)
    else:
        raise TypeError(f"cannot authenticate a {type(value).__name__}")


def mac(key: bytes, values: Iterable) -> bytes:
    """HMAC-SHA256 of a sequence of values (ints, floats, strings, bytes, lists of these), fed to
    the hash as one buffer (a ring message's many small fields cost one call, not one each).
    """
    parts: list = []
    for v in values:
        _encode(v, parts)
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def same(a, b) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))


class Sealer:
    """The sending side: a counter that only grows, under a lock (several threads may send)."""

    def __init__(self, key: bytes, sender: int) -> None:
        self.key = key
        self.sender = sender
        self.counter = 0
        self.lock = threading.Lock()

    def next(self) -> tuple[int, int]:
        """(counter, time in ns) for the next message; call with `lock` held while it is sent,
        so that messages leave in counter order.
        """
        self.counter += 1
        return self.counter, time.time_ns()


class ReplayGuard:
    """The receiving side: refuses a message older than max_age_s (or that far in the future:
    clocks of the devices must agree that closely), and one whose counter is not above the last
    seen from its sender.
    """

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S, senders: int = 4096) -> None:
        self.max_age_ns = int(max_age_s * 1e9)
        self.senders = senders
        self._last: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, sender: int, counter: int, stamp_ns: int) -> str | None:
        """None if fresh (and record it), else the drop cause."""
        if abs(time.time_ns() - stamp_ns) > self.max_age_ns:
            return STALE
        with self._lock:
            if counter <= self._last.get(sender, 0):
                return REPLAYED
            self._last[sender] = counter
            self._last.move_to_end(sender)
            while len(self._last) > self.senders:
                self._last.popitem(last=False)
        return None


class NonceGuard:
    """Requests carry a random nonce: one seen within max_age_s is a replay."""

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.max_age_ns = int(max_age_s * 1e9)
        self._seen: OrderedDict[int, int] = OrderedDict()    # nonce -> stamp, oldest first
        self._lock = threading.Lock()

    def check(self, nonce: int, stamp_ns: int) -> str | None:
        now = time.time_ns()
        if abs(now - stamp_ns) > self.max_age_ns:
            return STALE
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_age_ns:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return REPLAYED
            self._seen[nonce] = now
        return None


def new_nonce() -> int:
    return secrets.randbits(63) + 1
