"""`examples/quickstart.py` runs as its docstring says and checks what it prints (tau=1.0 equals eager)."""
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_runs_and_tau_one_decodes_like_eager():
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    run = subprocess.run([sys.executable, str(script), "--gen-length", "16"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tau=1.0 decodes exactly like eager: True" in run.stdout
    assert "salient fraction" in run.stdout and "delta attention" in run.stdout
