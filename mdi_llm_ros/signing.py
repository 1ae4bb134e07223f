"""MACs over ROS messages, field by field (the authenticated mode, cluster.secret_file).

Any generated message is authenticated the same way: every field but `mac`, in declaration
order, nested messages and sequences included, each as the receiver will see it (a float32
field as float32). The sender fills the message, then seals it; the receiver checks the MAC
before it believes anything in it. Torch-free: robot clients use it.
"""
from __future__ import annotations

import array
import struct
import time

from .core.auth import REPLAYED, STALE, UNAUTHENTICATED, NonceGuard, ReplayGuard, mac, new_nonce, same

_BYTES = ("uint8", "octet", "byte", "char")


def _canonical(value, typ: str):
    if hasattr(value, "get_fields_and_field_types"):
        return fields_of(value)
    if typ.startswith("sequence<") or typ.endswith("]"):
        inner = (typ[len("sequence<"):].split(",")[0].rstrip(">") if typ.startswith("sequence<")
                 else typ[:typ.index("[")])
        if inner in _BYTES:
            return memoryview(value).cast("B") if len(value) else b""
        return [_canonical(v, inner) for v in value]
    if typ == "float":
        return struct.unpack("<f", struct.pack("<f", value))[0]
    if typ == "double":
        return float(value)
    return value


_PLAIN = ("int", "uint", "bool", "string", "boolean")
_FIELDS: dict[type, list[tuple[str, str, bool]]] = {}


def _fields(cls) -> list[tuple[str, str, bool]]:
    """(name, type, plain) of a message type's fields but `mac`, once per type: a plain field (an
    integer, bool or string) is its own canonical value, whatever the message.
    """
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = [(name, typ, typ.startswith(_PLAIN) and "<" not in typ and "[" not in typ)
                                 for name, typ in cls.get_fields_and_field_types().items() if name != "mac"]
    return fields


def fields_of(msg) -> list:
    """Every field of a message but `mac`, as (name, value) pairs flattened, in declaration order."""
    out: list = []
    for name, typ, plain in _fields(type(msg)):
        value = getattr(msg, name)
        out += [name, value if plain else _canonical(value, typ)]
    return out


def seal(msg, key: bytes, *bound) -> None:
    """Set msg.mac over its fields and `bound` (values it answers to, e.g. the request's nonce)."""
    msg.mac = array.array("B", mac(key, [*bound, *fields_of(msg)]))


def is_sealed(msg, key: bytes, *bound) -> bool:
    return len(msg.mac) > 0 and same(msg.mac, mac(key, [*bound, *fields_of(msg)]))


class Gate:
    """What a node lets in from a topic in the authenticated mode: a correct MAC, a counter above
    the last one from the same sender, a time within max_age_s. Returns the drop cause or None.
    """

    def __init__(self, key: bytes, max_age_s: float) -> None:
        self.key = key
        self.replay = ReplayGuard(max_age_s)

    def check(self, msg, sender: int, counter: int, stamp_ns: int) -> str | None:
        if not is_sealed(msg, self.key):
            return UNAUTHENTICATED
        return self.replay.check(sender, counter, stamp_ns)

    def check_batch(self, msg) -> str | None:
        """An ActivationBatch (sender, counter and stamp_ns are its own fields)."""
        return self.check(msg, msg.sender, msg.counter, msg.stamp_ns)

    def check_status(self, msg) -> str | None:
        """A NodeStatus: its process (started_at_ns) is the sender."""
        return self.check(msg, msg.started_at_ns, msg.counter, msg.stamp.sec * 10**9 + msg.stamp.nanosec)


class RequestGate:
    """The coordinator's check of /generate requests and /generate_stream goals: sealed with the
    team's key, and neither replayed (their nonce seen before) nor stale. Returns why not, or None.
    """

    def __init__(self, key: bytes, max_age_s: float) -> None:
        self.key = key
        self.nonces = NonceGuard(max_age_s)

    def refuse(self, request) -> str | None:
        if not is_sealed(request, self.key):
            return ("this cluster serves only callers that hold the team's key (cluster.secret_file): the "
                    "request carries no valid MAC; give the client the same key file as the cluster")
        cause = self.nonces.check(request.nonce, request.stamp_ns)
        if cause == STALE:
            return ("the request's time is more than cluster.auth_max_age_s away from the coordinator's "
                    "clock; synchronise the clocks (NTP/chrony) of the devices and the caller")
        if cause == REPLAYED:
            return "this request was sent before (its nonce was seen): a replayed request is refused"
        return None


def seal_request(msg, key: bytes) -> int:
    """Give a request or goal a fresh nonce and time, seal it, and return the nonce its answer binds."""
    msg.nonce, msg.stamp_ns = new_nonce(), time.time_ns()
    seal(msg, key)
    return msg.nonce
