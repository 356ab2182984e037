"""Volunteers behind a real NAT, built in network namespaces (issue 10; topology: benchmarks/netns.py).

Bootstrap and a public peer in the public namespace, a NATed peer (and later a late NATed joiner) in
the home namespace behind the router's MASQUERADE. One swarm serves several checks: the NATed peer
joins as a client, all fuse at every boundary and end equal to the `p2pcold local` reference, and a
late NATed joiner downloads the state; then a second bootstrap with its relay off refuses a NATed peer
in bounded time. Skipped without root, `ip netns` or iptables. Every process is reaped and every
namespace deleted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.netns import HOME_IP, PUBLIC_IP, NatTopology, missing_requirement
from swarm_cli import toy_recipes, write_run_config
from test_swarm_modes import assert_close, final_body, reference_body

pytestmark = [pytest.mark.network, pytest.mark.timeout(360)]

BOOTSTRAP_PORT, NO_RELAY_BOOTSTRAP_PORT = 31337, 31338
LATE_JOINER = Path(__file__).with_name("nat_late_joiner.py")


def _connect(topology: NatTopology, ns: str, ip: str, port: int) -> str:
    """`ok`, or the errno name of a TCP connection from namespace `ns` to ip:port."""
    code = (
        "import errno, socket\ns = socket.socket(); s.settimeout(3)\n"
        f"try:\n    s.connect(({ip!r}, {port})); print('ok')\n"
        "except OSError as e:\n    print(errno.errorcode.get(e.errno, 'timeout'))"
    )
    done = subprocess.run([*topology.exec_in(ns), sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


@pytest.fixture
def nat(swarm):
    missing = missing_requirement()
    if missing:
        pytest.skip(missing)
    topology = NatTopology()
    try:
        try:
            topology.create()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            stderr = getattr(e, "stderr", b"") or b""
            pytest.skip(f"cannot build the NAT topology here: {' '.join(e.cmd)}: {stderr.decode(errors='replace').strip()}")
        yield topology
    finally:
        swarm.reap()  # the processes inside first: a namespace with live processes outlives `ip netns del`
        topology.delete()


def test_nated_peer_fuses_through_the_relay_and_matches_the_reference(swarm, nat, tmp_path, tiny_model_dir):
    recipes = toy_recipes(tmp_path, 3)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes[:2], iterations=2, swarm={"min_group_size": 2})
    public, home = nat.exec_in(nat.public), nat.exec_in(nat.home)

    maddr = swarm.bootstrap(config, "--host", PUBLIC_IP, "--port", str(BOOTSTRAP_PORT), launcher=public)
    # the topology: home reaches the public side through the NAT; the public side has no route into home
    assert _connect(nat, nat.home, PUBLIC_IP, BOOTSTRAP_PORT) == "ok"
    assert _connect(nat, nat.public, HOME_IP, BOOTSTRAP_PORT) == "ENETUNREACH"
    peers = {
        "public": swarm.peer("public", config, recipes[0], maddr, "--host", PUBLIC_IP, launcher=public),
        "nated": swarm.peer("nated", config, recipes[1], maddr, "--host", "0.0.0.0", launcher=home),
    }
    swarm.wait_for_log("nated", r"not reachable from outside: joining through a relay as a client", timeout=120, proc=peers["nated"])
    swarm.wait_for_log("public", r"reachable from outside \(.*: joining as a public member", timeout=120, proc=peers["public"])
    for name, proc in peers.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]
        for i in range(2):
            assert f"iteration {i}: fused with a group of 2" in swarm.log(name), swarm.log(name)[-3000:]
    bodies = {name: final_body(tmp_path / name) for name in peers}
    assert_close(bodies["public"], bodies["nated"], atol=1e-6)
    assert_close(bodies["public"], reference_body(config))

    # a late NATed joiner downloads the final state from the public peer (restarted on its run folder: a
    # finished peer serves its final base while a live peer is behind it)
    late_file = tmp_path / "late.pt"
    late = swarm.start("late", str(LATE_JOINER), str(config), maddr, str(late_file), program=(), launcher=home)
    swarm.wait_for_log("late", r"late joiner: mode client", timeout=120, proc=late)
    donor = swarm.peer("donor", config, recipes[0], maddr, "--host", PUBLIC_IP, run_dir=tmp_path / "public", launcher=public)
    assert swarm.wait(late, "late", timeout=180) == 0, swarm.log("late")[-3000:] + swarm.log("donor")[-3000:]
    assert swarm.wait(donor, "donor", timeout=60) == 0, swarm.log("donor")[-3000:]
    downloaded = torch.load(late_file)
    assert downloaded["iteration"] == 2
    assert_close(downloaded["body"], bodies["public"], atol=1e-6)

    # relays off: a NATed peer is refused with one line that says what to do, in bounded time
    no_relay = swarm.bootstrap(
        config, "--host", PUBLIC_IP, "--port", str(NO_RELAY_BOOTSTRAP_PORT), "--relay", "off", "--run-id", "no-relay", name="no-relay", launcher=public
    )
    started = time.monotonic()
    refused = swarm.peer("refused", config, recipes[2], no_relay, "--host", "0.0.0.0", "--run-id", "no-relay", launcher=home)
    assert swarm.wait(refused, "refused", timeout=120) == 2
    elapsed = time.monotonic() - started
    errors = [line for line in swarm.log("refused").splitlines() if line.startswith("p2pcold: error:")]
    assert len(errors) == 1 and "no swarm member offers a relay" in errors[0] and "--announce" in errors[0], swarm.log("refused")[-3000:]
    assert "Traceback" not in swarm.log("refused")
    print(f"refused in {elapsed:.1f} s")
