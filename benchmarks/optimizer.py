"""AdamW step time: torch's for-loop vs foreach vs fused implementation (`EngineConfig.adamw_impl`).

The parameters of a real model shape (default: SmolLM2-135M's, a Llama of hidden 576, 30 layers,
9 heads / 3 KV heads, MLP 1536, vocabulary 49,152 with tied embeddings: 134.5M parameters,
random weights, nothing downloaded; `--model DIR` takes any local HF directory's), one AdamW per
implementation over its own copy of the same weights, the same random gradients every step, the
engine's settings (betas 0.9/0.95, eps 1e-12, weight decay 0.01, lr 1e-5). The implementations
take turns step by step so that background load hits all of them; it prints the median
milliseconds per `optimizer.step()` of each (after --warmup steps), the ratio to the for-loop
(< 1: faster), and the largest weight difference from the for-loop after all steps (a
correctness check, not a timing).

    OMP_NUM_THREADS=4 python benchmarks/optimizer.py --threads 4     # ~1 min on 4 idle cores
    python benchmarks/optimizer.py --smoke                           # a tiny model: checks it runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from cispo.engine.engine import ADAMW_IMPLS, adamw_flags
from cispo.models import build_tiny_model, tiny_model_config


def _model(args: argparse.Namespace) -> nn.Module:
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.smoke:
        config = tiny_model_config(512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    else:  # SmolLM2-135M's config.json
        config = tiny_model_config(
            49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, max_position=8192
        )
    return build_tiny_model(config, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a local HF directory (default: shapes)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 3 steps")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    model = _model(args)
    base = [p.detach().clone() for p in model.parameters()]
    del model
    count = sum(p.numel() for p in base)
    params: dict[str, list[nn.Parameter]] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for impl in ADAMW_IMPLS:
        params[impl] = [nn.Parameter(p.clone()) for p in base]
        foreach, fused = adamw_flags(impl)
        optimizers[impl] = torch.optim.AdamW(
            params[impl],
            lr=1e-5,
            betas=(0.9, 0.95),
            eps=1e-12,
            weight_decay=0.01,
            foreach=foreach,
            fused=fused,
        )
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {impl: [] for impl in ADAMW_IMPLS}
    for step in range(args.warmup + args.steps):
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in base]
        for impl in ADAMW_IMPLS:
            for p, g in zip(params[impl], grads, strict=True):
                p.grad = g.clone()
            start = time.perf_counter()
            optimizers[impl].step()
            seconds = time.perf_counter() - start
            if step >= args.warmup:
                times[impl].append(seconds)
            optimizers[impl].zero_grad(set_to_none=True)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{count / 1e6:.1f}M parameters in {len(base)} tensors, "
        f"{args.steps} timed steps (+{args.warmup} warm-up)"
    )
    reference = statistics.median(times["for-loop"])
    for impl in ADAMW_IMPLS:
        median = statistics.median(times[impl])
        diff = max(
            float((a.detach() - b.detach()).abs().max())
            for a, b in zip(params[impl], params["for-loop"], strict=True)
        )
        print(
            f"{impl:>9}: {median * 1e3:8.1f} ms/step (median), "
            f"{median / reference:.2f}× for-loop; max |weight − for-loop's| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
