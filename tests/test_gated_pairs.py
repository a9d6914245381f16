"""`passes/gated_pairs.py`: which gate/up pairs of sparse-row linears become one op, and that the graph computes
the same rows after; and the op's gated epilogue on both paths (reference, Triton under the interpreter)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx

import dyllm_fx
from dyllm_fx.kernels.dispatch import triton_on_cpu
from dyllm_fx.models import dream_like
from dyllm_fx.passes.gated_pairs import fuse_gated_pairs

linear = torch.ops.dyllm.sparse_rows_linear.default
B, L, K, N = 2, 6, 8, 12


def mlp(act, *, same_rows=True, gate_reused=False, up_bias=False):
    def forward(x, wg, wu, wd, bu, rows, other_rows):
        gate = linear(x, wg, None, rows, 0, 1)
        up = linear(x, wu, bu if up_bias else None, rows if same_rows else other_rows, 0, 1)
        h = act(gate) * up
        out = linear(h, wd, None, rows, 0, 1)
        return out + gate.sum(-1, keepdim=True) if gate_reused else out
    return fx.symbolic_trace(forward)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(B, L, generator=g) < 0.5
    rows[0, 0] = True
    return (torch.randn(B, L, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, K, generator=g),
            torch.randn(K, N, generator=g), torch.randn(N, generator=g), rows, rows | True)


@pytest.mark.parametrize("act,fused", [
    (F.silu, 1), (F.gelu, 1), (lambda t: F.gelu(t, approximate="tanh"), 1), (torch.relu, 0)],
    ids=["silu", "gelu", "gelu-tanh", "relu"])
def test_activations_the_kernel_has_are_fused(act, fused):
    gm = mlp(act)
    args = inputs()
    rows = args[5]
    before = gm(*args)[rows]
    assert fuse_gated_pairs(gm) == fused
    assert sum(n.target is linear for n in gm.graph.nodes) == 3 - fused
    assert torch.allclose(gm(*args)[rows], before, atol=1e-5)


@pytest.mark.parametrize("case", [dict(same_rows=False), dict(gate_reused=True), dict(up_bias=True)],
                         ids=["other-rows", "gate-reused", "one-bias"])
def test_pairs_that_cannot_share_one_pass_stay_apart(case):
    gm = mlp(F.silu, **case)
    assert fuse_gated_pairs(gm) == 0


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2", None])
def test_gated_epilogue_on_the_selected_rows(activation, triton):
    x, wg, wu, _, bu, rows, _ = inputs(1)
    bg = torch.randn(N)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "relu2": lambda t: F.relu(t).square(), None: lambda t: t}[activation]
    with triton_on_cpu(triton):
        out = torch.ops.dyllm.sparse_rows_linear(x, wg, bg, rows, 0, 1, activation, wu, bu)
    assert torch.allclose(out[rows], (act(F.linear(x, wg, bg)) * F.linear(x, wu, bu))[rows], atol=1e-4)


def test_bad_epilogue_names_the_valid_ones():
    x, wg, wu, _, bu, rows, _ = inputs()
    with pytest.raises(ValueError, match="valid: None, silu"):
        torch.ops.dyllm.sparse_rows_linear(x, wg, None, rows, 0, 1, "tanh")
    with pytest.raises(ValueError, match="bias2 must be given exactly when bias is"):
        torch.ops.dyllm.sparse_rows_linear(x, wg, None, rows, 0, 1, "silu", wu, bu)


def test_the_masked_path_fuses_every_mlp_and_the_compact_path_none():
    model = dream_like(hidden_size=32, num_layers=2, num_kv_heads=2, gqa_ratio=2, head_dim=8, vocab_size=61).eval()
    ids = torch.randint(0, 60, (1, 8))
    (masked,) = dyllm_fx.explain(model, ids, options=dict(compact_rows=False))
    (compact,) = dyllm_fx.explain(model, ids, options=dict(compact_rows=True))
    assert masked.fused_pairs == 2 and compact.fused_pairs == 0
    assert "gated pairs: 2" in str(masked)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_opcheck_with_the_gated_epilogue(triton):
    x, wg, wu, _, bu, rows, _ = inputs(2)
    with triton_on_cpu(triton):
        torch.library.opcheck(torch.ops.dyllm.sparse_rows_linear.default,
                              (x, wg, torch.randn(N), torch.ones_like(rows), 0, 1, "silu", wu, bu))


def test_every_activation_of_the_op_has_a_kernel_code():
    import importlib

    names = importlib.import_module("dyllm_fx.kernels.sparse_rows_linear").ACTIVATIONS
    codes = importlib.import_module("dyllm_fx.kernels.sparse_rows_linear_triton").ACTIVATIONS
    assert set(codes) == {None, *names} and len(set(codes.values())) == len(codes)
