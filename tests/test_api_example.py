"""docs/api.md: `import p2pcold` is light, and the example in it runs on the offline assets."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import p2pcold
from p2pcold.model import resolve_model_source
from p2pcold.utils import P2PColdError

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_import_is_light_and_lists_the_public_objects():
    code = "import sys, p2pcold; p2pcold.RunConfig; print(sorted(m for m in ('torch', 'hivemind', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
    for name in p2pcold.__all__:
        assert getattr(p2pcold, name) is not None, name


def test_the_documented_example_runs(tmp_path):
    try:
        resolve_model_source("minilm")
    except P2PColdError:
        pytest.skip("the offline MiniLM is not installed (make assets)")
    example = re.search(r"```python\n(.*?)```", API_DOC.read_text(), re.S).group(1)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "5e-05"
    assert "Frozen unseen" in done.stdout
    assert (tmp_path / "runs" / "api-example" / "latest.json").is_file()
