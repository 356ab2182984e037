"""`p2pcold monitor`: a client-mode member of a swarm that never trains and never reduces.

setup() -> run() -> cleanup(). It follows the swarm through a SwarmTracker and keeps the history
(SwarmHistory), serves the web page and the JSON API, writes TensorBoard scalars, and optionally
evaluates each new fused base (downloaded from the swarm's state sharing) with the run's `eval`
settings, the simulator's evaluator's code (evaluate.RunEvaluation). In `p2pcold simulate` it reads the
simulator's evaluator's results instead (`results_from`), so nothing is evaluated twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from p2pcold.config import RunConfig
from p2pcold.monitor.history import SwarmHistory
from p2pcold.monitor.server import MonitorServer
from p2pcold.publish import model_card, push_to_hub
from p2pcold.results import read_results
from p2pcold.run_folder import check_output_dir
from p2pcold.scalars import ScalarLog
from p2pcold.swarm import SwarmTracker, run_record_validators, start_dht, stop_dht
from p2pcold.utils import P2PColdError, get_logger

log = get_logger("monitor")


@dataclass
class MonitorOptions:
    host: str = "127.0.0.1"  # another interface only when asked: the page shows the swarm to whoever reaches it
    port: int = 8080  # 0: a free port (see Monitor.url)
    evaluate: bool = False  # download and evaluate each new fused base
    results_from: Path | None = None  # read this folder's results.json instead (the simulator's evaluator)
    log_dir: str | None = None  # TensorBoard event files
    push_to_hub: str | None = None  # repo id the best evaluated base is uploaded to
    device: str = "cpu"  # of the evaluation


class Monitor:
    def __init__(self, config: RunConfig, initial_peers: list[str], folder: str | Path, options: MonitorOptions, dht=None, secret=None):
        """`secret`: a private swarm's `RunSecret` (None: an open swarm); with it, the monitor is a member
        that may download state for `--evaluate`. `dht`: a started node to share (the simulator's)."""
        if options.evaluate and not config.eval.datasets:
            raise P2PColdError("monitor: --evaluate needs eval.datasets in the run config (--config)")
        self.config, self.initial_peers, self.folder, self.options = config, list(initial_peers), Path(folder), options
        self.history = SwarmHistory(config.run_id)
        self.scalars = ScalarLog(options.log_dir)
        self.dht, self._owns_dht, self.secret = dht, dht is None, secret
        self.tracker = self.server = self.averager = self.state = self.evaluation = None
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._results_mtime = 0.0
        self._logged_results: set[int] = set()
        self._logged_metrics: set[tuple[str, int]] = set()  # (dataset, iteration): one point per iteration

    @property
    def url(self) -> str:
        return self.server.url

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        check_output_dir(self.folder)  # before the swarm is joined: results that cannot be written are lost
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = MonitorServer(self.options.host, self.options.port, self._view)  # a taken port fails before the swarm is joined
        if self._owns_dht:
            self.dht = self._start_dht()
        self.tracker = SwarmTracker(self.dht, self.config.run_id, self.config.swarm, iterations=self.config.iterations)  # publishes nothing: not a peer
        if self.options.evaluate:
            self._setup_evaluation()
        self._workers = [threading.Thread(target=self._results_loop, name="p2pcold-monitor-results", daemon=True)]
        if self.options.evaluate:  # downloads go on while an evaluation runs: peers serve a base only while they hold it
            self._workers.append(threading.Thread(target=self._download_loop, name="p2pcold-monitor-download", daemon=True))
        for worker in self._workers:
            worker.start()
        log.info("monitoring run %s at %s", self.config.run_id, self.url)

    def _start_dht(self):
        """The one place the monitor joins the swarm."""
        validators = run_record_validators(self.config.run_id, self.config.iterations)
        return start_dht(self.config.swarm, self.initial_peers, client_mode=True, secret=self.secret, record_validators=validators)

    def _setup_evaluation(self) -> None:
        import torch

        from p2pcold.evaluate import RunEvaluation
        from p2pcold.finetune import resolve_device
        from p2pcold.run_state import RunState
        from p2pcold.swarm import BodyAverager

        if self.config.finetune.num_threads:
            torch.set_num_threads(self.config.finetune.num_threads)
        # θ0, and the folder downloaded bases wait in until evaluated (the evaluation deletes them)
        self.state = RunState(self.config, self.folder / "bases", keep_last=None)
        self.averager = BodyAverager(self.dht, self.config.run_id, self.state.theta0, self.config.swarm, reference=self.state.theta0, client_mode=True, secret=self.secret)
        self.evaluation = RunEvaluation(self.config, self.folder, resolve_device(self.options.device))

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Follow the swarm until `stop()` (or SIGTERM / Ctrl-C in the caller's thread)."""
        while not self._stop.is_set():
            snapshot = self.tracker.wait_for_update(self.config.swarm.poll_interval * 4)
            for record, boundary in self.history.observe(snapshot.records, snapshot.taken_at or time.time()):
                self._log_peer(record, boundary)

    def stop(self) -> None:
        self._stop.set()

    def _log_peer(self, record: dict, boundary: dict | None) -> None:
        name, iteration = record["dataset"], record["iteration"]
        step = record.get("trained_iteration")  # the iteration the metrics come from (None in older records)
        if step is not None and (name, step) not in self._logged_metrics:  # one point per iteration
            self._logged_metrics.add((name, step))
            for tag in ("train_loss", "dev_accuracy", "examples_per_second"):
                self.scalars.add(f"peers/{name}/{tag}", record[tag], step)
        if boundary is not None:
            self.scalars.add(f"peers/{name}/fusion_seconds", boundary["seconds"], iteration)
            self.scalars.add(f"peers/{name}/group_size", boundary["group_size"], iteration)
            members = ", ".join(boundary["members"]) or "-"
            log.info("iteration %d: %s %s (group %s, %d attempt(s))", iteration, name, boundary["status"], members, boundary["attempts"])
        self.scalars.flush()

    def _view(self) -> dict:
        snapshot = self.tracker.snapshot() if self.tracker is not None else None
        live = {r.peer_id for r in snapshot.records} if snapshot is not None else set()
        return self.history.view(time.time(), live)

    # ------------------------------------------------------------------ results (evaluated here or read)

    def _results_loop(self) -> None:
        try:
            if self.evaluation is not None:
                self.history.set_evaluating(0)
                self.evaluation.evaluate_pretrained()
                self._new_results()
            while not self._stop.wait(self.config.swarm.poll_interval * 4):
                if self.evaluation is not None:
                    self._evaluate_newest_base()
                else:
                    self._read_results()
        except Exception:  # keep serving the page: the swarm view does not depend on evaluation
            log.exception("monitor: evaluation stopped")
            self.history.set_evaluating(None)

    def _download_loop(self) -> None:
        """Download each fused base as soon as a peer reports it, into the bases folder. The tracker's
        watcher record tells finished peers to keep serving the final base until it has been downloaded."""
        try:
            self.tracker.watch(self.state.iteration)
            while not self._stop.is_set():
                snapshot = self.tracker.wait_for_update(self.config.swarm.poll_interval)
                newest = max((r.iteration for r in snapshot.records if r.last_fusion), default=0)
                if newest <= self.state.iteration:
                    continue
                downloaded = self.averager.download_state()
                if downloaded is None or downloaded[0] <= self.state.iteration:
                    continue
                self.state.iteration, self.state.base = downloaded
                self.state.save_checkpoint(extra={"fusion": self.history.fusion_of(downloaded[0]), "source": "downloaded from the swarm"})
                self.tracker.watch(self.state.iteration)
        except Exception:  # keep serving the page: the swarm view does not depend on evaluation
            log.exception("monitor: downloads stopped")

    def _evaluate_newest_base(self) -> None:
        if self.evaluation.evaluate_next(self.state.run_dir, starting=self.history.set_evaluating) is not None:
            self._new_results()

    def _read_results(self) -> None:
        path = self.options.results_from / "results.json" if self.options.results_from else None
        if path is None or not path.is_file() or path.stat().st_mtime == self._results_mtime:
            return
        self._results_mtime = path.stat().st_mtime
        self._new_results(read_results(path), self.options.results_from)

    def _new_results(self, results=None, folder: Path | None = None) -> None:
        """Show, log and publish results not seen before."""
        results = self.evaluation.results if results is None else results
        folder = self.folder if folder is None else folder
        self.history.set_results(results)
        new = sorted({r.iteration for r in results} - self._logged_results)
        for iteration in new:
            for r in results:
                if r.iteration == iteration:
                    self.scalars.add(f"accuracy/{r.mode}/{r.dataset}", r.accuracy, iteration)
            for mode in sorted({r.mode for r in results}):
                values = [r.accuracy for r in results if r.iteration == iteration and r.mode == mode]
                self.scalars.add(f"accuracy/{mode}/mean", sum(values) / len(values) if values else None, iteration)
        self._logged_results.update(new)
        self.scalars.flush()
        if new and max(new) > 0 and self.options.push_to_hub:
            self._publish(results, folder)

    def _publish(self, results, folder: Path) -> None:
        best = folder / "checkpoints" / ("best" if self.config.simulate.keep_best else "last")
        if not best.is_dir():
            return
        from p2pcold.model import read_metadata

        iteration = read_metadata(best).iteration
        card = model_card(self.config, results, iteration, self.history.contributors())
        push_to_hub(best, self.options.push_to_hub, card, iteration)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Bounded: the web server (~0.5 s), the tracker and averager, the DHT (shutdown_timeout). An
        evaluation in progress is abandoned (its thread is a daemon); finished results are on disk."""
        self._stop.set()
        timeout = self.config.swarm.shutdown_timeout
        for worker in self._workers:
            worker.join(timeout)
        if self.options.results_from is not None and not any(w.is_alive() for w in self._workers):
            self._read_results()  # the evaluator's last rows may have come after the last poll
        if self.server is not None:
            self.server.close()
        if self.tracker is not None:
            self.tracker.close(timeout)
        if self.averager is not None:
            self.averager.shutdown(stop_dht=False)
        if self.dht is not None and self._owns_dht:
            stop_dht(self.dht, grace_s=timeout)
        self.scalars.close()
