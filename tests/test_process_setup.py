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
from pathlib import Path

import pytest

from p2pcold.utils import Terminated, raise_on_sigterm, recipes_dir, setup_process

PROBE = """
import json
import datasets, transformers
import p2pcold.cli, p2pcold.simulate, p2pcold.local_run, p2pcold.evaluate, p2pcold.data.prepare
from p2pcold.utils import setup_process

def bars():
    return {"transformers": transformers.utils.logging.is_progress_bar_enabled(), "datasets": datasets.is_progress_bar_enabled()}

after_import = bars()
setup_process()
setup_process()
print(json.dumps({"after_import": after_import, "after_setup": bars()}))
"""


@pytest.mark.timeout(120)
def test_imports_leave_progress_bars_alone_and_setup_process_turns_them_off():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    assert states == {"after_import": {"transformers": True, "datasets": True}, "after_setup": {"transformers": False, "datasets": False}}


def test_recipes_dir_is_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("P2PCOLD_RECIPES", raising=False)
    default = recipes_dir()
    assert default == Path(__file__).resolve().parent.parent / "peers" and (default / "runs").is_dir()
    monkeypatch.setenv("P2PCOLD_RECIPES", str(tmp_path))
    assert recipes_dir() == tmp_path  # set after import, still obeyed


def test_raise_on_sigterm_turns_the_signal_into_an_exception():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    finally:
        signal.signal(signal.SIGTERM, previous)
