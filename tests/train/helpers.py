"""A tiny real transformer and a few datums, shared by the engine, client and loop tests."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cispo.cli import apply_overrides
from cispo.config import TrainConfig
from cispo.datums import rl_datum
from cispo.engine.engine import Engine, EngineConfig
from cispo.models import ModelBundle, load_bundle
from cispo.train import loop
from cispo.types import Datum

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}

# Overrides of a whole `cispo train` run small enough for a test (seconds on one core) in which
# every RL step trains: 150 supervised steps on one-digit additions take the model to 10-75%
# held-out accuracy, so most groups have reward spread and every step has RL datums (24 to 48 of
# 64 samples at every step of 10-step runs with seeds 0, 1 and 2). One torch thread: the same
# numbers on any machine with this torch build. Every checkpoint is kept, so a test can check
# that each step moved the weights.
TINY_RUN = [
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--task.digits=1",
    "--task.ops=+",
    "--sft.steps=150",
    "--sft.batch_size=32",
    "--sft.learning_rate=1e-2",
    "--rl.prompts_per_step=16",
    "--rl.group_size=4",
    "--eval.num_problems=16",
    "--eval.every=2",
    "--run.tensorboard=false",
    "--run.threads=1",
    "--run.keep_last=0",
    "--sampling.max_tokens=5",
    "--optim.learning_rate=1e-2",
]


def run_config(
    run_dir: Path, overrides: list[str], recipe: TrainConfig | None = None
) -> TrainConfig:
    """`recipe` (default: `TrainConfig()`) with `overrides`, writing to `run_dir`."""
    base = apply_overrides(recipe or TrainConfig(), overrides)
    return dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(run_dir)))


def metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's `metrics.jsonl`, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A run's `step_N` checkpoint directories, oldest first."""
    return sorted(p.parent for p in (run_dir / "checkpoints").rglob("step_*/model.safetensors"))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_every_rl_step_trained(run_dir: Path) -> None:
    """Training happened: every RL step of the run had datums and a finite loss, and the weights
    of each checkpoint differ from those of the one before (the first is the warm start's)."""
    rows = [r for r in metrics(run_dir) if r["step"] > 0]
    assert rows, "vacuous: no RL step was logged"
    for row in rows:
        assert row["rl/datums"] > 0, f"vacuous: RL step {row['step']} had no datum"
        assert math.isfinite(row["loss"]), row
    dirs = checkpoint_dirs(run_dir)
    assert len(dirs) >= 2, f"need the warm start's and a later checkpoint, found {dirs}"
    for before, after in itertools.pairwise(dirs):
        a, b = weights(before), weights(after)
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{after.name} = {before.name}"


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


class Interrupted(Exception):
    """Raised by `interrupt_after` in place of an RL step: the run stops as a killed one would."""


def interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """The loop's update raises on RL step `steps` (0-based): the run stops after `steps` steps,
    as a killed process would, its checkpoints written."""
    real, calls = loop.train_on_rollout, [0]

    def update(*args: object, **kwargs: object) -> dict[str, float]:
        calls[0] += 1
        if calls[0] > steps:
            raise Interrupted
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "train_on_rollout", update)
