"""Data parallelism on one machine: the same global batch on 1 rank × 2 threads vs 2 ranks × 1
thread (FSDP2 over gloo on CPU, NCCL on CUDA), and sharded (DCP) checkpoints vs one file.

Each timed step is `forward_backward` on the whole batch of RL datums (each rank its
`rank_share`) + `optim_step`, after `--warmup` untimed steps; the ratio printed is (1 rank's
seconds per step) / (2 ranks' seconds per step), above 1 when two ranks are faster. The
checkpoint lines time `save_sharded_engine_state` / `load_sharded_engine_state` under 2 ranks
against `save_engine_state` / `load_engine_state` (model + AdamW state + RNG in one directory,
`cispo.checkpoint`) in one process, on the trained state. Nothing else may run on the machine
for the numbers to mean anything.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                     # defaults
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --hidden 32 --layers 1 --datums 8 \\
        --steps 1 --warmup 0                                               # smallest: runs at all

The script launches itself under `python -m torch.distributed.run --nproc-per-node 2` for the
2-rank half (`--rank-worker`), and runs the 1-rank half in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import cispo.distributed as cd
from cispo.datums import rl_datum
from cispo.engine import Engine, EngineConfig
from cispo.engine.engine import load_engine_state, save_engine_state
from cispo.engine.sharded_state import load_sharded_engine_state, save_sharded_engine_state
from cispo.models import build_tiny_model, tiny_model_config
from cispo.types import AdamParams, Datum

VOCAB = 256


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--datums", type=int, default=64, help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per datum (prompt 16)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _datums(args: argparse.Namespace) -> list[Datum]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.datums):
        prompt = torch.randint(4, VOCAB, (16,), generator=g).tolist()
        completion = torch.randint(4, VOCAB, (max(1, args.seq_len - 16),), generator=g).tolist()
        sampler = (-torch.rand(len(completion), generator=g) * 3 - 0.5).tolist()
        advantage = float(torch.randn((), generator=g))
        out.append(rl_datum(prompt, completion, sampler, advantage, old_logprobs=sampler))
    return out


def _engine(args: argparse.Namespace) -> Engine:
    config = tiny_model_config(VOCAB, hidden=args.hidden, layers=args.layers, heads=args.heads)
    return Engine(
        build_tiny_model(config, 0),
        eos_token_id=None,
        pad_token_id=0,
        config=EngineConfig(micro_batch_size=args.micro_batch),
    )


def _train(engine: Engine, datums: list[Datum], args: argparse.Namespace) -> float:
    """Seconds per timed step (each rank its share of `datums`)."""
    mine = cd.rank_share(datums)
    adam = AdamParams(learning_rate=1e-4)
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        cd.barrier()
        t = time.perf_counter()
        engine.forward_backward(mine, "cispo")
        engine.optim_step(adam)
        cd.barrier()
        if step >= args.warmup:
            elapsed += time.perf_counter() - t
    return elapsed / max(1, args.steps)


def _timed(fn: Any) -> float:
    cd.barrier()
    t = time.perf_counter()
    fn()
    cd.barrier()
    return time.perf_counter() - t


def rank_worker(args: argparse.Namespace) -> None:
    """One rank of the 2-rank half: train, then DCP save + load; rank 0 writes the JSON."""
    torch.set_num_threads(1)
    cd.init_from_env()
    engine = _engine(args)
    step_s = _train(engine, _datums(args), args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(cd.broadcast_object(tmp))  # rank 0's directory (one machine)
        save_s = _timed(lambda: save_sharded_engine_state(engine, path / "ckpt", {"step": 1}))
        load_s = _timed(lambda: load_sharded_engine_state(engine, path / "ckpt"))
        cd.barrier()
    if cd.current_rank() == 0:
        result = {"step_s": step_s, "save_s": save_s, "load_s": load_s}
        assert args.rank_worker is not None
        args.rank_worker.write_text(json.dumps(result))


def one_rank(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(2)
    engine = _engine(args)
    step_s = _train(engine, _datums(args), args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_s = _timed(lambda: save_engine_state(root, "step_000001", engine.state(), {}))
        t = time.perf_counter()
        state, _ = load_engine_state(root / "step_000001")
        engine.load_state(state)
        load_s = time.perf_counter() - t
    return {"step_s": step_s, "save_s": save_s, "load_s": load_s}


def two_ranks(argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two_ranks.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", "2", __file__, *argv, "--rank-worker", str(out)]
        subprocess.run(command, check=True, env=env)
        result: dict[str, float] = json.loads(out.read_text())
        return result


def main() -> None:
    argv = sys.argv[1:]
    args = _args(argv)
    if args.rank_worker is not None:
        rank_worker(args)
        return
    print(
        f"model hidden {args.hidden} × {args.layers} layers, vocab {VOCAB}; global batch "
        f"{args.datums} datums × {args.seq_len} tokens, micro-batch {args.micro_batch}; "
        f"{args.steps} timed step(s) after {args.warmup} warm-up"
    )
    one = one_rank(args)
    two = two_ranks(argv)
    print(f"1 rank × 2 threads: {one['step_s'] * 1e3:9.1f} ms/step")
    print(f"2 ranks × 1 thread: {two['step_s'] * 1e3:9.1f} ms/step")
    print(f"ratio (1 rank / 2 ranks, > 1: two ranks faster): {one['step_s'] / two['step_s']:.2f}")
    print(
        f"checkpoint save: one file (1 rank) {one['save_s'] * 1e3:.1f} ms, DCP (2 ranks) "
        f"{two['save_s'] * 1e3:.1f} ms, ratio {two['save_s'] / one['save_s']:.2f}"
    )
    print(
        f"checkpoint load: one file (1 rank) {one['load_s'] * 1e3:.1f} ms, DCP (2 ranks) "
        f"{two['load_s'] * 1e3:.1f} ms, ratio {two['load_s'] / one['load_s']:.2f}"
    )


if __name__ == "__main__":
    main()
    if cd.active():
        import torch.distributed as dist

        dist.destroy_process_group()
