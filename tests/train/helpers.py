"""A tiny real transformer and a few datums, shared by the engine, client and loop tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cispo.cli import apply_overrides
from cispo.config import TrainConfig
from cispo.datums import rl_datum
from cispo.engine.engine import Engine, EngineConfig
from cispo.models import ModelBundle, load_bundle
from cispo.types import Datum

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}

# Overrides of a whole `cispo train` run small enough for a test (seconds on one core).
TINY_RUN = [
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--sft.batch_size=32",
    "--rl.prompts_per_step=16",
    "--rl.group_size=4",
    "--eval.num_problems=16",
    "--eval.every=2",
    "--run.tensorboard=false",
    "--sampling.max_tokens=5",
    "--optim.learning_rate=1e-2",
]


def run_config(
    run_dir: Path, overrides: list[str], recipe: TrainConfig | None = None
) -> TrainConfig:
    """`recipe` (default: `TrainConfig()`) with `overrides`, writing to `run_dir`."""
    base = apply_overrides(recipe or TrainConfig(), overrides)
    return dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(run_dir)))


def tiny_bundle(seed: int = 0) -> ModelBundle:
    return load_bundle("tiny", seed=seed, overrides=SMALL)


def tiny_engine(seed: int = 0, **config: object) -> Engine:
    bundle = tiny_bundle(seed)
    return Engine(
        bundle.model,
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=bundle.tokenizer.pad_token_id,
        tokenizer=bundle.tokenizer,
        config=EngineConfig(**config),  # type: ignore[arg-type]
    )


def random_datums(n: int, seed: int = 0, vocab: int = 40) -> list[Datum]:
    """RL datums with mixed prompt/completion lengths, random tokens, logprobs and advantages."""
    g = torch.Generator().manual_seed(seed)
    datums = []
    for i in range(n):
        prompt = torch.randint(4, vocab, (2 + i % 3,), generator=g).tolist()
        completion = torch.randint(4, vocab, (1 + (i * 5) % 4,), generator=g).tolist()
        sampler = (-torch.rand(len(completion), generator=g) * 3 - 0.5).tolist()
        advantage = float(torch.randn((), generator=g))
        datums.append(rl_datum(prompt, completion, sampler, advantage, old_logprobs=sampler))
    return datums


def grads(engine: Engine) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone() for name, p in engine.model.named_parameters() if p.grad is not None
    }
