"""Row ops against their definitions: sparse-row linear, row update, delta attention (both paths)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dyllm_fx import kernels  # noqa: F401
from dyllm_fx.kernels.dispatch import triton_on_cpu

ops = torch.ops.dyllm


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 9), d=st.integers(1, 7), out=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 99), layout=st.sampled_from(["bld", "flat", "lbd"]))
def test_sparse_rows_linear_computes_selected_rows(B, L, d, out, bias, seed, layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d, generator=g)
    w, b = torch.randn(out, d, generator=g), (torch.randn(out, generator=g) if bias else None)
    rows = torch.rand(B, L, generator=g) < 0.5
    ref = torch.nn.functional.linear(x, w, b)
    if layout == "bld":
        y, axes = ops.sparse_rows_linear(x, w, b, rows, 0, 1), None
    elif layout == "flat":
        y = ops.sparse_rows_linear(x.reshape(B * L, d), w, b, rows, 0, 0).view(B, L, out)
    else:
        y = ops.sparse_rows_linear(x.transpose(0, 1).contiguous(), w, b, rows, 1, 0).transpose(0, 1)
    assert torch.allclose(y[rows], ref[rows], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 9), H=st.integers(1, 3), seed=st.integers(0, 99))
def test_row_update_writes_only_selected_rows(B, L, H, seed):
    g = torch.Generator().manual_seed(seed)
    cache, new = torch.randn(B, H, L, 4, generator=g), torch.randn(B, H, L, 4, generator=g)
    rows = torch.rand(B, L, generator=g) < 0.5
    before = cache.clone()
    ops.row_update_(cache, new, rows, 0, 2)
    sel = rows[:, None, :, None].expand_as(cache)
    assert torch.equal(cache[sel], new[sel]) and torch.equal(cache[~sel], before[~sel])


def _state(B, H, Hk, L, D):
    z = torch.zeros
    return [z(B, Hk, L, D), z(B, Hk, L, D), z(B, H, L, D), z(B, H, L), z(4, dtype=torch.long)]


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), Hk=st.integers(1, 2), g=st.integers(1, 3), L=st.integers(2, 10),
       D=st.sampled_from([3, 4, 8]), mask_kind=st.sampled_from([None, "additive", "bool"]),
       exact_below=st.sampled_from([0, 1024]), seed=st.integers(0, 999), steps=st.integers(1, 4))
def test_delta_attention_is_exact_for_unchanged_queries(B, Hk, g, L, D, mask_kind, exact_below, seed, steps):
    """Keys/values change on a few rows per step, queries stay: the context equals full attention."""
    gen = torch.Generator().manual_seed(seed)
    H, scale = Hk * g, 1 / math.sqrt(D)
    q = torch.randn(B, H, L, D, generator=gen)
    k, v = torch.randn(B, Hk, L, D, generator=gen), torch.randn(B, Hk, L, D, generator=gen)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(B, 1, L, L, generator=gen) < 0.8
        keep[..., 0] = True
        mask = keep if mask_kind == "bool" else torch.zeros(B, 1, L, L).masked_fill(~keep, -1e9)
    state = _state(B, H, Hk, L, D)
    everyone = torch.ones(B, L, dtype=torch.bool)
    nobody = torch.zeros(B, L, dtype=torch.bool)
    out, salient = ops.delta_attention(q, k, v, mask, None, everyone, nobody, torch.tensor(True), *state, scale,
                                       1.0, exact_below)
    assert torch.allclose(out, sdpa(q, k, v, mask, scale), atol=1e-5) and salient.all()
    for _ in range(steps):
        rows = torch.rand(B, L, generator=gen) < 0.3
        k = torch.where(rows[:, None, :, None], torch.randn(B, Hk, L, D, generator=gen), k)
        v = torch.where(rows[:, None, :, None], torch.randn(B, Hk, L, D, generator=gen), v)
        garbage = lambda t: torch.where(rows[:, None, :, None], t, torch.full_like(t, float("nan")))
        out, salient = ops.delta_attention(q, garbage(k), garbage(v), mask, rows, everyone, nobody,
                                           torch.tensor(False), *state, scale, 1.0, exact_below)
        assert torch.allclose(out, sdpa(q, k, v, mask, scale), atol=1e-4)
        if not rows.any():
            assert not salient.any()


def test_delta_attention_falls_back_to_exact_rows_on_cancellation():
    """A changed key that held nearly all of a row's attention mass: the row is recomputed exactly."""
    B, H, L, D = 1, 1, 6, 4
    q = torch.zeros(B, H, L, D)
    q[..., 0] = 10.0
    k = torch.zeros(B, H, L, D)
    k[0, 0, 2, 0] = 5.0  # every query puts ~all its mass on key 2
    v = torch.randn(B, H, L, D)
    state = _state(B, H, H, L, D)
    everyone, nobody = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    ops.delta_attention(q, k, v, None, None, everyone, nobody, torch.tensor(True), *state, 1.0, 1.0, 0)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, 2] = True
    k2 = k.clone()
    k2[0, 0, 2, 0] = -5.0
    out, _ = ops.delta_attention(q, k2, v, None, rows, everyone, nobody, torch.tensor(False), *state, 1.0, 1.0, 0)
    stats = state[-1].tolist()
    assert stats[1] == L and stats[2] == 0  # every row took the exact path
    assert torch.allclose(out, sdpa(q, k2, v, None, 1.0), atol=1e-5)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_a_row_left_out_of_the_query_rows_is_recomputed_when_queried_again(triton):
    """Outside the query rows a row keeps a context that misses the step's changes; the next step that queries it
    must recompute it, not apply only that step's changes to it."""
    B, H, L, D = 1, 2, 6, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    state = _state(B, H, H, L, D)
    everyone, nobody = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    rows, rows2, query = nobody.clone(), nobody.clone(), everyone.clone()
    rows[0, 1], rows2[0, 2], query[0, 4] = True, True, False
    k1, v1 = k.clone(), v.clone()
    k1[0, :, 1] += 3.0
    v1[0, :, 1] += 100.0
    k2, v2 = k1.clone(), v1.clone()
    v2[0, :, 2] -= 1.0
    with triton_on_cpu(triton):
        ops.delta_attention(q, k, v, None, None, everyone, nobody, torch.tensor(True), *state, 0.5, 0.99, 0)
        ops.delta_attention(q, k1, v1, None, rows, query, nobody, torch.tensor(False), *state, 0.5, 0.99, 0)
        out, _ = ops.delta_attention(q, k2, v2, None, rows2, everyone, nobody, torch.tensor(False), *state, 0.5,
                                     0.99, 0)
    assert torch.allclose(out, sdpa(q, k2, v2, None, 0.5), atol=1e-5)


@pytest.mark.parametrize("exact_below", [0, 1024], ids=["incremental", "one-sdpa"])
def test_saliency_threshold_and_query_rows(exact_below):
    B, H, L, D = 1, 2, 5, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    state = _state(B, H, H, L, D)
    everyone, nobody = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    ops.delta_attention(q, k, v, None, None, everyone, nobody, torch.tensor(True), *state, 0.5, 0.99, 0)
    rows = nobody.clone()
    rows[0, 1] = True
    v2 = v.clone()
    v2[0, :, 1] += 100.0  # moves every context a lot
    query = everyone.clone()
    query[0, 4] = False
    always = nobody.clone()
    always[0, 3] = True
    ctx_before = state[2][0, :, 4].clone()
    out, salient = ops.delta_attention(q, k, v2, None, rows, query, always, torch.tensor(False), *state, 0.5,
                                       0.99, exact_below)
    assert salient[0, :4].all() and not salient[0, 4]
    assert torch.allclose(out[0, :, :4], sdpa(q, k, v2, None, 0.5)[0, :, :4], atol=1e-5)  # query rows: exact
    assert torch.equal(out[0, :, 4], ctx_before.to(out.dtype))  # not a query row: context kept


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("name", ["sparse_rows_linear", "row_update_", "delta_attention"])
def test_opcheck(name, triton):
    """Both paths of every op (on CPU the Triton one runs under the interpreter)."""
    with triton_on_cpu(triton):
        _opcheck(name)


def _opcheck(name):
    B, H, L, D = 2, 2, 5, 4
    rows = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    if name == "sparse_rows_linear":
        args = (torch.randn(B, L, 6), torch.randn(3, 6), torch.randn(3), rows, 0, 1)
        # unselected output rows are unspecified: compare whole outputs only with every row selected
        torch.library.opcheck(getattr(ops, name), args, test_utils=("test_schema", "test_faketensor"))
        args = args[:3] + (torch.ones_like(rows),) + args[4:]
    elif name == "row_update_":
        args = (torch.randn(B, L, 6), torch.randn(B, L, 6), rows, 0, 1)
    else:
        everyone, nobody = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
        args = (torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D), None, rows, everyone,
                nobody, torch.tensor(False), *_state(B, H, H, L, D), 0.5, 0.99, 0)
        # the other path: every query row exact by one SDPA call (key length <= exact_below)
        torch.library.opcheck(getattr(ops, name), args[:-1] + (1024,))
    torch.library.opcheck(getattr(ops, name), args)


def test_top_level_kernels_folder_is_hugging_face_kernels_from_the_repository_root():
    """From the repository root `kernels/` is importable as `kernels`, the name of Hugging Face's package that
    transformers imports: that import must load Hugging Face's package (or fail as without the folder)."""
    import subprocess
    import sys
    from pathlib import Path

    import dyllm_fx

    root = Path(dyllm_fx.__file__).resolve().parents[1]
    probe = ("import importlib.util, sys\n"
             "if importlib.util.find_spec('transformers') is not None: import transformers.activations\n"
             "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('none')\n"
             "else:\n    print(kernels.__file__, hasattr(kernels, 'delta_attention'))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    found = out.stdout.split()
    if found != ["none"]:
        assert Path(found[0]).resolve().parent != root / "kernels" and found[1] == "False", out.stdout
    # without Hugging Face's package on sys.path: the import fails as it would without the folder
    no_site = [p for p in sys.path if "-packages" not in p]
    probe = f"import sys; sys.path[:] = [{str(root)!r}] + {no_site!r}\nimport kernels\n"
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=root, capture_output=True, text=True)
    assert out.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
