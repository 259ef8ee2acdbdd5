"""Hosts of their own on one machine: network namespaces on a bridge (`ip netns`, veth pairs).

    with Network() as net:
        broker = net.host("broker")
        worker = net.host("w1")
        worker.popen(["celery", ...], env=...)   # runs inside its namespace, reaching 10.x.y.z only
        worker.link_down()                        # its cable pulled: packets dropped, sockets hang
        worker.link_up()
        net.cut(worker, broker)                   # only between these two (None: the machine)
        net.heal(worker, broker)

Every name is derived from a random tag, so two runs never touch each other's hosts, and the test
talks only to addresses of hosts it made. Everything is removed on exit (also after a failure or
Ctrl-C: `__exit__`, and an `atexit` hook for an interpreter that is being torn down). The machine
itself is the host `10.x.y.1` on the bridge: a test's own services there (a database proxy) are
reached at `Network.gateway`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class NoNamespaces(RuntimeError):
    """This machine cannot make network namespaces here (not root, no `ip`)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def can_make_namespaces() -> str | None:
    """None when namespaces can be made, else why not (one line)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"jprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()[:200]}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One host: a namespace with one link to the bridge."""

    network: Network
    name: str
    address: str
    namespace: str
    outside: str  # the veth end on the bridge (the host's "cable")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def popen(
        self, args: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts `args` inside the host (its own process group), output to `log`."""
        handle = log.open("ab")
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *args],
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        self.processes.append(process)
        return process

    def link_down(self) -> None:
        """Pulls the host's cable: its packets are dropped both ways (no reset: peers' sockets hang)."""
        _ip("link", "set", self.outside, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.outside, "up")

    def route_into_drop(self, address: str, *, add: bool) -> None:
        """Sends what this host sends to `address` into its drain, which drops it silently."""
        _ip("-n", self.namespace, "route", "add" if add else "del", f"{address}/32", "dev", DROP)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to every process it runs, SIGKILL after `timeout`."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


#: A drain in each host: one end of a veth pair whose other end is down, without ARP. Routes into
#: it drop packets without telling the sender (no `dummy` module here; a blackhole route would
#: fail the sender at once: a refusal, not a partition).
DROP = "drop0"


def _drain(name: str, *ns: str) -> None:
    _ip(*ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    _ip(*ns, "link", "set", name, "arp", "off")
    _ip(*ns, "link", "set", name, "up")  # its peer stays down: what goes in is dropped


class Network:
    """A bridge and the hosts on it, all removed on exit."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)[:5]
        # 10.<a>.<b>.0/24, picked at random among 10.200-249.x: no clash with another run.
        self.prefix = f"10.{200 + secrets.randbelow(50)}.{1 + secrets.randbelow(254)}"
        self.bridge = f"jb{self.tag}"
        self.gateway = f"{self.prefix}.1"
        self.hosts: dict[str, Host] = {}
        self._made = False

    def __enter__(self) -> Network:
        why = can_make_namespaces()
        if why:
            raise NoNamespaces(why)
        atexit.register(self.remove)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._made = True
        self.drop = f"jd{self.tag}"  # the machine's own drain, for cuts from the gateway
        _drain(self.drop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def host(self, name: str) -> Host:
        number = len(self.hosts) + 2
        namespace = f"j{self.tag}-{name}"
        outside, inside = f"jv{self.tag}{number}", f"ji{self.tag}{number}"
        address = f"{self.prefix}.{number}"
        _ip("netns", "add", namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "route", "add", "default", "via", self.gateway)
        _drain(DROP, "-n", namespace)
        host = Host(self, name, address, namespace, outside)
        self.hosts[name] = host
        return host

    def cut(self, host: Host, peer: Host | None = None, *, heal: bool = False) -> None:
        """A partition between `host` and `peer` (None: the machine, where the database's
        forwarder listens) that leaves both reaching everyone else: each one's packets to the
        other are dropped silently, so their connections hang as over a broken network path."""
        host.route_into_drop(peer.address if peer else self.gateway, add=not heal)
        if peer is not None:
            peer.route_into_drop(host.address, add=not heal)
        else:
            _ip("route", "add" if not heal else "del", f"{host.address}/32", "dev", self.drop)

    def heal(self, host: Host, peer: Host | None = None) -> None:
        self.cut(host, peer, heal=True)

    def remove(self) -> None:
        """Stops every host's processes and removes the hosts and the bridge (idempotent)."""
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.stop(timeout=5)
            # Whatever left the process group (rabbitmq-server runs its node and epmd in sessions
            # of their own, as another user) still lives in the namespace: ask it which.
            listed = _ip("netns", "pids", host.namespace, check=False)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", host.namespace, check=False)  # its veth pair goes with it
            _ip("link", "del", host.outside, check=False)
        self.hosts.clear()
        if self._made:
            _ip("link", "del", self.drop, check=False)  # its peer and routes go with it
            _ip("link", "del", self.bridge, check=False)
            self._made = False
