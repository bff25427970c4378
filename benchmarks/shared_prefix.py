"""Shared-prefix packed forward+backward vs the padded path, over prompt length and group size.

A random Llama-shaped model (--hidden, --layers, --heads, --vocab). For each prompt length P in
--prompt-lens and group size G in --group-sizes: --groups prompts of P random tokens, each with G
completions of uniform random length in [--completion-min, --completion-max]; the loss covers the
completion tokens (RL layout: from the last prompt position on). One timed step is forward +
backward of the sum of the loss-token logprobs over all groups in one call, through

    padded:  cispo.ops.model_token_logprobs   (one right-padded row per sequence)
    shared:  cispo.ops.packed_logprobs.packed_token_logprobs   (each group's prompt once)

Reports best-of --repeats milliseconds (the two paths alternate, so background load hits both),
tokens each path computes, the ratio padded / shared (> 1: shared is faster) and the largest
logprob difference between the two (a correctness check, not a timing). Timings on a shared CPU
are meaningless; run it alone, or on a GPU with --device cuda.

    OMP_NUM_THREADS=4 python benchmarks/shared_prefix.py --threads 4
    python benchmarks/shared_prefix.py --smoke        # smallest sizes, checks it runs
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cispo.models import build_tiny_model, tiny_model_config
from cispo.ops import model_token_logprobs
from cispo.ops.packed_logprobs import pack_rows, packed_token_logprobs


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _batch(
    prompt_len: int, group_size: int, args: argparse.Namespace, gen: torch.Generator
) -> tuple[Tensor, list[int], Tensor, Tensor, list[int]]:
    """Right-padded input_ids [B, T], lengths, targets [B, T], loss mask [B, T], group sizes."""
    seqs: list[list[int]] = []
    for _ in range(args.groups):
        prompt = torch.randint(0, args.vocab, (prompt_len,), generator=gen).tolist()
        for _ in range(group_size):
            n = int(torch.randint(args.completion_min, args.completion_max + 1, (), generator=gen))
            seqs.append(prompt + torch.randint(0, args.vocab, (n,), generator=gen).tolist())
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        loss_mask[b, prompt_len - 1 : len(s)] = True
    targets = torch.randint(0, args.vocab, (len(seqs), width), generator=gen)
    return input_ids, lengths, targets, loss_mask, [group_size] * args.groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(
    model: nn.Module,
    prompt_len: int,
    group_size: int,
    args: argparse.Namespace,
    gen: torch.Generator,
    device: torch.device,
) -> None:
    """Time both paths on one (P, G) batch and print one line."""
    input_ids, lengths, targets, loss_mask, sizes = _batch(prompt_len, group_size, args, gen)
    attention_mask = torch.arange(input_ids.shape[1])[None] < torch.tensor(lengths)[:, None]
    seqs = [row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)]
    shared_tokens = pack_rows(seqs, sizes, row_tokens=args.row_tokens).packed_tokens
    padded_tokens = input_ids.numel()
    input_ids, targets = input_ids.to(device), targets.to(device)
    loss_mask, attention_mask = loss_mask.to(device), attention_mask.to(device)

    def padded() -> Tensor:
        return model_token_logprobs(model, input_ids, attention_mask, targets, loss_mask).logprobs

    def shared() -> Tensor:
        return packed_token_logprobs(
            model,
            input_ids,
            lengths,
            targets,
            loss_mask,
            group_sizes=sizes,
            row_tokens=args.row_tokens,
        ).logprobs

    paths: dict[str, Callable[[], Tensor]] = {"padded": padded, "shared": shared}
    best = {name: float("inf") for name in paths}
    logprobs: dict[str, Tensor] = {}
    for _ in range(args.repeats):
        for name, run in paths.items():
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            out = run()
            out.sum().backward()  # type: ignore[no-untyped-call]
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
            logprobs[name] = out.detach().float()
    diff = float((logprobs["padded"] - logprobs["shared"]).abs().max())
    print(
        f"{prompt_len:>5} {group_size:>3} {padded_tokens:>10} {shared_tokens:>10} "
        f"{best['padded'] * 1e3:>10.1f} {best['shared'] * 1e3:>10.1f} "
        f"{best['padded'] / best['shared']:>6.2f} {diff:>9.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--prompt-lens", type=_ints, default=_ints("32,256,1024"))
    parser.add_argument("--group-sizes", type=_ints, default=_ints("4,8,16"))
    parser.add_argument("--completion-min", type=int, default=16)
    parser.add_argument("--completion-max", type=int, default=64)
    parser.add_argument("--groups", type=int, default=2, help="prompts per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--row-tokens", type=int, default=None, help="groups per packed row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, one repeat")
    args = parser.parse_args()
    if args.smoke:
        args.prompt_lens, args.group_sizes, args.groups, args.repeats = [8], [2], 1, 1
        args.completion_min, args.completion_max = 2, 4
        args.hidden, args.layers, args.heads, args.kv_heads, args.vocab = 32, 1, 2, 1, 64

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = tiny_model_config(
        args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        max_position=max(args.prompt_lens) + args.completion_max + 1,
        tie_word_embeddings=False,
    )
    model: nn.Module = build_tiny_model(config, seed=0).to(device=device, dtype=dtype).train()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"threads={torch.get_num_threads()} device={device} dtype={args.dtype} params={params} "
        f"hidden={args.hidden} layers={args.layers} vocab={args.vocab} groups={args.groups} "
        f"completions={args.completion_min}-{args.completion_max} row_tokens={args.row_tokens} "
        f"attn={model.config._attn_implementation}"
    )
    header = f"{'P':>5} {'G':>3} {'padded tok':>10} {'shared tok':>10} {'padded ms':>10} "
    print(header + f"{'shared ms':>10} {'ratio':>6} {'max|dlp|':>9}")
    gen = torch.Generator().manual_seed(0)
    for prompt_len in args.prompt_lens:
        for group_size in args.group_sizes:
            _case(model, prompt_len, group_size, args, gen, device)


if __name__ == "__main__":
    main()
