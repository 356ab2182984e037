"""Fusion over shaped links: a real p2pcold boundary between K peers, each behind its own link of B Mbit/s.

    sudo python -m benchmarks.links [--peers 2 4] [--rates 20 100] [--compressions none fp16 8bit]
                                    [--rounds 1] [--out benchmarks/links.json]

Run as root, on its own (never part of `make bench` or the tests). For each group size K, the network
namespaces of benchmarks/netns.py's StarTopology: a switch namespace (a bridge, and on it the bootstrap,
`p2pcold bootstrap`) and K peer namespaces behind one veth each, 10.77.1.0/24. Both directions of every
peer's veth are shaped with `tc tbf` at B Mbit/s. This kernel has no `netem`: NO delay or loss is
emulated; the links are narrow, not long.

Each peer is a benchmarks/fusion_worker.py process inside its namespace: the real offline MiniLM body
(22.7M float32 values) plus a seeded N(0, 0.001²) perturbation as its contribution, and one
`BodyAverager` per compression (as p2pcold's Peer: θ0 the reference, deltas on the wire). A boundary is
one `fuse()` per peer at the same wall-clock instant and iteration. Per (K, B, compression):

* the boundary's time: the whole fuse + load (the slowest peer's), and the all-reduce alone, from
  inside each peer's averager process (AveragerClock: its group began -> its reduce ended);
* the bandwidth bound 2(K-1)/K * P / B, P the body's serialized bytes for that compression (a peer
  sends (K-1)/K of its vector to the other reducers and returns its reduced 1/K to the K-1 others, and
  receives as much), and time / bound;
* the bytes the links carried (the tbf qdiscs' counters before and after: headers included), and when
  the transfer started and ended (sampled every SAMPLE_S), to say where the time beyond the bound goes;
* the fused body's max / mean abs error against the exact `p2pcold.fusion.aggregate` of the
  contributions (the default aggregation rule, which the reducers compute), on peer 0.

Compressions default to every value `SwarmConfig.compression` accepts, read from its type. One untimed
warm-up boundary per compression at the fastest rate opens the connections. Writes a JSON file (one
section, as in benchmarks/results.json) and prints a markdown table. Namespaces, processes and daemons
are removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

from benchmarks.common import ROOT, Worker, close_all, fmt, gather, kill_group, log, machine_info, median
from benchmarks.fusion_round import DELTA_STD
from benchmarks.netns import SWITCH_IP, StarTopology, missing_requirement, star_peer_ip
from p2pcold.config import SwarmConfig

MODULE = "benchmarks.fusion_worker"
BOOTSTRAP_PORT = 31500
MINILM_FP32_BYTES = 4 * 22.7e6  # for sizing the timeouts before the peers have loaded the body
STARTUP_TIMEOUT = 300.0  # a peer process: imports, MiniLM, its DHT, on 2 shared cores
BOOTSTRAP_TIMEOUT = 120.0  # the bootstrap writes its multiaddrs
OPEN_TIMEOUT = 300.0  # one averager per compression in every peer
CLOSE_TIMEOUT = 120.0
CHECK_TIMEOUT = 180.0  # peer 0 aggregates the K bodies exactly (once per group) and compares
SAMPLE_S = 0.2  # how often the link counters are read during a boundary
FIRST_BYTE = 256 * 1024  # bytes on all links together that mark the transfer's start (DHT chatter is less)
TCP_PORT = 31501
TCP_BASELINE_S = 8.0  # the plain-TCP baseline sends this many seconds' worth of bytes at the link's rate
TCP_TIMEOUT = 120.0


def accepted_compressions() -> list[str]:
    """Every value `SwarmConfig.compression` accepts, from its type: a new mode is measured without
    editing this file."""

    def values(annotation) -> list[str]:
        if isinstance(annotation, str):
            return [annotation]
        return [v for arg in typing.get_args(annotation) for v in values(arg)]

    return values(SwarmConfig.model_fields["compression"].annotation)


def bound_s(peers: int, vector_bytes: float, rate_mbit: float) -> float:
    """The bandwidth bound: each peer sends (and receives) 2(K-1)/K of the vector over its link."""
    return 2 * (peers - 1) / peers * vector_bytes * 8 / (rate_mbit * 1e6)


def swarm_timeouts(peers: int, slowest_rate_mbit: float) -> dict:
    """fusion_round's generous timeouts, with an all-reduce allowed 3x the slowest fp32 bound + 60 s."""
    allreduce = 3 * bound_s(peers, MINILM_FP32_BYTES, slowest_rate_mbit) + 60.0
    waits = dict(matchmaking_time=5.0, request_timeout=3.0, next_chunk_timeout=60.0, deadline=90.0)
    return {**waits, "allreduce_timeout": allreduce}


class LinkSampler:
    """Reads the bytes all peers have downloaded every SAMPLE_S, in a thread: when the transfer began
    and ended."""

    def __init__(self, topology: StarTopology) -> None:
        self.topology, self.samples = topology, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.topology.downloaded_bytes()))
            self.stop.wait(SAMPLE_S)

    def __enter__(self) -> LinkSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def window(self, since: float) -> tuple[float | None, float | None]:
        """Seconds after `since` at which the links had carried FIRST_BYTE and 99 % of the round's bytes."""
        if len(self.samples) < 2:
            return None, None
        base, total = self.samples[0][1], self.samples[-1][1] - self.samples[0][1]
        first = next((t for t, b in self.samples if b - base >= FIRST_BYTE), None)
        last = next((t for t, b in self.samples if b - base >= 0.99 * total), None)
        return (None if first is None else first - since), (None if last is None else last - since)


class Bootstrap:
    """`p2pcold bootstrap` in the switch namespace, on the bridge's address; `stop` kills its group."""

    def __init__(self, topology: StarTopology, folder: Path) -> None:
        maddrs = folder / "bootstrap.maddrs"
        cli = ["-m", "p2pcold.cli", "bootstrap", "--host", SWITCH_IP, "--port", str(BOOTSTRAP_PORT)]
        command = [*topology.exec_in(topology.switch), sys.executable, *cli, "--maddrs-file", str(maddrs)]
        self.log = folder / "bootstrap.log"
        with open(self.log, "w") as out:  # its own process group: `stop` reaps its p2pd too
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + BOOTSTRAP_TIMEOUT
        while not (maddrs.is_file() and maddrs.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the bootstrap did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.maddrs = maddrs.read_text().split()

    def stop(self) -> None:
        kill_group(self.proc)


def start_peers(topology: StarTopology, maddrs: list[str], timeouts: dict, folder: Path) -> list[Worker]:
    """One fusion_worker per peer namespace, listening on its own address; returns once all are up."""
    options = dict(size="minilm", world=topology.peers, tag=f"links-{topology.suffix}", delta_std=DELTA_STD)
    options.update(timeouts=timeouts, initial_peers=maddrs)
    ws: list[Worker] = []
    try:
        for rank, ns in enumerate(topology.namespaces):
            clock = str(folder / f"allreduce-{rank}.jsonl")
            peer_options = {**options, "rank": rank, "host": star_peer_ip(rank), "allreduce_clock": clock}
            ws.append(Worker(MODULE, peer_options, f"peer{rank}", prefix=topology.exec_in(ns)))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for w in ws:
            w.receive(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        close_all(ws)
        raise
    return ws


def boundary(
    ws: list[Worker], topology: StarTopology, compression: str, index: int, check: bool, timeout: float
) -> dict:
    """One timed boundary of every peer; raises if it failed (a failed boundary is no measurement)."""
    before = topology.link_bytes()
    start_at = time.time() + 1.0
    message = {"cmd": "round", "variant": f"p2pcold-{compression}", "index": index, "start_at": start_at}
    with LinkSampler(topology) as sampler:
        messages = [{**message, "check": check and rank == 0} for rank in range(len(ws))]
        replies = gather(ws, messages, timeout=timeout)
    after = topology.link_bytes()
    failed = [r for r in replies if not r.get("ok") or r.get("group_size") != len(ws)]
    if failed:
        why = failed[0].get("reason") or f"group of {failed[0].get('group_size')}"
        raise RuntimeError(f"{compression} boundary {index} failed: {why}")
    clocks = [r["allreduce"] for r in replies if "allreduce" in r]
    first_byte, last_byte = sampler.window(start_at)
    base = sampler.samples[0][1]
    downloaded = [(round(t - start_at, 2), round((b - base) / 1e6, 2)) for t, b in sampler.samples]
    row = {
        "time_s": max(r["elapsed_s"] for r in replies),  # fuse + load into the model, the slowest peer
        "fuse_s": max(r["fuse_s"] for r in replies),
        "copies_s": max(r["write_s"] + r["read_s"] for r in replies),  # body - θ0 in, average + θ0 out
        "late_s": max(r["late_s"] for r in replies),
        # inside the averager processes: group assembled -> this member's reduce ended, the slowest member
        "allreduce_s": max(c["reduced"] - c["began"] for c in clocks) if len(clocks) == len(ws) else None,
        # start -> the first member's group began its all-reduce
        "matchmaking_s": min(c["began"] for c in clocks) - start_at if clocks else None,
        "verdicts_s": max(c["agreed"] - c["reduced"] for c in clocks) if clocks else None,
        "first_byte_s": first_byte,  # start -> the links had carried FIRST_BYTE
        "last_byte_s": last_byte,  # start -> 99 % of the boundary's bytes
        "up_bytes": [a["up"] - b["up"] for a, b in zip(after, before)],
        "down_bytes": [a["down"] - b["down"] for a, b in zip(after, before)],
        "downloaded_mb": downloaded,  # [(s after start, MB all peers had downloaded)], every SAMPLE_S
    }
    if first_byte is not None and last_byte is not None and last_byte > first_byte:
        # what one peer's link carried per second between the transfer's first and last byte
        row["transfer_mbit"] = median(row["down_bytes"]) * 8 / (last_byte - first_byte) / 1e6
    if check:
        row["error"] = {k: replies[0][k] for k in ("max_abs_error", "mean_abs_error", "mean_abs_update")}
    return row


def measure_group(
    peers: int, rates: list[float], compressions: list[str], rounds: int, failures: list[dict]
) -> list[dict]:
    """Every (rate, compression) cell for one group size, in one topology and one set of peer processes;
    a failed boundary is appended to `failures`."""
    timeouts = swarm_timeouts(peers, min(rates))
    # a boundary never blocks longer than this
    round_timeout = timeouts["deadline"] + timeouts["allreduce_timeout"] + CHECK_TIMEOUT + 60.0
    variants = [f"p2pcold-{c}" for c in compressions]
    topology, bootstrap, ws = StarTopology(peers), None, []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            topology.create()
            bootstrap = Bootstrap(topology, Path(tmp))
            ws = start_peers(topology, bootstrap.maddrs, timeouts, Path(tmp))
            gather(ws, {"cmd": "open", "variants": variants, "group": peers}, timeout=OPEN_TIMEOUT)
            wire = ws[0].call({"cmd": "wire", "compressions": compressions}, timeout=OPEN_TIMEOUT)
            index = 0
            topology.shape(max(rates))
            for compression in compressions:  # warm-up: opens the connections, untimed
                boundary(ws, topology, compression, index, False, round_timeout)
                index += 1
            rows = []
            for rate in rates:
                topology.shape(rate)
                tcp = tcp_baseline(topology, rate)
                log(f"K={peers} B={rate:g}: plain TCP both ways carries {tcp:.1f} Mbit/s of payload")
                cells: dict[str, list[dict]] = {c: [] for c in compressions}
                for repeat in range(rounds):
                    for compression in compressions:
                        check = repeat == rounds - 1
                        try:
                            row = boundary(ws, topology, compression, index, check, round_timeout)
                        except RuntimeError as e:  # every peer answered: the processes go on to the next cell
                            log(f"K={peers} B={rate:g} {compression}: {e}")
                            cell = {"peers": peers, "rate_mbit": rate, "compression": compression}
                            failures.append({**cell, "error": str(e)})
                            continue
                        finally:
                            index += 1
                        cells[compression].append(row)
                        times = f"{row['time_s']:.2f} s (all-reduce {fmt(row['allreduce_s'])} s)"
                        log(f"K={peers} B={rate:g} {compression}: {times}")
                sizes = wire["bytes_per_vector"]
                summaries = [summarize(peers, rate, c, sizes[c], cells[c]) for c in compressions if cells[c]]
                rows += [{**summary, "tcp_payload_mbit": tcp} for summary in summaries]
            gather(ws, {"cmd": "close", "variants": variants}, timeout=CLOSE_TIMEOUT)
            return rows
        finally:
            close_all(ws)
            if bootstrap is not None:
                bootstrap.stop()
            topology.delete()


def summarize(peers: int, rate: float, compression: str, vector_bytes: int, rows: list[dict]) -> dict:
    """A cell: medians over its boundaries; the error of the last (checked) one."""
    bound = bound_s(peers, vector_bytes, rate)
    sent_per_peer = 2 * (peers - 1) / peers * vector_bytes
    time_s, allreduce_s = median(r["time_s"] for r in rows), median(r["allreduce_s"] for r in rows)
    up_per_peer = median(median(r["up_bytes"]) for r in rows)
    return {
        "peers": peers,
        "rate_mbit": rate,
        "compression": compression,
        "vector_bytes": vector_bytes,
        "bound_s": bound,
        "time_s": time_s,
        "allreduce_s": allreduce_s,
        "time_over_bound": time_s / bound,
        "allreduce_over_bound": allreduce_s / bound,
        "matchmaking_s": median(r["matchmaking_s"] for r in rows),
        "first_byte_s": median(r["first_byte_s"] for r in rows),
        "last_byte_s": median(r["last_byte_s"] for r in rows),
        "verdicts_s": median(r["verdicts_s"] for r in rows),
        "copies_s": median(r["copies_s"] for r in rows),
        "transfer_mbit": median(r.get("transfer_mbit") for r in rows),
        "payload_per_peer_bytes": sent_per_peer,  # 2(K-1)/K x the serialized vector
        # what the link carried: the payload + TCP/IP/Ethernet headers, DHT requests, verdicts
        "wire_up_per_peer_bytes": up_per_peer,
        "wire_over_payload": up_per_peer / sent_per_peer,
        "wire_total_bytes": median(sum(r["up_bytes"]) for r in rows),
        **next((r["error"] for r in reversed(rows) if "error" in r), {}),
        "boundaries": rows,
    }


def markdown_table(rows: list[dict]) -> str:
    """Two tables: the time against the bound and the bytes; then where the time went, and the error."""

    def table(header: list[str], cells) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]

    def cell(r: dict) -> list[str]:
        return [str(r["peers"]), f"{r['rate_mbit']:g}", r["compression"]]

    def timing(r: dict) -> list[str]:
        out = cell(r) + [fmt(r["vector_bytes"] / 1e6, 1), fmt(r["bound_s"], 1), fmt(r["time_s"], 1)]
        out += [f"**{fmt(r['time_over_bound'])}**", fmt(r["allreduce_s"], 1), fmt(r["allreduce_over_bound"])]
        return out + [fmt(r["wire_up_per_peer_bytes"] / 1e6, 1), fmt(r["wire_over_payload"], 3)]

    def phases(r: dict) -> list[str]:
        out = cell(r) + [fmt(r[k], 2) for k in ("matchmaking_s", "first_byte_s", "last_byte_s")]
        out += [fmt(r["transfer_mbit"], 0), fmt(r.get("tcp_payload_mbit"), 1), fmt(r["verdicts_s"], 2)]
        out += [fmt(r["copies_s"], 2)]
        errors = ("max_abs_error", "mean_abs_error", "mean_abs_update")
        return out + [f"{r[k]:.2e}" if k in r else "–" for k in errors]

    first = ["K", "B (Mbit/s)", "compression", "P: bytes per vector (MB)", "bound (s)", "fuse + load (s)"]
    first += ["time / bound", "all-reduce (s)", "all-reduce / bound", "sent per peer, on the link (MB)"]
    first += ["link / 2(K−1)/K·P"]
    second = ["K", "B (Mbit/s)", "compression", "start → group formed (s)", "start → first byte (s)"]
    second += ["start → last byte (s)", "link rate while sending, headers included (Mbit/s)"]
    second += ["plain TCP both ways, payload (Mbit/s)"]
    second += ["verdicts (s)", "copies (s)"]
    second += ["max abs error", "mean abs error", "mean abs update"]
    return "\n".join(table(first, timing) + [""] + table(second, phases))


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: namespaces and workers go


def tcp_baseline(topology: StarTopology, rate_mbit: float) -> float:
    """Payload Mbit/s of one plain TCP connection between peers 0 and 1 carrying TCP_BASELINE_S worth of
    bytes each way at once, as an all-reduce does (the slower direction): what the links allow without
    p2pd, libp2p and hivemind. A connection's ACKs queue behind the data going the other way."""
    size = str(int(rate_mbit * 1e6 / 8 * TCP_BASELINE_S))
    here = [sys.executable, "-m", "benchmarks.links"]
    listener = [*topology.exec_in(topology.namespaces[1]), *here, "tcp-listen", size]
    listening = subprocess.Popen(listener, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        dialer = [*topology.exec_in(topology.namespaces[0]), *here, "tcp-dial", size, star_peer_ip(1)]
        dialed = subprocess.run(dialer, capture_output=True, text=True, timeout=TCP_TIMEOUT, cwd=ROOT).stdout
        return min(float(dialed), float(listening.communicate(timeout=TCP_TIMEOUT)[0]))
    finally:
        listening.kill()
        listening.wait()


def tcp_endpoint(role: str, size: int, host: str = "") -> None:
    """One end of tcp_baseline: sends `size` bytes while it receives as many; prints the payload
    Mbit/s it received, from its first byte to its last."""
    if role == "tcp-dial":
        deadline = time.monotonic() + TCP_TIMEOUT
        while True:  # the listener may not be up yet
            try:
                connection = socket.create_connection((host, TCP_PORT), timeout=TCP_TIMEOUT)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    else:
        with socket.create_server(("", TCP_PORT)) as server:
            server.settimeout(TCP_TIMEOUT)
            connection, _ = server.accept()
    with connection:
        connection.settimeout(TCP_TIMEOUT)
        sending = threading.Thread(target=connection.sendall, args=(b"\0" * size,))
        sending.start()
        received, first = 0, None
        while received < size:
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            first = first or time.perf_counter()
            received += len(chunk)
        last = time.perf_counter()
        sending.join(TCP_TIMEOUT)
    print(received * 8 / (last - first) / 1e6)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("tcp-"):
        tcp_endpoint(argv[0], int(argv[1]), *argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes K (default 2 4)")
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0], help="Mbit/s each way")
    every = accepted_compressions()
    parser.add_argument("--compressions", nargs="+", choices=every, default=every, help="default: every mode")
    parser.add_argument("--rounds", type=int, default=1, help="timed boundaries per cell (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "links.json")
    args = parser.parse_args(argv)
    missing = missing_requirement(("ip", "tc"))
    if missing:
        sys.exit(f"links: {missing}")
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    machine = machine_info()
    rows: list[dict] = []
    errors: list[dict] = []
    for peers in args.peers:
        try:
            rows += measure_group(peers, args.rates, args.compressions, args.rounds, errors)
        except Exception as e:  # one group failing must not lose the others
            log(f"K={peers}: FAILED: {type(e).__name__}: {e}")
            errors.append({"peers": peers, "error": f"{type(e).__name__}: {e}"})
    result = {
        "rows": rows,
        "errors": errors,
        "delta_std": DELTA_STD,
        "rounds": args.rounds,
        "shaper": "tc tbf on both ends of each peer's veth; no delay or loss emulated (no netem)",
        "machine": machine,
    }
    seconds = round(time.perf_counter() - started, 1)
    finished = time.strftime("%Y-%m-%d %H:%M:%S")
    section = {"links": {"result": result, "seconds": seconds, "finished": finished}}
    args.out.write_text(json.dumps(section, indent=2) + "\n")
    print(markdown_table(rows))
    log(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
