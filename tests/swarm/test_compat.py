"""p2pcold's fixes to hivemind (`p2pcold.swarm._compat`): applied by `start_dht`; hivemind's tracebacks
for outcomes p2pcold expects become one line or nothing."""

from __future__ import annotations

import logging
import time
import warnings

import pytest
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException

from p2pcold.swarm import _compat, peer_id, stop_dht

from helpers import fast_config, make_body

def test_start_dht_applies_the_fixes(swarm):
    """(That importing p2pcold applies nothing, and that applying twice is applying once, is checked in a
    fresh process by tests/test_process_setup.py.)"""
    swarm.start(1, fast_config())
    assert _compat.is_applied()
    with warnings.catch_warnings():  # torch's "non-writable NumPy array", as in every 8-bit decode
        warnings.simplefilter("ignore")
        assert _compat._quantization_round_trip_works()  # 8-bit all-reduces decode on this numpy


def _record(msg, error: BaseException | None, level=logging.ERROR) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord("hivemind.averaging.averager", level, __file__, 1, msg, None, exc_info)


def test_expected_outcomes_are_dropped_or_become_one_warning_line():
    outcomes = _compat._ExpectedOutcomes()
    failed = AllreduceException("partial all-reduce: 5184 of 27552 values kept local (a reducer failed)")
    assert not outcomes.filter(_record(failed, failed))  # BodyAverager.fuse reports the attempt itself
    unable = MatchmakingException(f"Unable to run All-Reduce: {failed}")
    assert not outcomes.filter(_record(unable, unable))
    no_group = AllreduceException("Averaging step failed: could not find a group")
    assert not outcomes.filter(_record(no_group, no_group))

    gone = _record("Failed to download state from 12D3KooWdead - P2PDaemonError('failed to dial')", ConnectionError("gone"))
    assert outcomes.filter(gone)
    assert gone.exc_info is None and gone.levelno == logging.WARNING and gone.levelname == logging.getLevelName(logging.WARNING)
    assert "Traceback" not in logging.Formatter().format(gone)

    other = RuntimeError("something p2pcold does not expect")
    unexpected = _record(other, other)
    assert outcomes.filter(unexpected) and unexpected.exc_info is not None  # kept, with its traceback
    assert outcomes.filter(_record("Downloading parameters from peer X", None, logging.INFO))


def test_a_cancelled_steps_cleanup_leaves_no_traceback_and_other_asyncio_errors_stay():
    """The records hivemind and asyncio write when a step cancelled in matchmaking is closed (seen in a
    victim peer's log under load), and asyncio errors that are not that."""
    cleanup = _compat._CancelledStepCleanup()

    def record(name, msg, error=None):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, (type(error), error, None) if error is not None else None)

    closed = GeneratorExit()
    assert not cleanup.filter(record("hivemind.utils.asyncio", "Exception in <Task cancelling name='Task-103' coro=<PotentialLeaders._declare_averager_periodically()>", closed))
    pending = "Task was destroyed but it is pending!\ntask: <Task cancelling name='Task-101' coro=<Matchmaking._request_join_potential_leaders() done, defined at /venv/lib/python3.11/site-packages/hivemind/averaging/matchmaking.py:149>>"
    assert not cleanup.filter(record("asyncio", pending))
    running = RuntimeError("aclose(): asynchronous generator is already running")
    assert not cleanup.filter(record("asyncio", "Task exception was never retrieved\nfuture: <Task finished name='Task-399'>", running))

    other = ValueError("a real bug")
    assert cleanup.filter(record("hivemind.utils.asyncio", "Exception in <Task ...>", other))
    assert cleanup.filter(record("asyncio", "Task was destroyed but it is pending!\ntask: <Task pending coro=<p2pcold_thing() at /p2pcold/peer/base.py:1>>"))
    assert cleanup.filter(record("asyncio", "Task exception was never retrieved\nfuture: <Task finished>", RuntimeError("something else")))


@pytest.fixture
def averager_log(tmp_path):
    """hivemind's averager log, as its (forked) averager processes write it: a file handler added before
    they start, which they inherit."""
    path = tmp_path / "averager.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("hivemind.averaging.averager")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.network
@pytest.mark.timeout(120)
def test_a_dead_donor_is_one_warning_line_and_the_download_goes_on(swarm, averager_log, caplog):
    """A peer SIGKILLed and restarted finds its dead predecessor still listed as a state donor (until the
    entry expires), possibly first. Asking it fails; the download goes on with the next donor, and the
    log says so in one line."""
    config = fast_config()
    alive, doomed, restarted = swarm.start(3, config)
    template = make_body(0)
    averagers = [swarm.averager(dht, "dead-donor", template, config) for dht in (alive, doomed, restarted)]
    averagers[0].set_shared_state(1, make_body(1))
    averagers[1].set_shared_state(2, make_body(2))  # the dead donor is the newest: asked first
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:  # both donors announced (asynchronously)
        downloaded = averagers[2].download_state(timeout=5.0)
        if downloaded is not None and downloaded[0] == 2:
            break
        time.sleep(0.2)
    averagers[1]._averager.kill()  # SIGKILL, as the OOM killer would; its DHT entry stays
    averagers[1]._averager.join(5.0)
    stop_dht(doomed, grace_s=0.5)

    with caplog.at_level(logging.WARNING, logger="p2pcold"):
        downloaded = averagers[2].download_state(timeout=10.0)
    assert downloaded is not None and downloaded[0] == 1  # from the live donor
    failed = [r for r in caplog.records if r.getMessage().startswith(f"state download from {peer_id(doomed)} failed")]
    assert len(failed) == 1 and not failed[0].exc_info, caplog.text
    assert "Traceback" not in averager_log.read_text()
