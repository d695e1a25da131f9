"""Ray nodes with their own network stacks on one host (Linux network namespaces; needs root and `ip`).

Two namespaces, a head and a worker, each with one veth whose other end is on a bridge in the root
namespace; addresses 10.X.Y.1 (head), .2 (worker), .254 (the bridge, so this process reaches both).
`ray start` runs inside each namespace on its own address, and Shoal's gateway runs in the head's,
so every request to a runner on the worker crosses the veth link. Namespaces have their own ports:
nothing here can collide with another Ray cluster on the host (tests/test_ray_cluster.py).

A partition is the worker's veth set down: the worker, its raylet and its runners stay alive but
unreachable. Loss and latency stand in for `tc netem`, which this kernel lacks: `loss()` drops a
share of the packets on a namespace's veth at random (nft `numgen`), `delayed()` sends connections to
one port through a relay that holds each chunk for a set time (an nft `redirect` to
tests/delayrelay.py in that namespace).

`close()` SIGKILLs every process in the namespaces (`ip netns pids`) before deleting them, so a
failed test leaves no Ray process, runner, relay, namespace, veth or bridge behind.

Used by tests/test_ray_netns.py and benchmarks/ray_cluster.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY_PORT = 6379  # each namespace has its own port space
FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "200",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


def why_not() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    name = f"shoal-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def why_no_nft() -> str | None:
    """Why loss and latency cannot be put on a link here, or None."""
    if shutil.which("nft") is None:
        return "needs nftables' `nft` (apt-get install nftables)"
    return None


def only_where(address: str, code: str) -> str:
    """A sitecustomize.py (for a runner's PYTHONPATH) that runs `code` only in the namespace where
    `address` is local: on that node's network stack, not on the others'."""
    return f"""import socket, time
probe = socket.socket()
try:
    probe.bind(("{address}", 0))
except OSError:
    pass
else:
    {code}
finally:
    probe.close()
"""


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


class NetnsCluster:
    """The namespaces and links; Ray nodes and the gateway are started in them with `popen`."""

    def __init__(self, tag: str | None = None) -> None:
        n = os.getpid() if tag is None else abs(hash(tag))
        self.tag = f"{n % 100000}"
        self.prefix = f"10.{200 + n % 50}.{(n // 50) % 250}"
        self.bridge = f"shb{self.tag}"
        self.head_ns, self.worker_ns = f"shoal-{self.tag}-head", f"shoal-{self.tag}-worker"
        self.head_ip, self.worker_ip = f"{self.prefix}.1", f"{self.prefix}.2"
        self.tmp = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))  # Ray's socket paths must be short
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    @property
    def ray_address(self) -> str:
        return f"{self.head_ip}:{RAY_PORT}"

    def veth(self, ns: str) -> tuple[str, str]:
        """(root end, namespace end) of that namespace's veth."""
        side = "h" if ns == self.head_ns else "w"
        return f"sh{side}{self.tag}", "eth0"

    def up(self) -> NetnsCluster:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._made.append("bridge")
            ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for ns, address in ((self.head_ns, self.head_ip), (self.worker_ns, self.worker_ip)):
                ip("netns", "add", ns)
                self._made.append(ns)
                outer, inner = self.veth(ns)
                ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
                ip("link", "set", outer, "master", self.bridge)
                ip("link", "set", outer, "up")
                ip("addr", "add", f"{address}/24", "dev", inner, ns=ns)
                ip("link", "set", inner, "up", ns=ns)
                ip("link", "set", "lo", "up", ns=ns)
        except BaseException:
            self.close()
            raise
        return self

    def popen(
        self, ns: str, argv: list[str], log: str, env: dict[str, str] | None = None, mount: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in namespace `ns` (its own session; output to self.tmp/log). With `mount`, in a
        private mount namespace too, where that folder is covered by an empty tmpfs (files this
        node cannot see, as on another machine)."""
        if mount is not None:
            argv = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', mount, *argv]
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - the process outlives this call
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_TMPDIR": str(self.tmp), **(env or {})},
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def ray_start(
        self, ns: str, env: dict[str, str], num_cpus: int = 1, mount: str | None = None, log: str = ""
    ) -> subprocess.Popen[bytes]:
        ray_bin = str(Path(sys.executable).parent / "ray")
        head = ns == self.head_ns
        argv = [ray_bin, "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus}",
                f"--node-ip-address={self.head_ip if head else self.worker_ip}"]  # fmt: skip
        argv += (
            ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
            if head
            else [f"--address={self.ray_address}"]
        )
        return self.popen(ns, argv, log or f"ray-{'head' if head else 'worker'}.log", env, mount)

    def link(self, ns: str, up: bool) -> None:
        """The namespace's veth up or down (down: a partition; every process there stays alive)."""
        ip("link", "set", self.veth(ns)[1], "up" if up else "down", ns=ns)

    def nft(self, ns: str, *args: str, rules: str | None = None) -> str:
        """`nft` in the namespace; `rules` is a ruleset read from stdin (`nft -f -`)."""
        argv = ["ip", "netns", "exec", ns, "nft", *(["-f", "-"] if rules is not None else args)]
        done = subprocess.run(argv, input=rules, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}\n{rules or ''}")
        return done.stdout

    def loss(self, ns: str, percent: int) -> None:
        """Drop `percent` % of the packets each way on the namespace's veth, at random (0: none)."""
        self.nft(ns, rules="table inet shoal_loss\ndelete table inet shoal_loss\n")  # (made, then gone)
        if percent:
            link = self.veth(ns)[1]
            drop = f"numgen random mod 100 < {percent} counter drop"
            self.nft(ns, rules=f"""table inet shoal_loss {{
                chain inbound {{ type filter hook input priority 0; iifname "{link}" {drop}; }}
                chain outbound {{ type filter hook output priority 0; oifname "{link}" {drop}; }}
            }}""")  # fmt: skip

    def dropped(self, ns: str) -> int:
        """Packets `loss()` has dropped on the namespace's veth so far."""
        listed = self.nft(ns, "list", "table", "inet", "shoal_loss")
        return sum(int(word) for word in re.findall(r"counter packets (\d+)", listed))

    def delayed(self, ns: str, port: int, source: str) -> Delay:
        """Connections from `source` to `port` in the namespace through a relay there that holds
        each chunk for `Delay.set(seconds)`, each way. Connections already open are reset (`ss -K`)
        so that they open again through it."""
        return Delay(self, ns, port, source)

    def pids(self, ns: str) -> list[int]:
        done = ip("netns", "pids", ns, check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def kill_all(self, ns: str) -> None:
        """SIGKILL every process in the namespace (Ray's workers and runners have their own process
        groups: only the namespace finds them all)."""
        for _ in range(50):
            pids = self.pids(ns)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        for ns in (self.worker_ns, self.head_ns):
            if ns in self._made:
                self.kill_all(ns)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in (self.worker_ns, self.head_ns):
            if ns in self._made:
                ip("netns", "del", ns, check=False)  # its veth goes with it
        if "bridge" in self._made:
            ip("link", "del", self.bridge, check=False)
        self._made.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Delay:
    """Latency on the way to one port of a namespace (NetnsCluster.delayed); a context manager."""

    RELAY_PORT = 9

    def __init__(self, cluster: NetnsCluster, ns: str, port: int, source: str) -> None:
        self.cluster, self.ns, self.port, self.source = cluster, ns, port, source
        self.file = cluster.tmp / f"delay-{port}"
        self.log = cluster.tmp / f"relay-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def set(self, seconds: float) -> None:
        """Seconds each chunk is held, each way (a round trip takes twice that)."""
        self.file.write_text(str(seconds))

    def events(self, name: str) -> int:
        """How often the relay logged that event (open, sent, answered, close)."""
        return self.log.read_text().split().count(name)

    def __enter__(self) -> Delay:
        self.set(0)
        relay = str(Path(__file__).with_name("delayrelay.py"))
        self.proc = self.cluster.popen(
            self.ns, [sys.executable, relay, "0.0.0.0", str(self.RELAY_PORT), str(self.file)], self.log.name
        )
        deadline = time.monotonic() + 30
        while not (self.log.exists() and "ready" in self.log.read_text().split()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        try:
            self.cluster.nft(self.ns, rules=f"""table ip shoal_delay {{
                chain pre {{ type nat hook prerouting priority dstnat;
                    ip saddr {self.source} tcp dport {self.port} redirect to :{self.RELAY_PORT}; }}
            }}""")  # fmt: skip
            self.reset()
        except BaseException:
            self.__exit__()
            raise
        return self

    def reset(self) -> None:
        """Close the connections to the port that bypass the relay (NAT applies to new ones only)."""
        ip_ = ["ip", "netns", "exec", self.ns, "ss", "-K", "-t", "state", "established"]
        subprocess.run([*ip_, f"( sport = :{self.port} and dst {self.source} )"], capture_output=True)

    def __exit__(self, *_: object) -> None:
        self.cluster.nft(self.ns, rules="table ip shoal_delay\ndelete table ip shoal_delay\n")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # its connections close: the next ones go straight to the port
            self.proc.wait(10)
