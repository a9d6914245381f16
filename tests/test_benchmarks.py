"""The GPU kernel benchmark runs end to end at toy sizes (under the Triton interpreter on CPU)."""
import importlib.util
from pathlib import Path

import torch


def test_kernel_table_runs_at_tiny_sizes(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--device", "cuda" if torch.cuda.is_available() else "cpu"])
    assert len(rows) == 2 * len(bench.FRACTIONS) + len(bench.CHANGED)
    assert all(r["ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert "time / ideal" in capsys.readouterr().out
