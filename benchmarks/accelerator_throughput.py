"""Tokens per second of the update and of HF-sampler generation on a real architecture's shapes,
randomly initialised (nothing can be downloaded on the accelerator machine), against the
device's own measured matmul peak.

The issue-11 device check, prepared to run in one go (≤ 10 minutes on one GPU):

    python benchmarks/accelerator_throughput.py --out $OUT/throughput.json     # CUDA if present
    python benchmarks/accelerator_throughput.py --smoke                        # CPU: runs at all

Shape "qwen2.5-0.5b" is Qwen2.5-0.5B's config (hidden 896, 24 layers, 14 heads, 2 KV heads,
MLP 4864, vocab 151,936, tied head; 494M parameters) built locally with `cispo.models`; "tiny"
(`--smoke`) is a 2-layer model for a CPU check of the script itself.

- Update: `Engine.forward_backward` (CISPO, token_mean, the engine's defaults: shared-prefix
  packing, fused logprobs) + `optim_step` (fused AdamW) on `--prompts` groups of `--group` RL
  datums, each a `--prompt-len`-token prompt and a `--completion-len`-token completion, fp32
  weights (the engine's single-process dtype; bf16 mixed precision is the FSDP path's). Reported:
  trained tokens/s (every datum's tokens), computed tokens/s (each group's prompt once) and the
  MFU 6·N·computed / (seconds · fp32 matmul peak).
- Generation: `HFSampler.sample` (KV cache, one prefill per prompt, G rows each) on a bf16 copy
  of the model (`--sample-dtype`), `--completion-len` new tokens with no stop token. Reported:
  generated tokens/s and 2·N·(prompt + generated tokens) / (seconds · that dtype's peak).
- Peaks: the best of a few square matmuls (`--peak-size`) in fp32 and bf16, with TF32 off (the
  engine does not turn it on).

Each measurement is the median of `--repeats` timed repetitions after one untimed warm-up, with
`torch.cuda.synchronize()` around each on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cispo.datums import rl_datum
from cispo.engine import Engine, EngineConfig
from cispo.engine.sampler import HFSampler
from cispo.models import build_tiny_model, tiny_model_config
from cispo.types import AdamParams, Datum, SamplingParams

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "vocab_size": 151936,
        "hidden": 896,
        "layers": 24,
        "heads": 14,
        "kv_heads": 2,
        "intermediate": 4864,
        "max_position": 32768,
        "family": "qwen2",
    },
    "tiny": {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 4, "family": "qwen2"},
}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=16, help="groups per update / prompts sampled")
    p.add_argument("--group", type=int, default=8, help="samples (datums) per prompt")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=32, help="datums per micro-batch")
    p.add_argument("--sample-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, small sizes, CPU")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device = "tiny", "cpu"
        args.prompts, args.group, args.prompt_len, args.completion_len = 2, 2, 8, 4
        args.micro_batch, args.repeats, args.peak_size = 4, 1, 256
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of the best of 5 [size, size] @ [size, size] products in `dtype` (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = min(_median_seconds(lambda: a @ b, device, 1) for _ in range(5))
    return 2 * size**3 / best


def _datums(args: argparse.Namespace, vocab: int) -> tuple[list[Datum], list[list[int]]]:
    """`prompts` groups of `group` RL datums (a shared prompt, random completions) and the
    prompts; tokens avoid ids 0-3 (pad/special)."""
    g = torch.Generator().manual_seed(0)
    datums, prompts = [], []
    for _ in range(args.prompts):
        prompt = torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist()
        prompts.append(prompt)
        for _ in range(args.group):
            completion = torch.randint(4, vocab, (args.completion_len,), generator=g).tolist()
            sampler = (-torch.rand(args.completion_len, generator=g) * 3 - 0.5).tolist()
            advantage = float(torch.randn((), generator=g))
            datums.append(rl_datum(prompt, completion, sampler, advantage, old_logprobs=sampler))
    return datums, prompts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = dict(SHAPES[args.shape])
    vocab = shape.pop("vocab_size")
    model = build_tiny_model(tiny_model_config(vocab, **shape), seed=0).to(device)
    params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    sample_dtype = getattr(torch, args.sample_dtype)
    peaks = {
        "float32": matmul_peak(device, torch.float32, args.peak_size),
        "bfloat16": matmul_peak(device, torch.bfloat16, args.peak_size),
    }
    datums, prompts = _datums(args, vocab)
    trained = args.prompts * args.group * (args.prompt_len + args.completion_len)
    computed = args.prompts * (args.prompt_len + args.group * args.completion_len)

    sampler_model = copy.deepcopy(model).to(sample_dtype)
    sampler = HFSampler(sampler_model, eos_token_id=None, pad_token_id=0)
    params_sampling = SamplingParams(
        max_tokens=args.completion_len, temperature=1.0, seed=0, stop=[]
    )
    sample_s = _median_seconds(
        lambda: sampler.sample(prompts, args.group, params_sampling), device, args.repeats
    )
    sampler.close()
    del sampler_model
    generated = args.prompts * args.group * args.completion_len
    sample_flops = 2 * params * (args.prompts * args.prompt_len + generated)

    engine = Engine(
        model,
        eos_token_id=None,
        pad_token_id=0,
        config=EngineConfig(micro_batch_size=args.micro_batch),
    )
    adam = AdamParams(learning_rate=1e-6)

    def update() -> None:
        out = engine.forward_backward(datums, "cispo", {"reduction": "token_mean"})
        assert out.metrics["train/num_tokens"] > 0  # something was trained
        engine.optim_step(adam)

    update_s = _median_seconds(update, device, args.repeats)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": args.shape,
        "parameters": params,
        "sizes": {
            "prompts": args.prompts,
            "group": args.group,
            "prompt_len": args.prompt_len,
            "completion_len": args.completion_len,
            "micro_batch": args.micro_batch,
        },
        "peak_flops": peaks,
        "update": {
            "seconds": update_s,
            "trained_tokens_per_s": trained / update_s,
            "computed_tokens_per_s": computed / update_s,
            "mfu_fp32": 6 * params * computed / update_s / peaks["float32"],
            "engine": "shared_prefix" if engine.shared_prefix else "padded rows",
        },
        "sampling": {
            "dtype": args.sample_dtype,
            "seconds": sample_s,
            "generated_tokens_per_s": generated / sample_s,
            "mfu": sample_flops / sample_s / peaks[args.sample_dtype],
        },
        "max_memory_allocated_bytes": memory,
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
