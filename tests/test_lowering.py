"""What Inductor receives for the masked (GPU) path's ops, which are `triton_op`s: traced by AOTAutograd, on CUDA
their bodies become the Triton kernels as user-defined kernels (`triton_kernel_wrapper_functional`) among aten ops,
with no opaque op and no host synchronisation left; elsewhere they become the opaque reference ops.

The CUDA traces need no GPU. One sparse step runs on fake CUDA tensors; a whole model, whose own code slices
tensors (which a CPU-only torch build cannot do on fake CUDA tensors), runs on the meta device with the ops told to
take their CUDA branch there. Both run in a subprocess without the Triton interpreter (an interpreted kernel cannot
take fake tensors). Without a GPU driver Triton cannot analyse which arguments a kernel mutates, so the trace treats
every argument as mutated (a warning, silenced here); on a GPU it is exact.
"""
import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

MASKED_PATH_KERNELS = {"_row_index_kernel", "_sparse_rows_linear_kernel", "_incremental_kernel",
                       "_rows_attention_kernel", "_saliency_kernel"}


class _SparseStep(torch.nn.Module):
    """One attention layer of a sparse step as the masked path writes it: gated Q/K/V linears, the delta attention
    over its caches and a fixed memory (DiffusionGemma's decoder), and the cache write of its output."""

    def __init__(self, B, H, L, D, device):
        super().__init__()
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("k_cache", zeros(B, H, L, D))
        self.register_buffer("v_cache", zeros(B, H, L, D))
        self.register_buffer("ctx_cache", zeros(B, H, L, D))
        self.register_buffer("lse_cache", zeros(B, H, L))
        self.register_buffer("stats", zeros(4, dtype=torch.long))
        self.register_buffer("out_cache", zeros(B, L, H * D))

    def forward(self, x, wq, wk, wv, rows, query, mask, dense, k_memory, v_memory):
        ops = torch.ops.dyllm
        B, L, _ = x.shape
        H, D = self.k_cache.shape[1], self.k_cache.shape[3]
        q, k, v = (ops.sparse_rows_linear(x, w, None, rows, 0, 1).view(B, L, H, D).transpose(1, 2)
                   for w in (wq, wk, wv))
        ctx, salient = ops.delta_attention(q, k, v, mask, rows, query, rows, dense, self.k_cache, self.v_cache,
                                           self.ctx_cache, self.lse_cache, self.stats, D ** -0.5, 0.99, 0,
                                           k_memory, v_memory)
        ops.row_update_(self.out_cache, ctx.transpose(1, 2).reshape(B, L, H * D), salient, 0, 1)
        return (self.out_cache + 1,)


def _name(kernel) -> str:
    """A kernel's function name, through the autotuner and `@triton.jit` wrappers."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def traced(device: str) -> dict:
    """Kernel names and dyllm op names in the AOTAutograd graph of one `_SparseStep` on fake `device` tensors."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dyllm_fx  # noqa: F401  (registers the ops)

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    B, H, L, D, K, P = 2, 2, 8, 16, 32, 4
    with FakeTensorMode():
        step = _SparseStep(B, H, L, D, device)
        rows, query = (torch.ones(B, L, dtype=torch.bool, device=device) for _ in range(2))
        mask = torch.ones(L, P + L, dtype=torch.bool, device=device)
        inputs = (torch.randn(B, L, K, device=device), *(torch.randn(H * D, K, device=device) for _ in range(3)),
                  rows, query, mask, torch.tensor(False, device=device),
                  *(torch.randn(B, H, P, D, device=device) for _ in range(2)))
        gm, _ = aot_export_module(step, inputs, trace_joint=False)
    return _contents(gm)


def _contents(gm) -> dict:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner

    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in calls
               if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    functionalized = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)
    targets = [n.args[0] if n.target in functionalized else n.target for n in calls]
    return dict(
        kernels=sorted(_name(k) for k in kernels),
        autotuned=sorted({_name(k) for k in kernels if isinstance(k, Autotuner) and len(k.configs) > 1}),
        ops=sorted({t.name() for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "dyllm"}),
        syncs=sorted({str(t) for t in targets if t in (torch.ops.aten._local_scalar_dense.default,
                                                       torch.ops.aten.nonzero.default)}))


def traced_model(kind: str, policy: str) -> dict:
    """The same for a whole test-bed model rewritten by the backend for the GPU (the masked path): its Dynamo graph,
    captured on CPU, moved to the meta device, rewritten, and traced by AOTAutograd."""
    from torch._functorch.aot_autograd import aot_export_module

    from dyllm_fx import models, zoo
    from dyllm_fx.backend import CompiledGraph
    from dyllm_fx.options import Options

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    gpu_branch = lambda t, _cpu=importlib.import_module("dyllm_fx.kernels.dispatch").use_triton: (  # noqa: E731
        t.device.type == "meta" or _cpu(t))
    for module in ("dispatch", "sparse_rows_linear", "row_update", "delta_attention"):
        setattr(importlib.import_module(f"dyllm_fx.kernels.{module}"), "use_triton", gpu_branch)
    model = (zoo.ZOO.get(kind) or getattr(models, kind))(**MODEL_SIZES[kind]).eval()
    captured = {}

    def capture(gm, example_inputs):
        captured.update(gm=gm, example_inputs=example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(torch.randint(0, 50, (2, 12)))
    gm = captured["gm"]
    meta = lambda a: torch.device("meta") if isinstance(a, torch.device) else "meta" if a == "cpu" else a  # noqa
    for node in gm.graph.nodes:
        node.args, node.kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), meta)
    gm.recompile()
    inputs = [torch.empty_strided(e.shape, e.stride(), dtype=e.dtype, device="meta")
              for e in captured["example_inputs"]]
    with torch.no_grad():
        graph = CompiledGraph(gm, inputs, Options.from_dict(dict(policy=policy, lowering="eager")), None)
        assert graph.report.fallback is None and not graph.compact, graph.report
        traced_gm, _ = aot_export_module(graph.rewritten, inputs + list(graph.state.tensors), trace_joint=False)
    return dict(_contents(traced_gm), layers=MODEL_SIZES[kind]["num_layers"], fused_pairs=graph.report.fused_pairs)


MODEL_SIZES = {
    "dream_like": dict(hidden_size=32, num_layers=2, num_kv_heads=2, gqa_ratio=2, head_dim=8, vocab_size=61),
    "llada_like": dict(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53),
    "gemma2": dict(num_layers=2),  # soft-capped attention scores
}


def _in_subprocess(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_on_cuda_inductor_sees_the_triton_kernels_and_no_opaque_op():
    got = _in_subprocess("step", "cuda")
    assert set(got["kernels"]) == MASKED_PATH_KERNELS, got
    assert got["kernels"].count("_sparse_rows_linear_kernel") == 3
    assert got["autotuned"] == ["_sparse_rows_linear_kernel"], got
    assert got["ops"] == [] and got["syncs"] == [], got


def test_on_cpu_inductor_sees_the_reference_ops():
    got = traced("cpu")
    assert got["kernels"] == [] and got["autotuned"] == [], got
    assert got["ops"] == ["dyllm::delta_attention_reference", "dyllm::row_update_reference",
                          "dyllm::sparse_rows_linear_reference"], got


@pytest.mark.parametrize("kind,policy", [("dream_like", "full"), ("llada_like", "paper"), ("gemma2", "full")])
def test_a_whole_model_on_the_gpu_path_is_triton_kernels_and_aten_ops(kind, policy):
    got = _in_subprocess("model", kind, policy)
    assert set(got["kernels"]) == MASKED_PATH_KERNELS and got["ops"] == [] and got["syncs"] == [], got
    assert got["kernels"].count("_saliency_kernel") == got["layers"]  # one delta attention per layer
    assert got["fused_pairs"] == got["layers"]  # every MLP's gate and up in one kernel


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    print(json.dumps(traced(*args) if what == "step" else traced_model(*args)))
