"""The scripts in `benchmarks/`: the GPU kernel table end to end at toy sizes (under the Triton interpreter on
CPU), and the step profile's grouping of op times."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from dyllm_fx.kernels.packed_linear import available


def _script(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_table_runs_at_tiny_sizes(capsys):
    bench = _script("kernel_table")
    rows = bench.main(["--tiny", "--device", "cuda" if torch.cuda.is_available() else "cpu"])
    assert len(rows) == 2 * len(bench.FRACTIONS) + len(bench.CHANGED)
    assert all(r["ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert "time / ideal" in capsys.readouterr().out


def test_step_profile_groups_add_up_to_the_profiled_time():
    profile_step = _script("profile_step")
    events = [SimpleNamespace(key=k, self_cpu_time_total=us) for k, us in [
        ("aten::mm", 2000.0), ("dyllm::panel_gemm", 1000.0), ("mkldnn::_linear_pointwise", 1000.0), ("aten::_scaled_dot_product_flash_attention_for_cpu",
         1000.0), ("dyllm::attention_step", 1000.0), ("graph_0_cpp_fused_add_0", 1000.0), ("dyllm::select_rows", 500.0), ("aten::nonzero", 500.0),
        ("aten::view", 2000.0)]]
    text = profile_step.grouped(events, steps=2)
    lines = text.splitlines()
    assert lines[0] == "5.0 ms per step (self CPU time):"
    shares = {line.split("ms  ")[1]: float(line.split("%")[0]) for line in lines[1:]}
    assert shares[profile_step.GROUPS[0][0]] == 40.0 and shares[profile_step.GROUPS[1][0]] == 20.0
    assert shares[profile_step.GROUPS[3][0]] == 10.0 and shares[profile_step.GROUPS[-1][0]] == 20.0
    assert abs(sum(shares.values()) - 100.0) < 0.5


def test_no_script_shadows_a_module():
    """`python benchmarks/NAME.py` puts its folder first on sys.path: a script named like a module that the code
    imports (transformers imports Hugging Face's `kernels`) would be imported in its place."""
    import sys

    root = Path(__file__).resolve().parents[1]
    for script in [*(root / "benchmarks").glob("*.py"), *(root / "examples").glob("*.py")]:
        name = script.stem
        assert name not in sys.stdlib_module_names and importlib.util.find_spec(name) is None, \
            f"{script.relative_to(root)} shadows the module {name!r}: rename it"


def test_gemm_floor_times_every_linear_at_each_row_count(capsys):
    rows = _script("gemm_floor").main(["--model", "llada_like", "--rows", "2", "5", "--repeats", "1"])
    paths = {(r["path"], r["rows"]) for r in rows}
    assert ("read", 0) in paths and {("F.linear", 2), ("F.linear", 5)} <= paths
    if available(torch.float32, "cpu"):
        assert {("packed_linear", 5), ("oneDNN packed", 5)} <= paths
    assert all(r["ms"] > 0 for r in rows)
    assert "| read | - |" in capsys.readouterr().out


def test_attention_step_times_every_form_and_the_incremental_ones_are_exact(capsys):
    rows = _script("attention_step").main(["--lengths", "8", "--changed", "0.25", "--shape", "1", "2", "1", "4",
                                           "--repeats", "1"])
    assert len(rows) == 1 and rows[0]["exact_ms"] > 0 and rows[0]["incremental_ms"] > 0 and rows[0]["cpp_ms"] > 0
    assert rows[0]["error"] < 1e-5 and rows[0]["cpp_error"] < 1e-5
    assert "| 8 | 25 % |" in capsys.readouterr().out


def test_ab_steps_times_both_option_sets_on_alternating_steps(capsys):
    result = _script("ab_steps").main(["--model", "llada_like", "--batch", "1", "--gen-length", "8", "--warmup", "2",
                                       "--pairs", "3", "--a", "lowering=eager",
                                       "--b", "lowering=eager", "packed_weights=False"])
    assert result["A"]["options"] == {"tau": 0.99, "lowering": "eager"}
    assert result["B"]["options"] == {"tau": 0.99, "lowering": "eager", "packed_weights": False}
    assert result["A"]["median_ms"] > 0 and result["B"]["median_ms"] > 0
    assert "B / A (medians):" in capsys.readouterr().out


def test_ab_steps_can_compile_one_copy_through_the_dispatcher():
    result = _script("ab_steps").main(["--model", "llada_like", "--batch", "1", "--gen-length", "8", "--warmup", "2",
                                       "--pairs", "2", "--a", "lowering=eager", "--b", "lowering=eager",
                                       "--dispatched", "a"])
    assert result["A"]["median_ms"] > 0 and result["B"]["median_ms"] > 0
