"""Emulated devices on one machine: Linux network namespaces joined by a bridge.

Each host of the lab (a "robot", or the client robot) is a network namespace
`<lab>-<host>` with one veth link `eth0` to a bridge that lives in its own
namespace `<lab>-sw` (the "access point"), so nothing is added to the machine's
own network. DDS traffic between hosts crosses these veth links as UDP; with
`rate` set, every link is rate-limited in both directions with a token bucket
(`tc qdisc tbf`), the Wi-Fi-like shaping this kind of kernel offers. `probe()`
says what the kernel offers (netem delay/loss and fq_codel are often missing).

    mdi-llm netlab up --hosts robot_a,robot_b,robot_c,client --rate 20mbit
    mdi-llm netlab exec robot_a -- mdi-llm cluster --config lab.yaml --host robot_a
    mdi-llm netlab down

Needs root (CAP_NET_ADMIN) and iproute2.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import zlib
from dataclasses import dataclass, field

DEFAULT_LAB = "mdilab"


class NetLabError(RuntimeError):
    """The lab cannot be set up here; the message says why and what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetLabError(f"`ip {' '.join(args)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _in(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetLabError(f"`{' '.join(cmd)}` in namespace {ns} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def probe() -> dict:
    """What this machine offers for the lab: namespaces, and each qdisc used to emulate Wi-Fi.

    Returns {"netns": bool, "reason": str, "tbf": bool, "netem": bool, "fq_codel": bool}.
    """
    out = {"netns": False, "reason": "", "tbf": False, "netem": False, "fq_codel": False}
    if shutil.which("ip") is None or shutil.which("tc") is None:
        out["reason"] = "iproute2 (`ip`, `tc`) is not installed"
        return out
    ns = f"mdiprobe{os.getpid()}"
    r = _ip("netns", "add", ns, check=False)
    if r.returncode != 0:
        out["reason"] = f"cannot create a network namespace ({r.stderr.strip()}); run as root (CAP_NET_ADMIN)"
        return out
    try:
        out["netns"] = True
        _in(ns, "ip", "link", "set", "lo", "up", check=False)
        for kind, args in (("tbf", ["tbf", "rate", "20mbit", "burst", "32kb", "latency", "100ms"]),
                           ("netem", ["netem", "delay", "5ms"]), ("fq_codel", ["fq_codel"])):
            r = _in(ns, "tc", "qdisc", "replace", "dev", "lo", "root", *args, check=False)
            out[kind] = r.returncode == 0
        _in(ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    finally:
        _ip("netns", "del", ns, check=False)
    return out


def describe_probe(p: dict) -> str:
    if not p["netns"]:
        return f"network namespaces: unavailable ({p['reason']})"
    missing = [k for k in ("tbf", "netem", "fq_codel") if not p[k]]
    text = "network namespaces: yes; qdiscs: " + ", ".join(
        f"{k} {'yes' if p[k] else 'no'}" for k in ("tbf", "netem", "fq_codel"))
    if "netem" in missing:
        text += " (no netem: delay and loss cannot be emulated; links are rate-limited with tbf only)"
    return text


@dataclass
class NetLab:
    """A bridge namespace plus one namespace per host, each linked to the bridge by a veth pair."""

    hosts: list[str]
    name: str = DEFAULT_LAB
    subnet: str = ""                      # "10.A.B" (a /24); derived from the name when empty
    rate: str | None = None               # e.g. "20mbit": tbf on every link, both directions
    addresses: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.subnet:
            h = zlib.crc32(self.name.encode())
            self.subnet = f"10.{200 + h % 50}.{(h >> 8) % 250}"
        for i, host in enumerate(self.hosts):
            if len(self.ns(host)) > 60 or not host.replace("_", "a").replace("-", "a").isalnum():
                raise NetLabError(f"host name {host!r} cannot name a namespace; use letters, digits, '_'")
            self.addresses[host] = f"{self.subnet}.{11 + i}"

    # --- names ---------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.name}-{host}"

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def exec_prefix(self, host: str) -> tuple[str, ...]:
        """Command prefix that runs a program on `host`."""
        return ("ip", "netns", "exec", self.ns(host))

    # --- life cycle ----------------------------------------------------------------------

    def up(self) -> "NetLab":
        """Create the namespaces, bridge and links; idempotent only via down() first."""
        p = probe()
        if not p["netns"]:
            raise NetLabError(f"cannot build the lab: {p['reason']}")
        if self.rate and not p["tbf"]:
            raise NetLabError("cannot rate-limit links: the kernel has no tbf qdisc")
        self.down()
        try:
            _ip("netns", "add", self.switch)
            _in(self.switch, "ip", "link", "set", "lo", "up")
            _in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            # No IGMP querier on this bridge: with snooping on, DDS multicast discovery could be dropped.
            _in(self.switch, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            _in(self.switch, "ip", "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ns = self.ns(host)
                _ip("netns", "add", ns)
                port = f"port{i}"
                _in(self.switch, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _in(self.switch, "ip", "link", "set", port, "master", "br0")
                _in(self.switch, "ip", "link", "set", port, "up")
                _in(ns, "ip", "link", "set", "lo", "up")
                _in(ns, "ip", "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
                _in(ns, "ip", "link", "set", "eth0", "up")
                _in(ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")   # DDS discovery multicast
            if self.rate:
                self.shape(self.rate)
            self.write_hosts_file()
            os.makedirs(os.path.dirname(state_file(self.name)), exist_ok=True)
            with open(state_file(self.name), "w") as f:
                json.dump(self.state(), f)
        except Exception:
            self.down()
            raise
        return self

    def shape(self, rate: str | None) -> None:
        """Rate-limit every link in both directions (None: remove the limit)."""
        for i, host in enumerate(self.hosts):
            for ns, dev in ((self.ns(host), "eth0"), (self.switch, f"port{i}")):
                if rate:
                    # burst must hold at least one full packet per kernel tick; the 100 ms queue
                    # absorbs DDS bursts like a Wi-Fi driver's buffer does.
                    _in(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", "32kb", "latency", "100ms")
                else:
                    _in(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        self.rate = rate
        if os.path.exists(state_file(self.name)):
            with open(state_file(self.name), "w") as f:
                json.dump(self.state(), f)

    @classmethod
    def load(cls, name: str = DEFAULT_LAB) -> "NetLab":
        """The lab `name` that `up()` created (from its state file)."""
        try:
            with open(state_file(name)) as f:
                st = json.load(f)
        except FileNotFoundError:
            raise NetLabError(f"no lab named {name!r} is up; start one with `mdi-llm netlab up`") from None
        return cls(hosts=st["hosts"], name=name, subnet=st["subnet"], rate=st["rate"])

    def write_hosts_file(self) -> None:
        """Per-namespace /etc/netns/<ns>/hosts, so host names resolve inside the lab."""
        lines = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addresses.items())
        for host in self.hosts:
            d = f"/etc/netns/{self.ns(host)}"
            os.makedirs(d, exist_ok=True)
            with open(f"{d}/hosts", "w") as f:
                f.write(lines)

    def down(self) -> list[str]:
        """Kill every process in the lab's namespaces and delete them (veths go with them)."""
        return teardown(self.name)

    def __enter__(self) -> "NetLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # --- observation ---------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes and packets each host sent and received on its link (eth0)."""
        out = {}
        for host in self.hosts:
            r = _in(self.ns(host), "cat", "/sys/class/net/eth0/statistics/tx_bytes",
                    "/sys/class/net/eth0/statistics/rx_bytes", "/sys/class/net/eth0/statistics/tx_packets",
                    "/sys/class/net/eth0/statistics/rx_packets", check=False)
            vals = [int(v) for v in r.stdout.split()] if r.returncode == 0 else [0, 0, 0, 0]
            out[host] = dict(zip(("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"), vals))
        return out

    def state(self) -> dict:
        return {"name": self.name, "hosts": self.hosts, "subnet": self.subnet, "addresses": self.addresses,
                "rate": self.rate, "switch": self.switch}


def state_file(name: str) -> str:
    return f"/run/mdi_llm_ros/netlab-{name}.json"


def lab_namespaces(name: str = DEFAULT_LAB) -> list[str]:
    r = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{name}-")]


def teardown(name: str = DEFAULT_LAB) -> list[str]:
    """Remove every namespace of lab `name` after killing what runs in it. Returns their names."""
    spaces = lab_namespaces(name)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _pids(spaces)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while pids and time.monotonic() < end:
            pids = _pids(spaces)
            time.sleep(0.1)
    for ns in spaces:
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.unlink(state_file(name))
    except FileNotFoundError:
        pass
    return spaces


def _pids(spaces: list[str]) -> list[int]:
    pids: list[int] = []
    for ns in spaces:
        r = _ip("netns", "pids", ns, check=False)
        pids += [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    return pids


def main(args) -> int:
    """`mdi-llm netlab up|down|status|exec`."""
    if args.action == "probe":
        print(describe_probe(probe()))
        return 0
    if args.action == "down":
        gone = teardown(args.name)
        print(f"removed {len(gone)} namespaces: {', '.join(gone) or '(none)'}")
        return 0
    if args.action == "status":
        spaces = lab_namespaces(args.name)
        lab = NetLab.load(args.name) if os.path.exists(state_file(args.name)) else None
        print(json.dumps({"lab": lab.state() if lab else None, "namespaces": spaces,
                          "pids": {ns: _pids([ns]) for ns in spaces},
                          "counters": lab.counters() if lab else {}}, indent=1))
        return 0
    if args.action == "up":
        hosts = [h for h in args.hosts.split(",") if h]
        lab = NetLab(hosts=hosts, name=args.name, rate=args.rate).up()
        print(describe_probe(probe()))
        for host in hosts:
            print(f"{host}\t{lab.addresses[host]}\tip netns exec {lab.ns(host)} <command>")
        print(f"links: {'rate-limited to ' + args.rate + ' (tbf)' if args.rate else 'not shaped'}; "
              f"remove with: mdi-llm netlab down --name {args.name}")
        return 0
    if args.action == "shape":
        NetLab.load(args.name).shape(args.rate)
        print(f"links {'rate-limited to ' + args.rate if args.rate else 'unshaped'}")
        return 0
    # exec
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise NetLabError("netlab exec: give a command after the host name")
    os.execvp("ip", ["ip", "netns", "exec", f"{args.name}-{args.host}", *cmd])
