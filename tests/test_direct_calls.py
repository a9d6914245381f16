"""`kernels/direct_calls.py`: Inductor's Python wrapper calls our CPU ops' implementations, not the dispatcher."""
import contextlib

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import dyllm_fx
from dyllm_fx.kernels import direct_calls
from dyllm_fx.models import llada_like

needs_registry = pytest.mark.skipif(not direct_calls.REGISTERED, reason="this Inductor has no custom wrapper codegen")


def _two_steps(direct: bool, policy: str = "full") -> tuple[str, list[torch.Tensor]]:
    """The compiled wrapper's source and the logits of a dense and a sparse step of a small model at tau=0.99."""
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53, seed=0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy=policy, dense_steps=1), dynamic=False)
    with torch.no_grad(), contextlib.nullcontext() if direct else direct_calls.dispatched(), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        first, codes = run_and_get_code(compiled, ids)
        ids[:, 5] = 7
        second = compiled(ids)  # a sparse step: every op of the rewritten graph runs
    return "\n".join(codes), [out.logits.clone() for out in (first, second)]


@needs_registry
def test_the_compiled_wrapper_calls_the_ops_directly_with_the_dispatchers_results():
    source, direct = _two_steps(direct=True)
    for name, _, _ in direct_calls.DIRECT.values():
        assert f"extern_kernels.{name}(" in source
    assert not any(f"{op}(" in source for op in direct_calls.DIRECT)  # comments still name the ops
    source, dispatched = _two_steps(direct=False)
    assert "torch.ops.dyllm.packed_linear.default(" in source and "extern_kernels.dyllm_" not in source
    for a, b in zip(direct, dispatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_registry
def test_an_argument_left_at_its_schema_default_is_passed_by_name():
    """"paper" leaves the attention step's `rows_only` at its default, which Inductor's wrapper writes by name."""
    source, logits = _two_steps(direct=True, policy="paper")
    assert "rows_only=False" in source and all(t.isfinite().all() for t in logits)


@needs_registry
def test_a_direct_call_is_a_named_event_under_the_profiler():
    call = getattr(torch._inductor.select_algorithm.extern_kernels, "dyllm_select_rows")
    with torch.profiler.profile() as prof:
        call(torch.tensor([[True, False, True]]))
    assert "dyllm::select_rows" in [e.key for e in prof.key_averages()]


@needs_registry
def test_dispatched_turns_the_direct_calls_off_and_back_on():
    from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN as registry

    with direct_calls.dispatched():
        assert not set(direct_calls.DIRECT) & set(registry)
    assert set(direct_calls.DIRECT) <= set(registry)
