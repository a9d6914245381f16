"""What Inductor receives for the masked (GPU) path's ops, which are `triton_op`s: traced by AOTAutograd, on CUDA
their bodies become the Triton kernels as user-defined kernels (`triton_kernel_wrapper_functional`) among aten ops,
with no opaque op and no host synchronisation left; elsewhere they become the opaque reference ops.

The CUDA trace needs no GPU: it runs on fake CUDA tensors, in a subprocess without the Triton interpreter (an
interpreted kernel cannot take fake tensors). Without a GPU driver Triton cannot analyse which arguments a kernel
mutates, so the trace treats every argument as mutated (a warning, silenced here); on a GPU it is exact.
"""
import json
import logging
import os
import subprocess
import sys

import torch

MASKED_PATH_KERNELS = {"_row_index_kernel", "_sparse_rows_linear_kernel", "_incremental_kernel",
                       "_rows_attention_kernel", "_saliency_kernel"}


class _SparseStep(torch.nn.Module):
    """One attention layer of a sparse step as the masked path writes it: gated Q/K/V linears, the delta attention
    over its caches, and the cache write of its output."""

    def __init__(self, B, H, L, D, device):
        super().__init__()
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("k_cache", zeros(B, H, L, D))
        self.register_buffer("v_cache", zeros(B, H, L, D))
        self.register_buffer("ctx_cache", zeros(B, H, L, D))
        self.register_buffer("lse_cache", zeros(B, H, L))
        self.register_buffer("stats", zeros(2, 4, dtype=torch.long))
        self.register_buffer("out_cache", zeros(B, L, H * D))

    def forward(self, x, wq, wk, wv, rows, query, mask, dense):
        ops = torch.ops.dyllm
        B, L, _ = x.shape
        H, D = self.k_cache.shape[1], self.k_cache.shape[3]
        q, k, v = (ops.sparse_rows_linear(x, w, None, rows, 0, 1).view(B, L, H, D).transpose(1, 2)
                   for w in (wq, wk, wv))
        ctx, salient = ops.delta_attention(q, k, v, mask, rows, query, rows, dense, self.k_cache, self.v_cache,
                                           self.ctx_cache, self.lse_cache, self.stats, 1, D ** -0.5, 0.99, 0)
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
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner

    import dyllm_fx  # noqa: F401  (registers the ops)

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    B, H, L, D, K = 2, 2, 8, 16, 32
    with FakeTensorMode():
        step = _SparseStep(B, H, L, D, device)
        rows, query = (torch.ones(B, L, dtype=torch.bool, device=device) for _ in range(2))
        mask = torch.ones(L, L, dtype=torch.bool, device=device)
        inputs = (torch.randn(B, L, K, device=device), *(torch.randn(H * D, K, device=device) for _ in range(3)),
                  rows, query, mask, torch.tensor(False, device=device))
        gm, _ = aot_export_module(step, inputs, trace_joint=False)
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


def test_on_cuda_inductor_sees_the_triton_kernels_and_no_opaque_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, "cuda"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got["kernels"]) == MASKED_PATH_KERNELS, got
    assert got["kernels"].count("_sparse_rows_linear_kernel") == 3
    assert got["autotuned"] == ["_sparse_rows_linear_kernel"], got
    assert got["ops"] == [] and got["syncs"] == [], got


def test_on_cpu_inductor_sees_the_reference_ops():
    got = traced("cpu")
    assert got["kernels"] == [] and got["autotuned"] == [], got
    assert got["ops"] == ["dyllm::delta_attention_reference", "dyllm::row_update_reference",
                          "dyllm::sparse_rows_linear_reference"], got


if __name__ == "__main__":
    print(json.dumps(traced(sys.argv[1])))
