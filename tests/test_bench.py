"""The benchmark command: a tiny eager run end to end, the table, and option errors."""
import json

import pytest
import torch

from dyllm_fx.bench import COLUMNS, format_table, main

TINY = ["--model", "llada_like", "--batch", "2", "--gen-length", "8", "--steps", "8", "--block-length", "4",
        "--modes", "eager", "--prompts", "builtin"]


def test_eager_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert main(TINY + ["--json", str(path), "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["command"] == printed.splitlines()[0][2:] and "--model llada_like" in result["command"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == torch.__version__
    assert result["config"]["gen_length"] == 8 and result["config"]["mask_id"] == 511
    [row] = result["results"]
    assert row["mode"] == "eager" and row["forward_calls"] == 8 and row["token_agreement"] == 1.0
    assert row["teacher_forced_agreement"] is None
    assert row["tokens_per_s"] == pytest.approx(2 * 8 / row["steady_s"])
    assert row["compile_s"] == pytest.approx(max(row["warmup_s"] - row["steady_s"], 0.0))
    table = printed[printed.index("| mode"):].strip().splitlines()
    assert table == result["table"].splitlines() and len(table) == 3
    assert len({len(line) for line in table}) == 1
    assert [c.strip() for c in table[0].strip("|").split("|")] == list(COLUMNS)
    assert table[2].split("|")[1].strip() == "eager"


def row(mode, seconds, **extra):
    return {"mode": mode, "steady_s": seconds, "tokens_per_s": 16 / seconds, "ms_per_step": 1000 * seconds / 8,
            "forward_calls": 8, "compile_s": 1.0, "token_agreement": 0.5, "teacher_forced_agreement": 0.75,
            "extras": extra}


def test_table_speedup_and_extra_columns():
    lines = format_table([row("inductor", 2.0), row("dyllm tau=0.99 paper", 1.0, salient="0.300")]).splitlines()
    assert lines[0].split("|")[-2].strip() == "salient"
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[5:] == ["2.00x", "50.0%", "75.0%", "0.300"]
    assert [c.strip() for c in lines[2].strip("|").split("|")][-1] == "-"


@pytest.mark.parametrize("change, message", [
    (["--gen-length", "10"], "--gen-length (10) must be a multiple of --block-length (4)"),
    (["--steps", "3"], "--steps (3) must be a positive multiple"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--tau", "1.5"], "--tau values must lie in (0, 1]"),
    (["--policy", "fastest"], "--policy ['fastest'] unknown"),
    (["--modes", "turbo"], "invalid choice: 'turbo'"),
    (["--confidence-threshold", "2"], "--confidence-threshold (2.0) must be in (0, 1]"),
    (["--model", "gpt5"], "invalid choice: 'gpt5'"),
    (["--dyllm-option", "tua=1"], "unknown dyllm option(s) ['tua']"),
    (["--dyllm-option", "exact_attention_below"], "write KEY=VALUE"),
    (["--dyllm-option", "dense_steps=0"], "dense_steps=0"),
])
def test_bad_options_exit_with_a_message(change, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + change)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits(capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--device", "cuda"])
    assert "use --device cpu" in capsys.readouterr().err


def test_dyllm_options_reach_every_dyllm_mode():
    from dyllm_fx.bench import _modes, parse_args

    args = parse_args(TINY[:-4] + ["--modes", "dyllm", "--tau", "0.99", "--policy", "paper", "full",
                                   "--dyllm-option", "exact_attention_below=0", "--dyllm-option", "dense_steps=2"])
    modes, notes = _modes(args)
    assert not notes and [label for label, _ in modes] == [
        "dyllm tau=0.99 paper exact_attention_below=0 dense_steps=2", "dyllm tau=0.99 full exact_attention_below=0 dense_steps=2"]
    assert modes[1][1] == {"tau": 0.99, "policy": "full", "exact_attention_below": 0, "dense_steps": 2}


def test_modes_take_turns_after_their_warm_ups_and_each_keeps_its_best(monkeypatch):
    from dyllm_fx import bench
    from dyllm_fx.models import get_model

    args = bench.parse_args(TINY[:-3] + ["eager", "dyllm", "--dyllm-option", "lowering='eager'", "--repeats", "3",
                                         "--prompts", "builtin"])
    modes, _ = bench._modes(args)
    base = get_model(args.model)
    ids, mask, _ = bench._prompts(args, base)
    gen_kwargs = dict(gen_length=8, steps=8, block_length=4, mask_id=base.config.mask_token_id,
                      shift_logits=bool(base.config.shift_logits), attention_mask=mask)
    seconds = iter([5.0, 6.0, 3.0, 4.0, 2.0, 9.0, 4.0, 1.0])  # warm-ups, then 3 rounds of (eager, dyllm)
    timed = bench._timed_decode
    monkeypatch.setattr(bench, "_timed_decode", lambda *a: (next(seconds), timed(*a)[1]))
    labels = []
    rows, reference = bench.run_modes(base, modes, ids, gen_kwargs, args, progress=labels.append)
    dyllm = modes[1][0]
    assert labels == ["eager (warm-up)", f"{dyllm} (warm-up)"] + ["eager", dyllm] * 3
    assert [(r["warmup_s"], r["steady_s"]) for r in rows] == [(5.0, 2.0), (6.0, 1.0)]
    assert rows[0]["teacher_forced_agreement"] is None and rows[1]["teacher_forced_agreement"] == 1.0
    assert rows[1]["token_agreement"] == 1.0 and rows[1]["extras"]["ideal speedup"].endswith("x")
    assert reference is not None and reference.generated.shape == (2, 8)
