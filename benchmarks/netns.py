"""A real NAT between network namespaces, for tests/integration/test_nat.py and benchmarks/nat_fusion.py.

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
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

PUBLIC_IP, ROUTER_PUBLIC_IP, HOME_IP, ROUTER_HOME_IP = "10.77.0.2", "10.77.0.1", "10.77.0.130", "10.77.0.129"
HOME_NETWORK = "10.77.0.128/25"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 iptables)"
    return None


class NatTopology:
    """The three namespaces, their veths and the router's MASQUERADE rule; `delete` removes them all."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.public, self.router, self.home = (f"p2pc-{role}-{suffix}" for role in ("pub", "rtr", "home"))
        self.veths = {name: f"pc{suffix}{name}" for name in ("p", "rp", "h", "rh")}  # at most 15 characters
        self.created: list[str] = []

    def create(self) -> None:
        v = self.veths
        for ns in (self.public, self.router, self.home):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
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

    def exec_in(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)

    def delete(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veths (and their peers)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()
