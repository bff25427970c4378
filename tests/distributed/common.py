"""Shared by the scripts that tests/distributed launch under torchrun, and by those tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from cispo.datums import rl_datum
from cispo.engine import Engine, EngineConfig
from cispo.models import build_tiny_model, tiny_model_config
from cispo.types import Datum

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40


def tiny_engine(family: str, *, seed: int = 0, tied: bool = True, **config: Any) -> Engine:
    """A 2-layer Llama- or Qwen2-style model (hidden 32) in an engine."""
    model_config = tiny_model_config(
        VOCAB, hidden=32, layers=2, heads=2, family=family, tie_word_embeddings=tied
    )
    return Engine(
        build_tiny_model(model_config, seed),
        eos_token_id=None,
        pad_token_id=0,
        config=EngineConfig(**config),
    )


def random_datums(n: int, seed: int) -> list[Datum]:
    """RL datums with mixed prompt/completion lengths, so that shares differ in token counts."""
    g = torch.Generator().manual_seed(seed)
    datums = []
    for i in range(n):
        prompt = torch.randint(4, VOCAB, (2 + i % 3,), generator=g).tolist()
        completion = torch.randint(4, VOCAB, (1 + (i * 5 + seed) % 6,), generator=g).tolist()
        sampler = (-torch.rand(len(completion), generator=g) * 3 - 0.5).tolist()
        advantage = float(torch.randn((), generator=g))
        datums.append(rl_datum(prompt, completion, sampler, advantage, old_logprobs=sampler))
    return datums


def full_weights(engine: Engine) -> dict[str, torch.Tensor]:
    """Every rank: the unsharded weights (on every rank), a plain state dict without a group."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {
        k: v.detach().clone()
        for k, v in get_model_state_dict(engine.model, options=options).items()
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m torch.distributed.run ARGS` from the repository root, sources first."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # On a hang (the timeout), SIGTERM first: torchrun's agent then stops the ranks (each in a
    # session of its own, out of reach of a kill of the agent alone; they would live on, waiting
    # in a collective).
    with subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
