"""Network namespaces for the tests and benchmarks that need real links: a NAT and a shaped star.

NatTopology, for tests/integration/test_nat.py and benchmarks/nat_fusion.py:

    public namespace 10.77.0.2
        | veth 10.77.0.0/25
    router namespace: forwards, MASQUERADEs 10.77.0.128/25 going out
        | veth 10.77.0.128/25
    home namespace 10.77.0.130: can connect out, nobody can connect in (no route)

Nothing is routed to the host's network: every address lies in 10.77.0.0/24, which the project's test
rules reserve for namespaces, split in two halves. The public side cannot use 198.18.0.0/24, the other
reserved range: libp2p counts 198.18.0.0/15 (the benchmark range) as unroutable and drops it from its
peer routing, so peers there cannot find each other (`routing: not found`, even inside one namespace).
Needs root, `ip` and `iptables`.

StarTopology, for benchmarks/links.py: K peer namespaces, each behind one veth to a bridge in a switch
namespace (10.77.1.0/24), with both directions of every peer's veth shaped by `tc tbf` at one rate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

PUBLIC_IP, ROUTER_PUBLIC_IP, HOME_IP, ROUTER_HOME_IP = "10.77.0.2", "10.77.0.1", "10.77.0.130", "10.77.0.129"
HOME_NETWORK = "10.77.0.128/25"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def missing_requirement(tools: tuple[str, ...] = ("ip", "iptables")) -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 iptables)"
    return None


class _Namespaces:
    """Namespaces made by one topology; `delete` removes them all (and with them their veths)."""

    def __init__(self) -> None:
        self.suffix = uuid.uuid4().hex[:6]
        self.created: list[str] = []

    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.created.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def exec_in(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)

    def delete(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veths (and their peers)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()


class NatTopology(_Namespaces):
    """The three namespaces, their veths and the router's MASQUERADE rule; `delete` removes them all."""

    def __init__(self) -> None:
        super().__init__()
        suffix = self.suffix
        self.public, self.router, self.home = (f"p2pc-{role}-{suffix}" for role in ("pub", "rtr", "home"))
        self.veths = {name: f"pc{suffix}{name}" for name in ("p", "rp", "h", "rh")}  # at most 15 characters

    def create(self) -> None:
        v = self.veths
        for ns in (self.public, self.router, self.home):
            self._add_namespace(ns)
        # each veth pair is created straight inside its two namespaces: the host's network never sees it
        _run("ip", "link", "add", v["p"], "netns", self.public, "type", "veth", "peer", "name", v["rp"], "netns", self.router)
        _run("ip", "link", "add", v["h"], "netns", self.home, "type", "veth", "peer", "name", v["rh"], "netns", self.router)
        for ns, dev, address in (
            (self.public, v["p"], f"{PUBLIC_IP}/25"),
            (self.router, v["rp"], f"{ROUTER_PUBLIC_IP}/25"),
            (self.router, v["rh"], f"{ROUTER_HOME_IP}/25"),
            (self.home, v["h"], f"{HOME_IP}/25"),
        ):
            _run("ip", "-n", ns, "addr", "add", address, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", self.home, "route", "add", "default", "via", ROUTER_HOME_IP)
        _run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", self.router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", HOME_NETWORK, "-o", v["rp"], "-j", "MASQUERADE")


SWITCH_IP = "10.77.1.1"  # the bridge's own address, in the switch namespace: where the bootstrap listens
# tbf's bucket: above a 64 KiB GSO packet (veths segment late, so one skb can be that large). A full
# bucket leaves at once, unshaped: 256 KB, under 1 % of the smallest exchange measured (tens of MB)
SHAPER_BURST = "256kb"
SHAPER_LATENCY = "100ms"  # the queue tbf keeps before dropping: bytes, not delay (nothing delays a packet)


def star_peer_ip(index: int) -> str:
    return f"10.77.1.{10 + index}"


class StarTopology(_Namespaces):
    """A switch namespace with a bridge (SWITCH_IP) and `peers` namespaces, each behind its own veth.

    Peer i's upload leaves through `peer_veth(i)` in its namespace and its download through the
    switch's end `switch_veth(i)`; `shape` puts a token bucket on both, so each direction of each
    link carries at most the rate. The kernel here has no `netem`: no delay or loss is emulated."""

    def __init__(self, peers: int) -> None:
        super().__init__()
        self.peers = peers
        self.switch = f"p2pc-sw-{self.suffix}"
        self.namespaces = [f"p2pc-p{i}-{self.suffix}" for i in range(peers)]

    def peer_veth(self, index: int) -> str:
        return f"pc{self.suffix}p{index}"  # at most 15 characters

    def switch_veth(self, index: int) -> str:
        return f"pc{self.suffix}s{index}"

    def create(self) -> None:
        self._add_namespace(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "addr", "add", f"{SWITCH_IP}/24", "dev", "br0")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index, ns in enumerate(self.namespaces):
            self._add_namespace(ns)
            peer, switch = self.peer_veth(index), self.switch_veth(index)
            # created straight inside the two namespaces: the host's network never sees it
            _run("ip", "link", "add", peer, "netns", ns, "type", "veth", "peer", "name", switch, "netns", self.switch)
            _run("ip", "-n", ns, "addr", "add", f"{star_peer_ip(index)}/24", "dev", peer)
            _run("ip", "-n", ns, "link", "set", peer, "up")
            _run("ip", "-n", self.switch, "link", "set", switch, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", switch, "up")

    def shape(self, rate_mbit: float) -> None:
        """Each direction of each peer's link at `rate_mbit` (replaces the previous rate)."""
        for index, ns in enumerate(self.namespaces):
            for where, dev in ((ns, self.peer_veth(index)), (self.switch, self.switch_veth(index))):
                bucket = ("rate", f"{rate_mbit}mbit", "burst", SHAPER_BURST, "latency", SHAPER_LATENCY)
                _run("tc", "-n", where, "qdisc", "replace", "dev", dev, "root", "tbf", *bucket)

    def link_bytes(self) -> list[dict[str, int]]:
        """Per peer, the bytes its shaped link has carried so far: {"up", "down"}, as tbf counts them
        (every packet's headers included; a veth's own counters see a GSO burst's headers once)."""
        switch = self._shaped_bytes(self.switch)
        return [
            {"up": self._shaped_bytes(ns)[self.peer_veth(i)], "down": switch[self.switch_veth(i)]}
            for i, ns in enumerate(self.namespaces)
        ]

    def downloaded_bytes(self) -> int:
        """Bytes all peers have downloaded so far: one `tc` call, cheap enough to sample often."""
        return sum(self._shaped_bytes(self.switch).values())

    def _shaped_bytes(self, ns: str) -> dict[str, int]:
        command = ["tc", "-n", ns, "-s", "-j", "qdisc", "show"]
        out = subprocess.run(command, check=True, capture_output=True, timeout=30).stdout
        return {q["dev"]: q["bytes"] for q in json.loads(out) if q["kind"] == "tbf"}
