"""The authenticated mode's pieces: key files, MACs over messages as they travel, replay guards."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from mdi_llm_ros.core import auth
from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.errors import ConfigError


def test_secret_new_writes_an_owner_only_key(tmp_path):
    path = tmp_path / "team.key"
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "secret", "new", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = auth.load_key(path)
    assert len(key) == auth.KEY_BYTES
    again = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "secret", "new", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists already" in again.stderr and auth.load_key(path) == key


def test_a_bad_key_file_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="mdi-llm secret new"):
        auth.load_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_text("abcd\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        auth.load_key(short)
    shared = auth.new_key_file(tmp_path / "shared.key")
    os.chmod(shared, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.load_key(shared)


def test_secret_file_is_resolved_next_to_the_config(tmp_path):
    auth.new_key_file(tmp_path / "keys" / "team.key")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("cluster: {secret_file: keys/team.key}\nmodel: {name: x}\nchunks: [{name: a}]\n")
    from mdi_llm_ros.core.config import load_config
    cfg = load_config(cfg_file)
    assert cfg.secret_file == str(tmp_path / "keys" / "team.key") and len(cfg.key()) == 32
    assert parse_config({"model": {"name": "x"}, "chunks": [{"name": "a"}]}).key() is None


def test_mac_tells_values_apart():
    key = b"k" * 32
    cases = [["ab", "c"], ["a", "bc"], [1, 2], [12], [b"\x01", 1], [[1, 2], 3], [1.0], [1], [True], ["1"]]
    macs = {auth.mac(key, c) for c in cases}
    assert len(macs) == len(cases)
    assert auth.mac(key, ["x"]) != auth.mac(b"j" * 32, ["x"])


def test_replay_guard():
    g = auth.ReplayGuard(max_age_s=5)
    now = time.time_ns()
    assert g.check(1, 1, now) is None and g.check(1, 2, now) is None
    assert g.check(1, 2, now) == auth.REPLAYED and g.check(1, 1, now) == auth.REPLAYED
    assert g.check(2, 1, now) is None                                     # counters are per sender
    assert g.check(1, 3, now - 6 * 10**9) == auth.STALE
    assert g.check(1, 3, now + 6 * 10**9) == auth.STALE                   # a clock far ahead, too
    n = auth.NonceGuard(max_age_s=5)
    assert n.check(77, now) is None and n.check(77, now) == auth.REPLAYED and n.check(78, now - 10**10) == auth.STALE


@pytest.mark.ros
def test_messages_are_sealed_as_they_arrive():
    """A MAC covers every field as the receiver sees it (float32 fields as float32), nested hops and
    their bytes included; any change breaks it."""
    from rclpy.serialization import deserialize_message, serialize_message

    from mdi_llm_ros.convert import fill_request
    from mdi_llm_ros.core.request import GenerateParams
    from mdi_llm_ros.msg import Activation, ActivationBatch, NodeStatus
    from mdi_llm_ros.signing import Gate, is_sealed, seal, seal_request
    from mdi_llm_ros.srv import Generate
    key = b"k" * 32
    req = fill_request(Generate.Request(), GenerateParams("Hi", temperature=0.7, top_p=0.9, stop=("x",)))
    nonce = seal_request(req, key)
    arrived = deserialize_message(serialize_message(req), Generate.Request)
    assert arrived.temperature != 0.7 and is_sealed(arrived, key)       # float32 on the wire, still sealed
    arrived.max_new_tokens += 1
    assert not is_sealed(arrived, key)
    resp = Generate.Response()
    resp.text = "ok"
    seal(resp, key, nonce)
    assert is_sealed(resp, key, nonce) and not is_sealed(resp, key, nonce + 1)

    hop = Activation()
    hop.request_id, hop.shape, hop.data = 5, [1, 1, 2], b"\x00" * 8
    batch = ActivationBatch()
    batch.hops, batch.sender, batch.counter, batch.stamp_ns = [hop], 9, 1, time.time_ns()
    seal(batch, key)
    gate = Gate(key, 30)
    got = deserialize_message(serialize_message(batch), ActivationBatch)
    assert gate.check_batch(got) is None and gate.check_batch(got) == auth.REPLAYED
    got.hops[0].data[3] = 1
    got.counter = 2
    assert gate.check_batch(got) == auth.UNAUTHENTICATED
    status = NodeStatus()
    status.name, status.started_at_ns, status.counter = "a", 3, 1
    status.stamp.sec = int(time.time())
    assert gate.check_status(status) == auth.UNAUTHENTICATED
    seal(status, key)
    assert gate.check_status(status) is None
