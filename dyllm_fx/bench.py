"""`python -m dyllm_fx.bench` (`dyllm-bench`): the same decode under eager, Inductor and the dyllm backend,
one table of speed and fidelity.

    python -m dyllm_fx.bench --modes eager inductor dyllm --tau 0.99 0.95 --json results/bench.json
"""
import argparse
import ast
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from dyllm_fx.generate import (REMASKING, _attention_inputs, check_decoding_arguments, generate,
                               teacher_forced_agreement)
from dyllm_fx.options import POLICIES, Options
from dyllm_fx.outputs import borrowed_outputs
from dyllm_fx.stats import stats

MODES = ("eager", "inductor", "dyllm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ("mode", "tokens/s", "ms/step", "forward calls", "compile s", "speedup vs inductor",
           "token agreement", "teacher-forced top-1")


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    from dyllm_fx.models import MODELS
    from dyllm_fx.prompts import SOURCES

    p = argparse.ArgumentParser(prog="dyllm-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2_dream", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompts", default="gsm8k", choices=SOURCES)
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--tau", nargs="+", type=float, default=[0.99], help="dyllm saliency thresholds, one mode each")
    p.add_argument("--policy", nargs="+", default=[Options.policy], help="dyllm policies, one mode each")
    p.add_argument("--dyllm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another dyllm backend option for every dyllm mode (repeatable), e.g. exact_attention_below=0")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of timed decodes after the warm-ups, one decode of every mode in turn per round; "
                        "each mode keeps its best")
    p.add_argument("--remasking", default="low_confidence", choices=REMASKING)
    p.add_argument("--confidence-threshold", type=float, default=None, help="Fast-dLLM parallel decoding")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results, config and machine here")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parsed and checked options; exits with status 2 and a message naming the fix on bad ones."""
    from dyllm_fx.zoo import NOT_DECODABLE

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model in NOT_DECODABLE:
        parser.error(f"--model {args.model}: {NOT_DECODABLE[args.model]}; the decoding loop cannot run it")
    for name in ("batch", "max_prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        check_decoding_arguments(args.gen_length, args.steps, args.block_length, remasking=args.remasking,
                                 confidence_threshold=args.confidence_threshold)
    except ValueError as bad:
        parser.error(str(bad).replace("gen_length", "--gen-length").replace("block_length", "--block-length")
                     .replace("steps (", "--steps (").replace("confidence_threshold", "--confidence-threshold"))
    if bad_tau := [t for t in args.tau if not 0 < t <= 1]:
        parser.error(f"--tau values must lie in (0, 1], got {bad_tau}")
    if bad_policy := [p for p in args.policy if p not in POLICIES]:
        parser.error(f"--policy {bad_policy} unknown; valid: {', '.join(POLICIES)}")
    if bad := [item for item in args.dyllm_option if item.partition("=")[0] in ("tau", "policy")]:
        parser.error(f"--dyllm-option {bad[0]!r}: tau and policy have their own flags")
    try:
        args.dyllm_options = parse_options(args.dyllm_option)
    except ValueError as bad:
        parser.error(f"--dyllm-option: {bad}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    return args


def parse_options(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> backend options (values read as Python literals where they parse as one, else kept
    as strings); ValueError naming the fix for an item without `=` or an option `Options` refuses."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: write KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    Options.from_dict(options)
    return options


def machine_info(device: str) -> dict:
    """CPU model, cores, library versions, and the GPU when running on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "triton": version("triton")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _dyllm_extras(model) -> dict[str, str]:
    """Extra table columns for a dyllm-compiled model, from `dyllm_fx.stats`; {} when it ran unchanged."""
    graphs = stats(model)
    if not graphs:
        return {}
    return {"salient fraction": f"{sum(g.mean_salient_fraction for g in graphs) / len(graphs):.3f}",
            "ideal speedup": f"{graphs[0].ideal_speedup:.2f}x"}


def _modes(args) -> tuple[list[tuple[str, Optional[dict]]], list[str]]:
    """[(label, dyllm options or None)] in run order, and notes on skipped modes."""
    modes, notes = [], []
    for mode in dict.fromkeys(args.modes):
        if mode != "dyllm":
            modes.append((mode, None))
            continue
        extra = "".join(f" {k}={v}" for k, v in args.dyllm_options.items())
        modes += [(f"dyllm tau={tau:g} {policy}{extra}", {"tau": tau, "policy": policy, **args.dyllm_options})
                  for tau in dict.fromkeys(args.tau) for policy in dict.fromkeys(args.policy)]
    return modes, notes


def _compiled(model, mode: str, dyllm_options: Optional[dict]):
    if mode == "eager":
        return model
    if dyllm_options is None:
        return torch.compile(model)
    import dyllm_fx

    return torch.compile(model, backend=dyllm_fx.backend(**dyllm_options))


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of `fn()` over `repeats` calls after `warmup` calls (CPU timings of the
    scripts in `benchmarks/`)."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def left_to_right_steps(args, backend):
    """For the step scripts of `benchmarks/`: a fresh `args.model` compiled with `backend` on `args`' prompts (the
    benchmark's batch, `args.gen_length` masks after each prompt), and `step()`, one forward call that commits the
    next position of every sequence with its argmax (left to right, one token per step; after `gen_length` steps it
    starts again at the first generated position)."""
    from dyllm_fx.models import get_model

    model = get_model(args.model)
    ids, mask, _ = _prompts(args, model)
    mask4d, positions = _attention_inputs(model, ids, mask, args.gen_length)
    x = torch.cat([ids, torch.full((ids.shape[0], args.gen_length), model.config.mask_token_id)], dim=1)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    P, done = ids.shape[1], [0]

    def step():
        with torch.no_grad(), borrowed_outputs():  # as in generate: no copy of the logits cache
            out = compiled(x, attention_mask=mask4d, position_ids=positions)
        logits = out.logits if hasattr(out, "logits") else out
        i = P + done[0] % args.gen_length
        x[:, i] = logits[:, i - 1].argmax(-1)
        done[0] += 1

    return model, step


def _timed_decode(model, input_ids, gen_kwargs, args) -> tuple[float, "object"]:
    torch.manual_seed(args.seed)
    _sync(args.device)
    start = time.perf_counter()
    out = generate(model, input_ids, **gen_kwargs)
    _sync(args.device)
    return time.perf_counter() - start, out


@dataclass
class _Mode:
    """A mode while `run_modes` times it."""

    label: str
    dyllm_options: Optional[dict]
    model: object
    warmup_s: float
    out: object  # its last decode
    steady_s: float = math.inf  # its best timed decode


def run_modes(base_model, modes: list[tuple[str, Optional[dict]]], input_ids, gen_kwargs: dict, args,
              reference=None, progress: Callable[[str], None] = lambda label: None) -> tuple[list[dict], "object"]:
    """One result row per mode of `modes` ([(label, dyllm options or None)]), and the reference decode.

    Every mode is compiled on a fresh copy of base_model and warmed up by one decode (compilation included); then
    `args.repeats` rounds time one decode of every mode in turn, and each mode keeps its best. Taking turns puts
    every mode's decodes in the same stretch of the machine's load, so a speedup compares like with like on a
    shared machine (one mode after the other, a load that changed between them moved the ratio). Every compiled
    copy stays alive until the rounds end: memory grows with the number of modes.

    reference: the eager decode, for token agreement and teacher-forced agreement; None where "eager" is one of
    the modes (its warm-up decode is the reference then). progress: called with a short label after each decode."""
    torch._dynamo.reset()
    live: list[_Mode] = []
    # every copy is a compiled version of the same `forward`, all alive at once
    limit = torch._dynamo.config.recompile_limit + len(modes)
    with torch._dynamo.config.patch(recompile_limit=limit):
        for label, dyllm_options in modes:
            model = _compiled(copy.deepcopy(base_model), label, dyllm_options)
            warmup_s, out = _timed_decode(model, input_ids, gen_kwargs, args)
            live.append(_Mode(label, dyllm_options, model, warmup_s, out))
            if label == "eager":
                reference = out
            progress(f"{label} (warm-up)")
        for _ in range(args.repeats):
            for mode in live:
                seconds, mode.out = _timed_decode(mode.model, input_ids, gen_kwargs, args)
                mode.steady_s = min(mode.steady_s, seconds)
                progress(mode.label)
        rows = [_row(mode, reference, gen_kwargs) for mode in live]
    live.clear()
    torch._dynamo.reset()
    gc.collect()
    return rows, reference


def _row(mode: _Mode, reference, gen_kwargs: dict) -> dict:
    out, steady_s = mode.out, mode.steady_s
    row = {"mode": mode.label, "dyllm_options": mode.dyllm_options, "warmup_s": mode.warmup_s, "steady_s": steady_s,
           "compile_s": max(mode.warmup_s - steady_s, 0.0), "forward_calls": out.forward_calls,
           "tokens_per_s": out.num_generated_tokens / steady_s, "ms_per_step": 1000 * steady_s / out.forward_calls,
           "token_agreement": (out.generated == reference.generated).double().mean().item(),
           "teacher_forced_agreement": None, "extras": {}}
    if mode.dyllm_options is not None:
        row["extras"] = _dyllm_extras(mode.model)
    if mode.label != "eager":
        row["teacher_forced_agreement"] = teacher_forced_agreement(
            mode.model, reference, mask_id=gen_kwargs["mask_id"], shift_logits=gen_kwargs["shift_logits"],
            attention_mask=gen_kwargs["attention_mask"])
    return row


def format_table(rows: list[dict]) -> str:
    """A markdown table with aligned columns, one line per mode."""
    inductor = next((r for r in rows if r["mode"] == "inductor"), None)
    extra_columns = list(dict.fromkeys(k for r in rows for k in r["extras"]))

    def share(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    cells = [list(COLUMNS) + extra_columns]
    for r in rows:
        speedup = "-" if inductor is None else f"{inductor['steady_s'] / r['steady_s']:.2f}x"
        cells.append([r["mode"], f"{r['tokens_per_s']:.1f}", f"{r['ms_per_step']:.1f}", str(r["forward_calls"]),
                      f"{r['compile_s']:.1f}", speedup, share(r["token_agreement"]),
                      share(r["teacher_forced_agreement"])] + [r["extras"].get(k, "-") for k in extra_columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row, align=str.rjust):
        return "| " + " | ".join(align(c, w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _prompts(args, model):
    from dyllm_fx.models import smollm2_tokenizer
    from dyllm_fx.prompts import encode_prompts, load_prompts

    tokenizers = {"smollm2_dream": smollm2_tokenizer}
    texts = load_prompts(args.prompts, args.batch)
    tokenizer = tokenizers[args.model]() if args.model in tokenizers else None
    if tokenizer is not None:
        ids, mask = encode_prompts(texts, tokenizer, max_prompt_tokens=args.max_prompt_tokens)
    else:
        ids, mask = encode_prompts(texts, vocab_size=model.config.vocab_size, max_prompt_tokens=args.max_prompt_tokens,
                                   seed=args.seed)
    return ids, mask, tokenizer


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark and prints command, machine, config and the results table."""
    from tqdm.auto import tqdm

    from dyllm_fx.models import get_model

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "dyllm_fx.bench"] + argv)
    machine = machine_info(args.device)
    modes, notes = _modes(args)

    base_model = get_model(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    input_ids, attention_mask, tokenizer = _prompts(args, base_model)
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
    gen_kwargs = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                      mask_id=base_model.config.mask_token_id, shift_logits=bool(base_model.config.shift_logits),
                      remasking=args.remasking, confidence_threshold=args.confidence_threshold,
                      attention_mask=attention_mask, progress=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(prompt_tokens=int(input_ids.shape[1]), sequence_length=int(input_ids.shape[1]) + args.gen_length,
                  mask_id=gen_kwargs["mask_id"], shift_logits=gen_kwargs["shift_logits"])

    print(f"$ {command}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "json"))
    for note in notes:
        print(note)
    sys.stdout.flush()

    with tqdm(total=len(modes) * (1 + args.repeats) + ("eager" not in args.modes), desc="decodes",
              unit="decode") as bar:
        reference = None
        if "eager" not in args.modes:
            bar.set_postfix_str("eager reference")
            _, reference = _timed_decode(base_model, input_ids, gen_kwargs, args)
            bar.update(1)

        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        rows, reference = run_modes(base_model, modes, input_ids, gen_kwargs, args, reference, progress)

    table = format_table(rows)
    print(table)
    if args.json is not None:
        samples = tokenizer.batch_decode(reference.generated) if tokenizer is not None and reference else None
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine, "config": config, "notes": notes,
                                         "results": rows, "table": table, "eager_samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
