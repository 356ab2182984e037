"""`p2pcold simulate`: a whole CoLD Fusion swarm on one machine, as real processes on 127.0.0.1.

    bootstrap (DHT entry point; the Repository with --centralized)
    N × `p2pcold peer` (one dataset each; GPUs round-robin, or CPU threads split between them)
    1 × evaluator (evaluates each new fused base: CoLD and CoLD-Frozen, writes results and plots)

Run folder:
    config.yaml                  the resolved config; `--resume RUN_DIR` reads it back
    logs/NAME.log                one log per process
    peers/NAME/checkpoints/      each peer's last checkpoints (θ_i as Hugging Face folders)
                                 (the first peer's are kept until the evaluator has used them)
    repository/checkpoints/      the Repository's θ_i (centralized mode)
    checkpoints/last, best       copies of the last and the best evaluated fused base
    results.csv / results.json   per iteration, per target dataset, per mode
    accuracy.png                 CoLD and Frozen per iteration vs the pretrained model (Fig. 2, Fig. 4)
    gain_per_dataset.png         per-dataset gain over the pretrained model (Fig. 10)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from p2pcold.config import RunConfig, load_dataset_spec, load_run_config, to_dict
from p2pcold.merging import swarm_refusal
from p2pcold.run_folder import check_output_dir
from p2pcold.utils import (
    EXIT_TERMINATED,
    P2PColdError,
    Terminated,
    atomic_write_bytes,
    atomic_write_json,
    get_logger,
    packaged_recipes_dir,
    raise_on_sigterm,
    read_json,
)

if TYPE_CHECKING:  # the evaluator process imports this module: it needs neither hivemind nor the monitor
    from p2pcold.monitor import Monitor, MonitorOptions

log = get_logger("simulate")

DEFAULT_CONFIG = packaged_recipes_dir() / "runs" / "demo.yaml"  # the offline CPU demo
EVALUATOR = "evaluator"
STOP_GRACE_S = 15.0  # a process gets this long to exit after SIGTERM before its group is killed
STATUS_EVERY_S = 30.0  # the status line is repeated at least this often


# --------------------------------------------------------------------------- placement


def place_peers(count: int, gpus: list[int] | None) -> list[str]:
    """The device of each peer: GPUs round-robin (several peers may share one), else the CPU."""
    if not gpus:
        return ["cpu"] * count
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(count)]


def cpu_threads(processes: int, cores: int | None = None) -> int:
    """Torch threads per process so that the processes together use each core once."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, processes))


@dataclass
class PeerPlan:
    name: str
    dataset: str
    device: str
    threads: int


def plan_peers(config: RunConfig, peers: int | None, gpus: list[int] | None) -> list[PeerPlan]:
    problem = swarm_refusal(config.fusion, config.simulate.centralized)
    if problem:
        raise P2PColdError(f"simulate: {problem}")
    count = peers or config.simulate.peers or len(config.datasets)
    if count > len(config.datasets):
        raise P2PColdError(f"simulate: {count} peers but {len(config.datasets)} datasets; each peer contributes one dataset")
    devices = place_peers(count, gpus)
    threads = cpu_threads(count + 1)  # + the evaluator
    plans = []
    for i, (dataset, device) in enumerate(zip(config.datasets, devices)):
        plans.append(PeerPlan(f"peer{i:02d}-{load_dataset_spec(dataset).name}", dataset, device, threads))
    return plans


# --------------------------------------------------------------------------- evaluator process


def evaluation_loop(run_dir: Path, source: Path, device: str, threads: int) -> None:
    """Evaluate θ0, then each new fused base that appears in `source`, until the last iteration.

    Runs in its own process. Skips bases already in results.json (resume); evaluates every due
    iteration in order, however far behind the peers it is, and then deletes the source peer's
    older checkpoints, which only the evaluator needed.
    """
    from p2pcold.evaluate import RunEvaluation
    from p2pcold.finetune import resolve_device

    torch.set_num_threads(threads)
    config = load_run_config(run_dir / "config.yaml")
    if not config.eval.datasets:
        return
    evaluation = RunEvaluation(config, run_dir, resolve_device(device))

    durations: list[float] = []  # seconds of each evaluation so far: the simulator's ETA
    started = time.monotonic()

    def status(phase: str, iteration: int) -> None:
        nonlocal started
        if phase == "evaluating":
            started = time.monotonic()
        record = {"phase": phase, "iteration": iteration, "time": time.time(), "evaluated": len(durations)}
        if durations:
            record["seconds_per_evaluation"] = sum(durations) / len(durations)
        atomic_write_json(run_dir / "evaluator.json", record)

    status("evaluating", 0)
    evaluation.evaluate_pretrained()
    durations.append(time.monotonic() - started)
    while evaluation.last_iteration < config.iterations:
        status("waiting", evaluation.last_iteration)
        # the source peer keeps its checkpoints (keep_checkpoints: null) until evaluated: none is skipped
        if evaluation.evaluate_next(source, starting=lambda iteration: status("evaluating", iteration)) is None:
            time.sleep(1.0)
        else:
            durations.append(time.monotonic() - started)
    status("done", evaluation.last_iteration)


def eta_seconds(elapsed: float, trained: int, iterations: int, evaluations_left: int, seconds_per_evaluation: float | None) -> float | None:
    """Seconds until a simulation ends, None while there is nothing to extrapolate from. The peers go on
    at their rate so far (`trained` of `iterations` in `elapsed`); the evaluator works beside them, but
    the last evaluation can only start once they are done, and a backlog of evaluations can outlast
    them. Evaluations cost minutes each where iterations cost seconds, so they are counted in seconds,
    not as steps."""
    training_left = 0.0 if trained >= iterations else (elapsed / trained * (iterations - trained) if trained else None)
    if evaluations_left == 0:
        return training_left
    if training_left is None or seconds_per_evaluation is None:
        return None
    return max(training_left + seconds_per_evaluation, evaluations_left * seconds_per_evaluation)


# --------------------------------------------------------------------------- the simulation


class Simulation:
    """setup() -> run() -> stop(): a bootstrap, N peers and an evaluator, each in its own session."""

    def __init__(self, config: RunConfig, run_dir: Path, plans: list[PeerPlan], eval_device: str, secret_env: dict[str, str], monitor: MonitorOptions | None = None):
        from p2pcold.monitor import MonitorOptions

        self.config = config
        self.secret_env = secret_env  # how every process of the run finds its secret (see secret_environment)
        self.run_dir = run_dir
        self.plans = plans
        self.eval_device = eval_device
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = time.monotonic()
        self.dht = None
        # the run's monitor shows the evaluator's results (results_from) instead of evaluating again
        self.monitor_options = dataclasses.replace(monitor or MonitorOptions(port=0), evaluate=False, results_from=run_dir)
        self.monitor: Monitor | None = None
        self._monitor_thread: threading.Thread | None = None
        self.progress: dict[str, tuple[int, str]] = {}  # last known (iteration, phase) per dataset

    @property
    def centralized(self) -> bool:
        return self.config.simulate.centralized

    @property
    def fused_source(self) -> Path:
        """Where the fused bases appear: the Repository's folder, or the first peer's."""
        return self.run_dir / ("repository" if self.centralized else f"peers/{self.plans[0].name}")

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.secret_env, "TOKENIZERS_PARALLELISM": "false"}
        with open(log_path, "a") as out, _stop_signals_deferred():
            # A session of its own: Ctrl-C reaches only the simulator, which stops each group in order,
            # and killing the group also kills the process's hivemind helpers and p2pd daemon.
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.procs[name] = proc
        return proc

    def setup(self) -> None:
        config_path = str(self.run_dir / "config.yaml")
        maddrs = self.run_dir / "bootstrap.maddrs"
        maddrs.unlink(missing_ok=True)
        bootstrap = ["-m", "p2pcold.cli", "bootstrap", "--config", config_path, "--maddrs-file", str(maddrs)]
        if self.centralized:
            bootstrap += ["--repository", "--run-dir", str(self.run_dir / "repository")]
        self._start("bootstrap", bootstrap)
        deadline = time.monotonic() + self.config.swarm.dht_startup_timeout
        while not (maddrs.is_file() and maddrs.read_text().strip()):
            if self.procs["bootstrap"].poll() is not None or time.monotonic() > deadline:
                raise P2PColdError(f"simulate: the bootstrap node did not start; see {self.run_dir / 'logs' / 'bootstrap.log'}")
            time.sleep(0.2)
        self.maddr = maddrs.read_text().split()[0]
        self._start_monitor()
        self._start(EVALUATOR, ["-m", "p2pcold.simulate", "evaluate-loop", str(self.run_dir), str(self.fused_source), "--device", self.eval_device, "--threads", str(self.plans[0].threads)])
        for plan in self.plans:
            args = ["-m", "p2pcold.cli", "peer", "--config", config_path, "--dataset", plan.dataset, "--initial-peers", self.maddr]
            args += ["--host", self.config.swarm.host]  # where the bootstrap listens (127.0.0.1 unless configured), not a volunteer's default
            args += ["--run-dir", str(self.run_dir / "peers" / plan.name), "--device", plan.device, "--set", f"finetune.num_threads={plan.threads}"]
            if plan is self.plans[0] and not self.centralized:  # the evaluator's source: it prunes what it evaluated
                args += ["--set", "keep_checkpoints=null"]
            if self.centralized:
                args.append("--centralized")
            if self.monitor_options.log_dir:
                args += ["--log-dir", str(Path(self.monitor_options.log_dir) / plan.name)]
            self._start(plan.name, args)
        log.info("started a bootstrap, %d peers and the evaluator; logs in %s", len(self.plans), self.run_dir / "logs")

    # ------------------------------------------------------------------ monitoring

    def _start_monitor(self) -> None:
        """The run's monitor, in this process, on this process's one client DHT node."""
        from p2pcold.monitor import Monitor
        from p2pcold.swarm import run_record_validators, start_dht
        from p2pcold.swarm.auth import load_secret

        config = self.config
        validators = run_record_validators(config.run_id, config.iterations)
        self.dht = start_dht(config.swarm, [self.maddr], client_mode=True, secret=load_secret(environ=self.secret_env), record_validators=validators)
        options = self.monitor_options
        if options.log_dir:
            options = dataclasses.replace(options, log_dir=str(Path(options.log_dir) / "monitor"))
        self.monitor = Monitor(self.config, [self.maddr], self.run_dir, options, dht=self.dht)
        self.monitor.setup()
        self._monitor_thread = threading.Thread(target=self.monitor.run, name="p2pcold-monitor", daemon=True)
        self._monitor_thread.start()
        print(f"monitor: {self.monitor.url}", flush=True)

    def _refresh_progress(self) -> dict[str, tuple[int, str]]:
        """dataset -> (iteration, phase), from the monitor's view of the swarm; a peer whose record
        expired (it finished or died) keeps its last known state."""
        if self.monitor is not None:
            self.progress.update({p.dataset: (p.iteration, p.phase) for p in self.monitor.tracker.snapshot().peers})
        return self.progress

    def status_line(self, progress: dict[str, tuple[int, str]]) -> str:
        total = self.config.iterations
        alive = sum(1 for plan in self.plans if self.procs[plan.name].poll() is None)
        iterations = [it for it, _ in progress.values()]
        current = min(iterations) if iterations else 0
        from p2pcold.evaluate import evaluation_due  # pulls in transformers: not at import time

        evaluator = read_json(self.run_dir / "evaluator.json") if (self.run_dir / "evaluator.json").is_file() else {}
        due = sum(evaluation_due(i, self.config.eval.every, total) for i in range(total + 1)) if self.config.eval.datasets else 0
        left = eta_seconds(
            time.monotonic() - self.started, current, total, max(0, due - evaluator.get("evaluated", 0)), evaluator.get("seconds_per_evaluation")
        )  # fmt: skip
        eta = "?" if left is None else f"{left:.0f}s"
        phases = " ".join(f"{name}:{phase}@{it}" for name, (it, phase) in sorted(progress.items()))
        evaluating = f"{evaluator.get('phase', 'starting')}@{evaluator.get('iteration', 0)}"
        return f"iter {current}/{total} | peers alive {alive}/{len(self.plans)} | {phases} | eval {evaluating} | ETA {eta}"

    def run(self) -> None:
        last_state, last_print = "", 0.0
        while True:
            failed = [name for name, proc in self.procs.items() if proc.poll() not in (None, 0)]
            if failed:
                name = failed[0]
                tail = (self.run_dir / "logs" / f"{name}.log").read_text().strip().splitlines()[-1:]
                raise P2PColdError(f"simulate: {name} exited with code {self.procs[name].returncode}: {' '.join(tail)}")
            peers_done = all(self.procs[p.name].poll() == 0 for p in self.plans)
            if peers_done and self.procs[EVALUATOR].poll() == 0:
                break
            line = self.status_line(self._refresh_progress())
            state = line.rsplit(" | ETA", 1)[0]
            # A line per change of state, and at least every STATUS_EVERY_S (the ETA alone changes constantly).
            if state != last_state or time.monotonic() - last_print > STATUS_EVERY_S:
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
                last_state, last_print = state, time.monotonic()
            time.sleep(self.config.simulate.refresh_seconds)

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left after STOP_GRACE_S.

        A second Ctrl-C or SIGTERM meanwhile is ignored: interrupting this would leave the rest running."""
        with _stop_signals_handled_by(signal.SIG_IGN):
            self._stop_all()

    def _stop_all(self) -> None:
        from p2pcold.swarm import stop_dht

        if self.monitor is not None:
            self.monitor.cleanup()
            self.monitor = None
        if self.dht is not None:
            stop_dht(self.dht, grace_s=self.config.swarm.shutdown_timeout)
            self.dht = None
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # orphaned helpers keep the group alive after its leader
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("process %d did not exit after SIGKILL", proc.pid)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_handled_by(handler):
    """Ctrl-C and SIGTERM go to `handler` inside the block (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _stop_signals_deferred():
    """Ctrl-C or SIGTERM received inside the block takes effect when it ends. Around starting a process:
    a signal between its fork and its entry in `Simulation.procs` would leave it out of the stop."""
    received: list[int] = []
    with _stop_signals_handled_by(lambda signum, frame: received.append(signum)):
        yield
    if received:
        signal.raise_signal(received[0])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- entry points


def prepare_run(config_path: str | None, resume: str | None, overrides: dict) -> tuple[RunConfig, Path]:
    """Resolve the config and the run folder; a new run writes config.yaml, a resumed one reads it."""
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise P2PColdError(f"{run_dir}: not a simulation run folder (no config.yaml)")
        return load_run_config(run_dir / "config.yaml"), run_dir
    config = load_run_config(config_path or DEFAULT_CONFIG, overrides)
    run_dir = check_output_dir(config.output_dir)
    if (run_dir / "config.yaml").is_file():
        raise P2PColdError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or set output_dir")
    return config, run_dir


def secret_environment(secret_file: str | None) -> dict[str, str]:
    """The environment through which the simulation's processes get the run secret: the user's (its
    --secret-file, $P2PCOLD_SECRET_FILE or $P2PCOLD_SECRET), checked here, else a fresh one for this run.
    Never in a command line (`ps` shows those to everyone), the config or the run folder."""
    from p2pcold.swarm.auth import SECRET_ENV, SECRET_FILE_ENV, load_secret, new_secret_text

    if load_secret(secret_file) is None:
        return {SECRET_ENV: new_secret_text()}
    path = secret_file or os.environ.get(SECRET_FILE_ENV)
    return {SECRET_FILE_ENV: str(Path(path).resolve())} if path else {SECRET_ENV: os.environ[SECRET_ENV]}


def simulate(args: argparse.Namespace, overrides: dict) -> int:
    from p2pcold.results import read_results, summary_table

    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    if gpus and not torch.cuda.is_available():
        raise P2PColdError("--gpus given, but CUDA is not available; use --device cpu")
    if args.precision:
        overrides.update({"finetune.precision": args.precision, "eval.finetune.precision": args.precision})
    if args.centralized:
        overrides["simulate.centralized"] = True
    if args.peers:
        overrides["simulate.peers"] = args.peers
    secret_env = secret_environment(args.secret_file)
    config, run_dir = prepare_run(args.config, args.resume, overrides)
    plans = plan_peers(config, config.simulate.peers, gpus)
    if not args.resume:
        if config.swarm.target_group_size is None and not config.simulate.centralized:
            config.swarm.target_group_size = len(plans)  # assemble at once when every peer is there
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=True).encode())
    eval_device = f"cuda:{gpus[-1]}" if gpus else "cpu"
    print(f"simulating {len(plans)} peers for {config.iterations} iterations in {run_dir} ({'centralized' if config.simulate.centralized else 'decentralized'})")
    for plan in plans:
        print(f"  {plan.name}: {plan.dataset} on {plan.device}, {plan.threads} thread(s)")
    print("  a private swarm: its processes get the run secret through their environment")
    from p2pcold.monitor import MonitorOptions

    monitor = MonitorOptions(port=args.monitor_port, log_dir=args.log_dir, push_to_hub=args.push_to_hub)
    simulation = Simulation(config, run_dir, plans, eval_device, secret_env, monitor)
    raise_on_sigterm()  # the processes run in sessions of their own: only this one hears the signal
    try:
        simulation.setup()
        simulation.run()
    except KeyboardInterrupt:
        print(f"\n{_stopping_line('interrupted', run_dir)}", file=sys.stderr)  # below the terminal's ^C
        return 130
    except Terminated:
        print(_stopping_line("terminated", run_dir), file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        simulation.stop()
    results = read_results(run_dir / "results.json") if (run_dir / "results.json").is_file() else []
    if results:
        last = max(r.iteration for r in results)
        print(summary_table([r for r in results if r.iteration in (0, last)]))
        print(f"plots: {run_dir / 'accuracy.png'}, {run_dir / 'gain_per_dataset.png'}; results: {run_dir / 'results.csv'}")
    print(f"run folder: {run_dir} (per-process logs in {run_dir / 'logs'})")
    return 0


def _stopping_line(why: str, run_dir: Path) -> str:
    return f"{why}: stopping every process; continue with: p2pcold simulate --resume {run_dir}"


def main(argv: list[str] | None = None) -> int:
    """`python -m p2pcold.simulate evaluate-loop RUN_DIR SOURCE`: the simulator's evaluator process."""
    from p2pcold.utils import setup_process

    parser = argparse.ArgumentParser(prog="python -m p2pcold.simulate")
    sub = parser.add_subparsers(dest="role", required=True)
    loop = sub.add_parser("evaluate-loop")
    loop.add_argument("run_dir", type=Path)
    loop.add_argument("source", type=Path)
    loop.add_argument("--device", default="cpu")
    loop.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup_process()
    try:
        evaluation_loop(args.run_dir, args.source, args.device, args.threads)
    except P2PColdError as e:
        print(f"p2pcold: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
