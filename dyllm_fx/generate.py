"""One decoding loop for masked-diffusion LMs: LLaDA (semi-autoregressive blocks, low-confidence
remasking), Dream (shifted logits, entropy / margin confidence) and Fast-dLLM (confidence-threshold
parallel decoding).

    out = generate(model, input_ids, gen_length=128, steps=128, block_length=32)
    out.generated                     # [B, gen_length]
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from dyllm_fx.backend import graphs_of
from dyllm_fx.kernels import logits_scan
from dyllm_fx.outputs import borrowed_outputs, rows_written
from dyllm_fx.stats import reset

REMASKING = ("low_confidence", "random", "entropy", "margin")


@dataclass
class StepRecord:
    """One denoising step: what the model saw, what it predicted, what was committed."""

    block: int
    step: int  # step index within the block
    inputs: torch.LongTensor  # [B, L] x before this step's commit
    argmax: torch.LongTensor  # [B, gen_length] noise-free argmax of the (shifted) logits of the generated part
    committed: torch.BoolTensor  # [B, L] positions changed by this step (EOS fill included)
    num_committed: list[int]  # per sequence


@dataclass
class GenerateOutput:
    """Decoded tokens (prompt + generation), every step's record, and the number of model calls."""

    tokens: torch.LongTensor  # [B, P + gen_length]
    records: list[StepRecord]
    forward_calls: int
    gen_length: int

    @property
    def generated(self) -> torch.LongTensor:
        """The generated part, [B, gen_length]."""
        return self.tokens[:, self.tokens.shape[1] - self.gen_length:]

    @property
    def num_generated_tokens(self) -> int:
        """B * gen_length."""
        return self.generated.numel()


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps of a block (LLaDA's `get_num_transfer_tokens`):
    block_length // steps each, the remainder spread one by one over the first steps."""
    base, remainder = divmod(block_length, steps)
    return [base + (i < remainder) for i in range(steps)]


def _model_dtype(model) -> torch.dtype:
    for tensors in ("parameters", "buffers"):
        for t in getattr(model, tensors, lambda: ())():
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def _attention_inputs(model, input_ids, attention_mask, gen_length):
    """(mask4d [B,1,L,L] additive, position_ids [B,L]) for a padded prompt, or (None, None)."""
    if attention_mask is None:
        return None, None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}: pass the [B, P] mask of the prompt (1 = real token)")
    B = input_ids.shape[0]
    real = torch.cat([attention_mask.to(input_ids.device).bool(),
                      torch.ones(B, gen_length, dtype=torch.bool, device=input_ids.device)], dim=1)
    L = real.shape[1]
    dtype = _model_dtype(model)
    mask4d = torch.zeros(B, 1, L, L, dtype=dtype, device=input_ids.device)
    mask4d.masked_fill_(~real[:, None, None, :], torch.finfo(dtype).min)
    position_ids = (real.long().cumsum(1) - 1).clamp(min=0)
    return mask4d, position_ids


def _forward(model, x, mask4d, position_ids, static: bool = False) -> torch.Tensor:
    """The model's logits [B, L, V] for x. static: a new input length compiles a static graph of its own instead
    of Dynamo's dynamic-shape graph (which the dyllm backend runs unchanged). Dynamo's automatic dynamic shapes
    are switched off for the call rather than the inputs marked static: a mark is guarded on, so marking inputs
    of an already compiled length would compile it again. The logits may be a dyllm cache buffer
    (`borrowed_outputs`): valid until the model's next call."""
    if static:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            return _forward(model, x, mask4d, position_ids)
    with borrowed_outputs():  # both callers read the logits before the next call
        out = model(x) if mask4d is None else model(x, attention_mask=mask4d, position_ids=position_ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits [B, L, V] (or an object with .logits) for input "
                         f"{tuple(x.shape)}; got {shape}")
    return logits


def _predicting(logits, start: int, end: int, shift_logits: bool) -> torch.Tensor:
    """The logits predicting positions start..end-1: column i - 1 predicts position i when shifted (position 0
    its own). A view, no copy, where the columns are consecutive (every range but one starting at 0, shifted)."""
    if not shift_logits:
        return logits[:, start:end]
    if start >= 1:
        return logits[:, start - 1:end - 1]
    return logits[:, (torch.arange(start, end, device=logits.device) - 1).clamp(min=0)]


def first_argmax(x: torch.Tensor, chunk: int = 512) -> torch.LongTensor:
    """`x.argmax(-1)` (the first maximum; NaN counts as the maximum), found as the first chunk of `chunk` columns
    holding the maximum (`amax` per chunk), then the argmax inside that chunk. On CPU `amax` is vectorized and
    `argmax`/`max` with indices are not, so over a vocabulary of logits this is several times faster."""
    V = x.shape[-1]
    if V <= chunk:
        return x.argmax(-1)
    n = V // chunk * chunk
    maxima = x[..., :n].unflatten(-1, (n // chunk, chunk)).amax(-1)
    if n < V:
        maxima = torch.cat([maxima, x[..., n:].amax(-1, keepdim=True)], -1)
    start = maxima.argmax(-1) * chunk
    # the last chunk may be short: its index repeats the last column, which cannot come before a first maximum
    columns = (start[..., None] + torch.arange(chunk, device=x.device)).clamp(max=V - 1)
    return start + x.gather(-1, columns).argmax(-1)


def _argmax(logits, mask_id) -> torch.LongTensor:
    """argmax over the vocabulary without the mask token (a model may rank [MASK] first)."""
    scanned = logits_scan.scan(logits, mask_id)
    return scanned[0] if scanned is not None else _torch_argmax(logits, mask_id)  # the scan: fp32 on CPU


def _torch_argmax(logits, mask_id) -> torch.LongTensor:
    """`_argmax` in torch ops."""
    argmax = first_argmax(logits)
    is_mask = argmax == mask_id
    if is_mask.any():
        argmax[is_mask] = first_argmax(logits[is_mask].index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf))
    return argmax


def _resolve_mask_id(model, mask_id):
    if mask_id is None:
        mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id is None and the model has no config.mask_token_id: "
                             "pass mask_id= (LLaDA: 126336, Dream: 151666)")
    mask_id = int(mask_id)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    _check_in_vocab(mask_id, vocab_size, "model.config.vocab_size")
    return mask_id


def _check_in_vocab(mask_id: int, vocab_size, source: str):
    if vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size}) ({source}): "
                         "pass the model's [MASK] token id")


def _confidence(block_logits, x0, candidates, mask_column, remasking) -> torch.Tensor:
    """[B, n] confidence in [0, 1] of each candidate's prediction (higher = more confident; 0 elsewhere: `_select`
    ignores other positions), over the vocabulary without the mask token. The softmax runs on the candidates' rows
    only: on CPU it is the loop's largest cost outside the model, and a block's masks thin out as it decodes."""
    if remasking == "random":
        return torch.rand(x0.shape, device=x0.device)
    b, i = candidates.nonzero(as_tuple=True)
    probs = torch.softmax(block_logits[b, i].float().index_fill_(-1, mask_column, -math.inf), dim=-1)  # [n, V]
    if remasking == "low_confidence":
        score = probs.gather(-1, x0[b, i][:, None]).squeeze(-1)
    elif remasking == "entropy":
        score = torch.exp(-torch.special.entr(probs).sum(-1))
    else:
        top2 = probs.topk(2, dim=-1).values
        score = top2[:, 0] - top2[:, 1]
    return torch.zeros(x0.shape, dtype=score.dtype, device=x0.device).index_put_((b, i), score)


def _select(confidence, candidates, num_tokens: int, threshold: Optional[float]) -> torch.BoolTensor:
    """Positions to commit per row: the num_tokens most confident candidates, or with a threshold
    every candidate at or above it and at least the most confident one."""
    confidence = torch.where(candidates, confidence.nan_to_num(0.0), -math.inf)  # scores lie in [0, 1]
    if threshold is None:
        order = confidence.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return (rank < num_tokens) & candidates
    select = candidates & (confidence >= threshold)
    best = confidence.argmax(dim=1, keepdim=True)
    return select.scatter(1, best, select.gather(1, best) | candidates.any(dim=1, keepdim=True))


def _finish_at_eos(generated, finished, eos_id: int, mask_id: int) -> torch.BoolTensor:
    """Fills with eos_id the masks of unfinished rows of `generated` [B, G] (in place) whose first EOS has
    no mask before it, marks them in `finished`; returns the filled positions."""
    is_eos, is_mask = generated == eos_id, generated == mask_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), generated.shape[1])
    before_eos = torch.arange(generated.shape[1], device=generated.device) < first_eos[:, None]
    done = ~finished & is_eos.any(1) & ~(is_mask & before_eos).any(1)
    fill = done[:, None] & is_mask
    generated.masked_fill_(fill, eos_id)
    finished |= done
    return fill


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """`logits` with -inf outside each row's nucleus: the most probable tokens under softmax(logits / temperature)
    whose mass before them is at most top_p (Dream's top-p rule: the most probable token always stays)."""
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    outside = (probs.cumsum(-1) - probs) > top_p
    return logits.masked_fill(outside.scatter(-1, order, outside), -math.inf)


class _GreedyScans:
    """The decoding loop's greedy reads of the logits (`logits_scan`), kept from step to step: where a dyllm model
    returns its logits cache and says which rows it wrote (`rows_written`), the next read covers those rows and the
    rows newly scored alone; the other rows' argmax and score are the previous step's, from the same bits."""

    def __init__(self):
        self.layout = None  # the generated logits' (address, shape, strides) at the last read
        self.argmax = self.score = None
        self.scored = None  # the rows scored at the last read: their score belongs to their logits, if unwritten since

    def read(self, generated, written, mask_id: int, scored):
        """(argmax, score) `[B, G]` of the generated logits, or None where the scan does not take them."""
        layout = (generated.data_ptr(), tuple(generated.shape), generated.stride())
        if written is not None and layout == self.layout:
            rows = written | (scored & ~self.scored)
            scanned = logits_scan.scan(generated, mask_id, scored, rows=rows, out=(self.argmax, self.score))
        else:
            scanned = logits_scan.scan(generated, mask_id, scored)
        self.scored = scored
        if scanned is None:  # `out` may hold a partial read
            self.layout = None
            return None
        self.layout, (self.argmax, self.score) = layout, scanned
        return self.argmax.clone(), self.score.clone()  # the records keep the argmax


def _predict(logits, P: int, start: int, end: int, candidates, mask_id: int, shift_logits: bool, temperature: float,
             top_p: Optional[float], remasking: str, scans: _GreedyScans):
    """(noise-free argmax of the generated part [B, G], the block's predictions x0 and their confidence [B, n]).
    `scans`: the loop's earlier reads, for reading only the rows a dyllm model wrote since (`_GreedyScans`)."""
    generated = _predicting(logits, P, logits.shape[1], shift_logits)
    if temperature == 0 and remasking == "low_confidence":
        # on CPU one C++ pass per row gives the argmax and the candidates' confidence (None: the torch ops below)
        scored = torch.zeros(generated.shape[:2], dtype=torch.bool, device=logits.device)
        scored[:, start - P:end - P] = candidates
        written = rows_written(logits)
        written = None if written is None else _predicting(written, P, logits.shape[1], shift_logits)
        scanned = scans.read(generated, written, mask_id, scored)
        if scanned is not None:
            argmax, scores = scanned
            return argmax, argmax[:, start - P:end - P], scores[:, start - P:end - P]
        argmax = _torch_argmax(generated, mask_id)  # the scan refused these logits: not again
    else:
        argmax = _argmax(generated, mask_id)
    block_logits = _predicting(logits, start, end, shift_logits)
    mask_column = torch.tensor([mask_id], device=logits.device)
    if temperature > 0:
        uniform = torch.rand(block_logits.shape, dtype=torch.float64, device=logits.device)
        noisy = block_logits.to(torch.float64, copy=True).index_fill_(-1, mask_column, -math.inf)
        if top_p is not None and top_p < 1:
            noisy = _nucleus(noisy, temperature, top_p)
        x0 = (noisy - temperature * torch.log(-torch.log(uniform))).argmax(-1)
    else:
        x0 = argmax[:, start - P:end - P]
    return argmax, x0, _confidence(block_logits, x0, candidates, mask_column, remasking)


def check_decoding_arguments(gen_length: int, steps: int, block_length: int, *, temperature: float = 0.0,
                             remasking: str = "low_confidence", confidence_threshold: Optional[float] = None,
                             top_p: Optional[float] = None) -> int:
    """Raises ValueError naming the fix for arguments `generate` cannot run; returns the number of blocks."""
    if gen_length < 1 or block_length < 1:
        raise ValueError(f"gen_length ({gen_length}) and block_length ({block_length}) must be >= 1")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}): "
                         "change one of them")
    num_blocks = gen_length // block_length
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks})")
    if steps > gen_length:
        raise ValueError(f"steps ({steps}) exceeds gen_length ({gen_length}): some steps would commit no "
                         "token; use steps <= gen_length")
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; valid: {', '.join(REMASKING)}")
    if confidence_threshold is not None and not 0 < confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold ({confidence_threshold}) must be in (0, 1] or None "
                         "(Fast-dLLM uses 0.9)")
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] or None (Dream uses 0.95)")
    return num_blocks


@torch.no_grad()
def generate(model, input_ids, *, gen_length: int, steps: int, block_length: int, mask_id: Optional[int] = None,
             temperature: float = 0.0, top_p: Optional[float] = None, remasking: str = "low_confidence",
             confidence_threshold: Optional[float] = None, shift_logits: bool = False,
             attention_mask: Optional[torch.Tensor] = None, eos_id: Optional[int] = None,
             progress: bool = False) -> GenerateOutput:
    """Decode gen_length tokens after the prompt by iterative unmasking.

    x = prompt + gen_length [MASK]s, decoded in gen_length / block_length blocks left to right, with
    steps / num_blocks steps per block. Each step runs the model once on the whole x, predicts x0 at
    every position (argmax; with temperature > 0 Gumbel-max sampling in float64 from the global torch
    RNG, from the nucleus of probability mass top_p when it is given, as in Dream's sampler; top_p has no
    effect on greedy decoding), scores the masked positions of the current block and commits the best ones per
    sequence:
    LLaDA's schedule (block_length / steps_per_block per step, remainder on the first steps).

    The mask token itself is never predicted: it is left out of the argmax and of the softmax.
    remasking (the confidence score, higher = more confident): "low_confidence" = probability of x0,
    "random" = uniform in [0, 1), "entropy" = exp(-entropy of the softmax) (ranks like negative entropy,
    lies in (0, 1]), "margin" = top-1 minus top-2 probability; all of the model's softmax, without temperature
    or nucleus (LLaDA's rule; Dream scores with its tempered, filtered probabilities).
    confidence_threshold (Fast-dLLM): each step commits every candidate whose score is >= the threshold
    and at least the best one; a block ends when it has no mask left, so a decode takes between
    num_blocks and gen_length forward calls and `steps` is not used beyond validation.
    shift_logits (Dream): position i is predicted by the logits at i - 1 (position 0 by its own).
    attention_mask [B, P] (1 = real token, left padding): the model is called as
    model(x, attention_mask=mask4d, position_ids=pos) with an additive [B, 1, L, L] mask in the model's
    dtype that hides padded keys from every query, and positions counting real tokens only; without it,
    model(x).
    eos_id: a sequence whose first EOS in the generated part has no mask before it is finished: its
    remaining masks are set to eos_id in the same step; decoding stops when every sequence is finished.
    Sequences in a batch do not influence each other: with greedy decoding each row equals the decode of
    its prompt alone. Runs under torch.no_grad() and leaves the model's train/eval mode alone.
    Every call is a new sequence: the cached state of a dyllm-compiled model is reset first (`dyllm_fx.reset`),
    so a decode starts with its dense warm-up steps and does not depend on what the model decoded before.
    A dyllm-compiled model gets static input sizes: a prompt of a new length compiles a graph of its own (what
    `dynamic=False` does), where Dynamo would otherwise pass a dynamic-shape graph that the backend cannot rewrite.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [B, P]")
    num_blocks = check_decoding_arguments(gen_length, steps, block_length, temperature=temperature,
                                          remasking=remasking, confidence_threshold=confidence_threshold, top_p=top_p)
    mask_id = _resolve_mask_id(model, mask_id)
    if eos_id is not None and eos_id == mask_id:
        raise ValueError(f"eos_id equals mask_id ({mask_id}): pass the model's end-of-sequence token id")
    steps_per_block = steps // num_blocks
    schedule = transfer_schedule(block_length, steps_per_block)
    device = input_ids.device
    B, P = input_ids.shape
    mask4d, position_ids = _attention_inputs(model, input_ids, attention_mask, gen_length)
    reset(model)
    static = bool(graphs_of(model))  # dyllm-compiled (after its first call): one static graph per length
    x = torch.cat([input_ids, torch.full((B, gen_length), mask_id, dtype=input_ids.dtype, device=device)], dim=1)
    L = x.shape[1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    records, forward_calls, scans = [], 0, _GreedyScans()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps if confidence_threshold is None else None, desc="generate", unit="step", leave=False)
    try:
        for block in range(num_blocks):
            start, end = P + block * block_length, P + (block + 1) * block_length
            step = 0
            while confidence_threshold is not None or step < steps_per_block:
                candidates = x[:, start:end] == mask_id
                if not candidates.any():
                    break
                logits = _forward(model, x, mask4d, position_ids, static)
                if forward_calls == 0:
                    _check_in_vocab(mask_id, logits.shape[-1], "the logits' last dimension")
                forward_calls += 1
                argmax, x0, confidence = _predict(logits, P, start, end, candidates, mask_id, shift_logits,
                                                  temperature, top_p, remasking, scans)
                num_tokens = schedule[step] if confidence_threshold is None else 1
                select = _select(confidence, candidates, num_tokens, confidence_threshold)
                committed = torch.zeros_like(x, dtype=torch.bool)
                committed[:, start:end] = select
                new_x = x.clone()
                new_x[:, start:end] = torch.where(select, x0, x[:, start:end])
                if eos_id is not None:
                    committed[:, P:] |= _finish_at_eos(new_x[:, P:], finished, eos_id, mask_id)
                records.append(StepRecord(block, step, x, argmax, committed, committed.sum(1).tolist()))
                x = new_x
                step += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return GenerateOutput(x, records, forward_calls, gen_length)


@torch.no_grad()
def teacher_forced_agreement(model, output: GenerateOutput, *, mask_id: int, shift_logits: bool = False,
                             attention_mask: Optional[torch.Tensor] = None) -> float:
    """Share of masked generated positions, over every step of `output` (another model's decode), where
    `model`'s argmax on the same input equals the recorded argmax. Steps are replayed in order with the
    same mask4d / position_ids handling as `generate`, as a new sequence (`generate` resets too); nan when the
    records hold no masked position."""
    if not output.records:
        return math.nan
    first = output.records[0].inputs
    P = first.shape[1] - output.gen_length
    mask4d, position_ids = _attention_inputs(model, first[:, :P], attention_mask, output.gen_length)
    reset(model)
    agree = total = 0
    for record in output.records:
        logits = _forward(model, record.inputs, mask4d, position_ids)
        argmax = _argmax(_predicting(logits, P, logits.shape[1], shift_logits), mask_id)
        masked = record.inputs[:, P:] == mask_id
        agree += int((masked & (argmax == record.argmax)).sum())
        total += int(masked.sum())
    return agree / total if total else math.nan
