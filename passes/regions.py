"""Which row set gates which linear: the saliency of the nearest attention upstream of it.

Region `i` is attention `i`'s salient set; region -1 is the set of rows whose input changed since the
previous call (layer 0's entering set). Each linear is classified by where it sits between attentions:
`kv` (feeds an attention's key or value), `q` (feeds a query), `out_proj` (reads an attention's output),
`head` (no linear or attention after it: the LM head), `mlp` (the rest: FFN, MoE, routers). The policy
decides which classes are gated: "paper" gates `kv` and `mlp`; "full" gates every linear.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from .attention import AttentionSite
from .token_axis import TokenAxisAnalysis, op_name, tensor_meta

POLICY_CLASSES = {"paper": {"kv", "mlp"}, "full": {"kv", "q", "out_proj", "mlp", "head"}}


@dataclass
class LinearSite:
    node: fx.Node
    cls: str
    region: Optional[int]  # None: stays dense (why: `reason`)
    flops_per_row: int
    reason: Optional[str] = None


def _is_linear(n: fx.Node) -> bool:
    return n.op == "call_function" and op_name(n) == "linear"


def _attention_inputs(sites):
    roles = {}
    for s in sites:
        roles.setdefault(s.q, set()).add(("q", s.index))
        for kv in (s.k, s.v):
            roles.setdefault(kv, set()).add(("kv", s.index))
    return roles


def plan_linears(gm: fx.GraphModule, analysis: TokenAxisAnalysis, sites: list[AttentionSite],
                 policy: str) -> list[LinearSite]:
    outputs = {s.output: s for s in sites}
    roles = _attention_inputs(sites)
    # nearest upstream attention (highest index) of every varying node; -1: none
    upstream: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node in analysis.varying:
            up = max((upstream.get(a, -1) for a in node.all_input_nodes), default=-1)
            upstream[node] = outputs[node].index if node in outputs else up

    linears = []
    for node in gm.graph.nodes:
        if not _is_linear(node) or node not in analysis.varying:
            continue
        w = tensor_meta(node.args[1])
        cls = _classify(node, roles, outputs)
        site = LinearSite(node, cls, None, int(w.shape[0]) * int(w.shape[1]))
        x = node.args[0]
        if cls not in POLICY_CLASSES[policy]:
            site.reason = f"{cls} projection: dense under policy {policy!r}"
        elif analysis.axes.get(x) is None or node not in analysis.rowwise:
            site.reason = "the token axis of its input could not be proven"
        elif upstream[node] >= 0 and not sites[upstream[node]].supported:
            site.reason = "below an attention that stays dense"
        else:
            site.region = upstream[node]
        linears.append(site)
    return linears


def _classify(lin: fx.Node, roles, outputs) -> str:
    # downstream through non-linear ops: which attention inputs it reaches
    reached, frontier, seen = set(), [lin], {lin}
    any_linear_after = False
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if _is_linear(u) or u in outputs:
                any_linear_after = True
                continue
            frontier.append(u)
    for n in seen | {lin}:
        for role, _ in roles.get(n, ()):
            reached.add(role)
    if "q" in reached:
        return "q"
    if "kv" in reached:
        return "kv"
    # upstream through non-linear ops: does it read an attention output directly
    frontier, seen = [lin.args[0]], set()
    while frontier:
        n = frontier.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in outputs:
            return "out_proj"
        if _is_linear(n) or n.op == "placeholder":
            continue
        frontier.extend(n.all_input_nodes)
    if not any_linear_after:
        return "head"
    return "mlp"
