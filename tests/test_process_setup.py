"""Process-wide set-up is explicit: importing p2pcold changes no library's global state; the entry points
call `setup_process()` (idempotent); the recipes folder and SIGTERM handling are read or installed when
asked for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from p2pcold.utils import Terminated, raise_on_sigterm

PROBE = """
import json, logging
import datasets, transformers
from hivemind.compression import quantization
import p2pcold.cli, p2pcold.simulate, p2pcold.local_run, p2pcold.peer, p2pcold.evaluate, p2pcold.data.prepare
from p2pcold.swarm import _compat
from p2pcold.utils import setup_process

def state():
    return {
        "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
        "datasets_bars": datasets.is_progress_bar_enabled(),
        "hivemind_fixes": _compat.is_applied(),
        "averager_log_filters": len(logging.getLogger("hivemind.averaging.averager").filters),
        "extract_patched": quantization.Quantization.extract is _compat._extract_fixed,
    }

after_import = state()
setup_process()
setup_process()
_compat.apply()  # what start_dht calls
_compat.apply()
print(json.dumps({"after_import": after_import, "after_setup_twice": state()}))
"""


@pytest.mark.timeout(120)
def test_imports_change_no_global_state_and_each_setup_is_idempotent():
    # a fresh environment: an earlier setup_process() in this test process sets the libraries' switches
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=110, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    assert states["after_import"] == {
        "transformers_bars": True, "datasets_bars": True, "hivemind_fixes": False, "averager_log_filters": 0, "extract_patched": False,
    }  # fmt: skip
    after = states["after_setup_twice"]
    assert not after["transformers_bars"] and not after["datasets_bars"]
    assert after["hivemind_fixes"] and after["averager_log_filters"] == 1  # one filter however often applied


def test_raise_on_sigterm_turns_the_signal_into_an_exception():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    finally:
        signal.signal(signal.SIGTERM, previous)
