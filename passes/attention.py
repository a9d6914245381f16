"""Finds every attention in a Dynamo graph: SDPA calls, and matmul -> softmax -> matmul written by hand.

An `AttentionSite` names the q, k, v and mask nodes, the scale, and the node whose value is the
attention output. A site is `supported` when the delta-attention op can replace it exactly: SDPA
layout `[B, H, L, D]` for q, k, v (token axis 2), self-attention over the token axis, no causal flag,
no dropout, and (hand-written) no other reader of the scores or probabilities. Otherwise `reason`
says why, and the site stays dense.
"""
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .token_axis import TokenAxisAnalysis, op_name, tensor_meta

SDPA = torch._C._nn.scaled_dot_product_attention


@dataclass
class AttentionSite:
    index: int
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    scale: float
    kind: str  # "sdpa" or "matmul-softmax"
    inner: list = field(default_factory=list)  # hand-written: scores/probability nodes replaced with it
    reason: Optional[str] = None
    softcap: Optional[float] = None  # scores = softcap * tanh(scores / softcap) before the mask (Gemma 2)
    k_memory: Optional[fx.Node] = None  # keys = cat([k_memory, k]) along the token axis: a fixed memory
    v_memory: Optional[fx.Node] = None  # (an encoder's KV cache) before the sequence's own keys
    mask_scale: float = 1.0  # the scores' scale factors outside the mask: softmax((q k^T + mask) * c) = c * mask
    mask_negated: bool = False  # `mask` is the bool fill condition of `masked_fill(scores, mask, -inf)`: True drops

    @property
    def supported(self) -> bool:
        return self.reason is None

    @property
    def heads(self) -> int:
        return int(tensor_meta(self.q).shape[1])

    @property
    def kv_heads(self) -> int:
        return int(tensor_meta(self.k).shape[1])

    @property
    def head_dim(self) -> int:
        return int(tensor_meta(self.q).shape[-1])


def _arg(node, i, name, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _is_matmul(n) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and op_name(n) == "matmul"


def _single_user(n) -> bool:
    return len(n.users) == 1


def _untranspose(kt: fx.Node) -> Optional[fx.Node]:
    """k from k^T when kt swaps the last two axes of k."""
    name = op_name(kt)
    x = kt.args[0] if kt.args else None
    ex = tensor_meta(x)
    if ex is None:
        return None
    nd = ex.dim()
    if name in ("transpose", "swapaxes") and {kt.args[1] % nd, kt.args[2] % nd} == {nd - 2, nd - 1}:
        return x
    if name == "permute":
        dims = kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        if [d % nd for d in dims] == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return x
    if name == "mT":
        return x
    return None


def _scalar(n) -> Optional[float]:
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def _softcap(s: fx.Node, inner: list) -> Optional[tuple[float, fx.Node]]:
    """(c, x) when s = c * tanh(x / c) (or x * (1 / c)); the tanh and division nodes go to `inner`."""
    a, b = (s.args + (None, None))[:2]
    if op_name(s) not in ("mul", "imul"):
        return None
    t, c = (a, _scalar(b)) if isinstance(a, fx.Node) else (b, _scalar(a))
    if c is None or not c or not isinstance(t, fx.Node) or op_name(t) != "tanh":
        return None
    d = t.args[0]
    if not isinstance(d, fx.Node):
        return None
    x, y = (d.args + (None, None))[:2]
    if op_name(d) in ("truediv", "div") and _scalar(y) == c:
        inner += [t, d]
        return c, x
    if op_name(d) == "mul" and _scalar(y) is not None and math.isclose(_scalar(y) * c, 1.0, rel_tol=1e-6):
        inner += [t, d]
        return c, x
    return None


def _drops_column(value) -> bool:
    """A fill value after which softmax gives the column weight 0 (as a False in SDPA's bool mask), as long as
    the row keeps one column: -inf, or a float at most float16's lowest (`torch.finfo(dtype).min`)."""
    return isinstance(value, float) and value <= torch.finfo(torch.float16).min


def _is_bool(n) -> bool:
    return tensor_meta(n) is not None and tensor_meta(n).dtype == torch.bool


def _bool_mask(cond: fx.Node) -> tuple[fx.Node, bool]:
    """(mask, negated) for a fill condition: `~keep` / `logical_not(keep)` gives `keep` itself."""
    if op_name(cond) in ("invert", "logical_not") and isinstance(cond.args[0], fx.Node):
        return cond.args[0], False
    return cond, True


def _match_handwritten(out: fx.Node) -> Optional[AttentionSite]:
    """out = matmul(P, v), P = [dropout|to]* softmax([add mask] [softcap] [mul|div scale] matmul(q, k^T)),
    softcap: c * tanh(scores / c)."""
    p, v = out.args[0], out.args[1]
    inner = []
    while isinstance(p, fx.Node) and op_name(p) in ("dropout", "to", "type_as", "float", "contiguous"):
        inner.append(p)
        p = p.args[0]
    if not (isinstance(p, fx.Node) and op_name(p) == "softmax"):
        return None
    dim = _arg(p, 1, "dim")
    if dim is None or tensor_meta(p) is None or dim % tensor_meta(p).dim() != tensor_meta(p).dim() - 1:
        return None
    inner.append(p)
    s, mask, scale, softcap, negated = p.args[0], None, 1.0, None, False
    mask_scale, mask_in_cap = 1.0, False
    while isinstance(s, fx.Node) and not _is_matmul(s):
        inner.append(s)
        name = op_name(s)
        a, b = (s.args + (None, None))[:2]
        capped = _softcap(s, inner) if softcap is None and scale == 1.0 else None
        if capped is not None:
            softcap, s = capped
        elif name in ("add", "iadd") and isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if mask is not None:
                return None
            scores_first = _is_matmul(a) or op_name(a) in ("mul", "truediv", "div", "to", "float")
            s, mask = (a, b) if scores_first else (b, a)
            mask_scale, mask_in_cap = scale, softcap is not None  # the scale found so far is applied to the mask too
        elif name in ("masked_fill", "masked_fill_") and isinstance(a, fx.Node) and _is_bool(b) and \
                _drops_column(_arg(s, 2, "value")):  # scores.masked_fill(drop, -inf)
            if mask is not None:
                return None
            (mask, negated), s = _bool_mask(b), a
            mask_in_cap = softcap is not None
        elif name == "where" and len(s.args) == 3 and _is_bool(a) and isinstance(b, fx.Node) and \
                _drops_column(s.args[2]):  # torch.where(keep, scores, -inf)
            if mask is not None:
                return None
            mask, s = a, b
            mask_in_cap = softcap is not None
        elif name in ("mul", "imul") and isinstance(b, (int, float)):
            scale, s = scale * b, a
        elif name in ("mul",) and isinstance(a, (int, float)):
            scale, s = scale * a, b
        elif name in ("truediv", "div", "itruediv") and isinstance(b, (int, float)):
            scale, s = scale / b, a
        elif name in ("to", "float"):
            s = a
        else:
            return None
    if not _is_matmul(s):
        return None
    inner.append(s)
    q, kt = s.args[0], s.args[1]
    k = _untranspose(kt) if isinstance(kt, fx.Node) else None
    if k is None:
        return None
    inner.append(kt)
    site = AttentionSite(-1, out, q, k, v, mask, float(scale), "matmul-softmax", inner=inner, softcap=softcap,
                         mask_negated=negated, mask_scale=float(mask_scale))
    if mask_in_cap:
        site.reason = "the mask is applied inside the soft-cap (c * tanh((scores + mask) / c)): apply it after"
    elif any(not _single_user(n) for n in inner if n is not kt):
        site.reason = "the attention scores or probabilities are read elsewhere (e.g. returned)"
    return site


def find_attention(gm: fx.GraphModule, analysis: TokenAxisAnalysis) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_function" and node.target is SDPA:
            q, k, v = node.args[:3]
            mask = _arg(node, 3, "attn_mask")
            scale = _arg(node, 6, "scale")
            D = int(tensor_meta(q).shape[-1])
            site = AttentionSite(-1, node, q, k, v, mask, float(scale) if scale is not None else 1 / math.sqrt(D), "sdpa")
            if _arg(node, 5, "is_causal", False):
                site.reason = ("causal attention (is_causal=True): not a bidirectional diffusion LM layer; make it "
                               "bidirectional (transformers: config.is_causal = False)")
            elif _arg(node, 4, "dropout_p", 0.0):
                site.reason = "attention dropout is active (train mode?)"
        elif _is_matmul(node) and node in analysis.varying:
            site = _match_handwritten(node)
        if site is None:
            continue
        site.index = len(sites)
        if site.reason is None:
            site.reason = _split_memory(site, analysis) or _layout_problem(site, analysis)
        sites.append(site)
    return sites


def _split_memory(site: AttentionSite, analysis: TokenAxisAnalysis) -> Optional[str]:
    """Keys and values that are `cat([memory, x], token axis)` with a memory that does not depend on the token
    input (an encoder's KV cache, sink tokens): the site keeps `x` as k/v and the memory apart."""
    found = {}
    for name in ("k", "v"):
        node = getattr(site, name)
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.cat):
            continue
        parts, ex = node.args[0], tensor_meta(node)
        dim = _arg(node, 1, "dim", 0)
        if ex is None or ex.dim() != 4 or not isinstance(dim, int) or dim % 4 != 2 or len(parts) != 2:
            continue
        memory, tokens = parts
        mem = tensor_meta(memory)
        if memory in analysis.varying or tokens not in analysis.varying or mem is None or mem.dim() != 4 or \
                mem.numel() == 0:  # an empty KV cache (`cat([tensor([]), k])`) is no memory: the cat is k itself
            continue
        found[name] = (memory, tokens)
    if not found:
        return None
    if len(found) == 1 or tensor_meta(found["k"][0]).shape[2] != tensor_meta(found["v"][0]).shape[2]:
        return "keys and values do not share one fixed memory before the sequence"
    (site.k_memory, site.k), (site.v_memory, site.v) = found["k"], found["v"]
    return None


def _layout_problem(site: AttentionSite, analysis: TokenAxisAnalysis) -> Optional[str]:
    for name in ("q", "k", "v"):
        node = getattr(site, name)
        ex = tensor_meta(node)
        if ex is None or ex.dim() != 4:
            return f"{name} is not a 4-D [B, H, L, D] tensor"
        if node not in analysis.varying:
            return f"{name} does not depend on the token input (cross-attention to a fixed memory)"
        a = analysis.axes.get(node)
        if a is None:
            return f"the token axis of {name} could not be proven"
        if a.token != 2 or a.batch not in (0, -1) or a.expand != 1:
            return f"{name} is not in [B, H, L, D] layout (token axis {a.token})"
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q.shape[1] % k.shape[1]:
        return "query heads are not a multiple of key/value heads"
    if site.mask is not None:
        if site.mask in analysis.varying:
            return "the attention mask depends on the token values"
        m = tensor_meta(site.mask)
        if m is None or m.dim() > 4:
            return "the attention mask is not a tensor of rank <= 4"
    return None
