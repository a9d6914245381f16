"""Drawn plain-PyTorch architectures (`arch_zoo.architectures()`): the dyllm rewrite handles every one of them.

Per drawn architecture: (a) at tau=1.0 the compiled model reproduces eager over a drawn denoising trajectory,
in one graph with sparse steps, and `explain` reports a full rewrite (no fallback, every attention replaced by
delta attention, every linear of the policy's classes gated); (b) at tau=0.99, decoding one token per step
after the dense warm-up, every layer has sparse steps with a salient fraction below 1, and gated linears run on
fewer rows than the sequence. A drawn model the rewrite cannot handle fails the test.
"""
import warnings

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dyllm_fx
from arch_zoo import ZooLM, architectures
from dyllm_fx.passes.regions import POLICY_CLASSES
from trajectories import logits_of, rows_seen_by_gated_linears, run_both, trajectory

SPARSE_LENGTH, SPARSE_PROMPT, SPARSE_CALLS = 24, 6, 6


def padding(draw, arch, batch, length):
    """The model's `attention_mask` kwarg, when its architecture reads one: none (the model builds an all-ones
    mask), an explicit all-ones mask, or a mask whose first row has 1-3 padding positions at the end."""
    if arch.mask == "none":
        return {}
    kind = draw(st.sampled_from(["built", "ones", "padded"]), label="attention_mask")
    if kind == "built":
        return {}
    mask = torch.ones(batch, length, dtype=torch.long)
    if kind == "padded":
        mask[0, length - draw(st.integers(1, 3), label="padding"):] = 0
    return {"attention_mask": mask}


def dyllm_warnings(caught):
    return [str(w.message) for w in caught if "dyllm" in str(w.message)]


def check_rewritten(model, ids, kwargs, options):
    """explain: one graph, no fallback, every attention a delta attention, every linear the policy gates gated."""
    explanation = dyllm_fx.explain(model, ids, options=options, **kwargs)
    assert len(explanation) == 1, f"{len(explanation)} graphs (graph breaks?)\n{explanation}"
    (report,) = explanation
    assert report.fallback is None, f"fallback: {report.fallback}\n{report}"
    assert report.sites and all(s.supported for s in report.sites), f"an attention stays dense\n{report}"
    ungated = [l for l in report.linears if l.region is None and l.cls in POLICY_CLASSES[options["policy"]]]
    assert not ungated, f"linears the policy gates stay dense: {[(l.node.name, l.reason) for l in ungated]}\n{report}"


def exact_at_tau_one(data, arch, policy, exact_below):
    draw = data.draw
    model = ZooLM(arch)
    options = dict(tau=1.0, lowering="eager", dense_steps=1, policy=policy, exact_attention_below=exact_below)
    batch, length = draw(st.integers(1, 2), label="batch"), draw(st.integers(6, 14), label="length")
    kwargs = padding(draw, arch, batch, length)
    steps = trajectory(draw, batch, length, model.config.mask_token_id)
    check_rewritten(model, steps[0], kwargs, options)  # first: the cheapest check (fast shrinking)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dyllm_fx.backend(**options), dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_both(model, compiled, steps, **kwargs)
    assert not dyllm_warnings(caught), dyllm_warnings(caught)
    (g,) = dyllm_fx.stats(model)
    assert g.dense_steps == 1 and g.sparse_steps == len(steps) - 1


def sparse_below_one(data, arch, policy, exact_below):
    draw = data.draw
    model = ZooLM(arch)  # fresh parameters: stats() finds only this graph
    options = dict(tau=0.99, lowering="eager", dense_steps=1, policy=policy, exact_attention_below=exact_below)
    compiled = torch.compile(model, backend=dyllm_fx.backend(**options), dynamic=False)
    batch = draw(st.integers(1, 2), label="sparse batch")
    kwargs = padding(draw, arch, batch, SPARSE_LENGTH)
    mask_id = model.config.mask_token_id
    ids = torch.full((batch, SPARSE_LENGTH), mask_id)
    ids[:, :SPARSE_PROMPT] = torch.randint(0, mask_id - 1, (batch, SPARSE_PROMPT))
    with rows_seen_by_gated_linears() as rows_seen, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pos in range(SPARSE_PROMPT, SPARSE_PROMPT + SPARSE_CALLS):  # one token per row and step
            logits_of(compiled(ids, **kwargs))
            ids = ids.clone()
            ids[:, pos] = torch.randint(0, mask_id - 1, (batch,))
    assert not dyllm_warnings(caught), dyllm_warnings(caught)
    (g,) = dyllm_fx.stats(model)
    assert (g.dense_steps, g.sparse_steps) == (1, SPARSE_CALLS - 1)
    sparse = g.salient[~g.dense_mask]
    # Every layer skips rows on some sparse step. Not on every step: after some commits a random model's own
    # (eager) contexts move by more than 1% on every row (the new token takes much of every row's attention),
    # and then every row is rightly salient (about 3% of drawn models do so on one step or another).
    assert (sparse < 1).any(0).all(), f"a layer recomputed every row on every sparse step (step x layer):\n{sparse}"
    assert any(n < total for n, total in rows_seen), f"no gated linear ran on fewer rows than the sequence: {rows_seen}"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=architectures(), data=st.data())
def test_drawn_architecture_exact_at_tau_one_and_sparse_below(arch, data):
    torch._dynamo.reset()
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="token seed"))
    policy = data.draw(st.sampled_from(["paper", "full"]), label="policy")
    exact_below = data.draw(st.sampled_from([0, 256]), label="exact_attention_below")
    exact_at_tau_one(data, arch, policy, exact_below)
    torch._dynamo.reset()
    sparse_below_one(data, arch, policy, exact_below)
