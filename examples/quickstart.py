"""Quick start: compile a diffusion LM with the dyllm backend, decode, and look at what it did.

    python examples/quickstart.py                  # CPU, the tiny custom model of examples/tiny_dllm.py
    python examples/quickstart.py --device cuda    # the Triton kernels

Prints what the backend found (`dyllm_fx.explain`), checks that tau=1.0 decodes exactly like the eager model, then
decodes at tau=0.99 and prints the per-layer salient fractions (`dyllm_fx.stats`). Random weights: the point is the
workflow, not the text; `python -m dyllm_fx.bench` measures speed on a trained model.
"""
import argparse

import torch

import dyllm_fx
from dyllm_fx.models import tiny_dllm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--gen-length", type=int, default=32)
    args = p.parse_args()

    model = tiny_dllm(vocab_size=256, mask_token_id=255).to(args.device).eval()
    prompt = torch.randint(0, 255, (2, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
    decode = dict(gen_length=args.gen_length, steps=args.gen_length, block_length=16, mask_id=255)

    print(dyllm_fx.explain(model, torch.cat([prompt, torch.full((2, args.gen_length), 255, device=args.device)], 1)))
    reference = dyllm_fx.generate(model, prompt, **decode).generated

    exact = torch.compile(model, backend="dyllm", options={"tau": 1.0}, dynamic=False)
    same = torch.equal(dyllm_fx.generate(exact, prompt, **decode).generated, reference)
    print(f"\ntau=1.0 decodes exactly like eager: {same}")
    if not same:
        raise SystemExit("tau=1.0 must reproduce the eager decode")

    del exact
    torch._dynamo.reset()  # forget the tau=1.0 graph
    fast = torch.compile(model, backend="dyllm", options={"tau": 0.99}, dynamic=False)
    out = dyllm_fx.generate(fast, prompt, **decode)
    agree = (out.generated == reference).float().mean().item()
    print(f"tau=0.99: {100 * agree:.1f} % of generated tokens equal eager's\n")
    print(dyllm_fx.stats(fast))


if __name__ == "__main__":
    main()
