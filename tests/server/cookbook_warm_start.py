"""A tiny model warm-started on tinker-cookbook's arithmetic environment, saved as a local HF dir.

The prompts are rendered exactly as the cookbook renders them (`role_colon` renderer over the
project's character tokenizer, `ArithmeticEnv` questions, no few-shot prefix) and the target is
what a correct, well-formed answer looks like to `ArithmeticEnv.step`: " <x+y>" followed by the
renderer's stop sequence "\\n\\nUser:". Supervised cross_entropy runs through the in-process
client (`cispo.client`) until greedy accuracy on held-out problems reaches `target_accuracy`, so
the model knows the task only partly and sampling at temperature 1 is noisier than greedy: the
room RL has to improve the reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cispo.client import ServiceClient
from cispo.engine.sampler import sample
from cispo.models import ModelBundle, build_tiny_model, tiny_model_config
from cispo.tokenizer import build_char_tokenizer
from cispo.types import AdamParams, Datum, ModelInput, SamplingParams, TensorData

RENDERER = "role_colon"
MAX_TOKENS = 16
"""Completion budget: " 200" + "\\n\\nUser:" is 11 characters."""


@dataclass(frozen=True)
class WarmStart:
    directory: Path
    steps: int
    greedy_accuracy: float
    sampled_accuracy: float
    """Accuracy of one temperature-1 sample per held-out problem."""


def _renderer(tokenizer: Any) -> Any:
    from tinker_cookbook import renderers

    return renderers.get_renderer(RENDERER, tokenizer=tokenizer)


def render_prompt(renderer: Any, x: int, y: int) -> list[int]:
    """The cookbook's generation prompt for "What is x + y?" (ArithmeticEnv.initial_observation)."""
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticEnv

    env = ArithmeticEnv(x, y, renderer=renderer, convo_prefix=None)
    convo = [{"role": "user", "content": env.get_question()}]
    return [int(t) for t in renderer.build_generation_prompt(convo).to_ints()]


def _datum(renderer: Any, tokenizer: Any, x: int, y: int) -> Datum:
    prompt = render_prompt(renderer, x, y)
    answer = f" {x + y}{renderer.get_stop_sequences()[0]}"
    completion = tokenizer.encode(answer, add_special_tokens=False)
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(tokens[1:])),
            "weights": TensorData.from_torch(torch.tensor(weights)),
        },
    )


def accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    renderer: Any,
    problems: np.ndarray,
    *,
    temperature: float,
    seed: int = 0,
) -> float:
    """Share of `problems` ([n, 2]) that ArithmeticEnv would score as correct."""
    prompts = [render_prompt(renderer, int(x), int(y)) for x, y in problems]
    params = SamplingParams(
        max_tokens=MAX_TOKENS,
        stop=renderer.get_stop_sequences(),
        temperature=temperature,
        seed=seed,
    )
    was_training = model.training
    model.eval()
    out = sample(
        model,
        prompts,
        1,
        params,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
    model.train(was_training)
    correct = 0
    for (x, y), (seq,) in zip(problems, out, strict=True):
        message, _ = renderer.parse_response(seq.tokens)
        correct += message["content"].strip() == str(int(x) + int(y))
    return correct / len(problems)


def build_warm_model(
    directory: Path,
    *,
    target_accuracy: float = 0.3,
    max_steps: int = 1200,
    check_from: int = 300,
    check_every: int = 25,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> WarmStart:
    """Build, warm-start and save (model + tokenizer) a ~0.5M-parameter Llama into `directory`.

    Training stops at the first check (every `check_every` steps from `check_from`) where greedy
    accuracy on 128 held-out problems reaches `target_accuracy`, or after `max_steps`.
    """
    tokenizer = build_char_tokenizer()
    renderer = _renderer(tokenizer)
    config = tiny_model_config(
        len(tokenizer),
        hidden=128,
        layers=2,
        heads=4,
        max_position=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_tiny_model(config, seed=seed)
    bundle = ModelBundle(model=model, tokenizer=tokenizer, spec=str(directory))
    service = ServiceClient(checkpoint_root=directory.parent / "warm-start-ckpt", seed=seed)
    training = service.create_training_client(bundle)
    rng = np.random.RandomState(seed + 1)
    held_out = np.random.RandomState(seed + 2).randint(0, 101, size=(128, 2))
    warmup = 50
    greedy, step = 0.0, 0
    try:
        while step < max_steps:
            problems = rng.randint(0, 101, size=(batch_size, 2))
            data = [_datum(renderer, tokenizer, int(x), int(y)) for x, y in problems]
            # Linear warm-up, then constant: an annealed warm start sits in a sharp minimum
            # that RL updates knock it out of (docs/LOG.md, 2026-11-22 calibration).
            scale = min(1.0, (step + 1) / warmup)
            fwd = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(
                AdamParams(learning_rate=learning_rate * scale, grad_clip_norm=1.0)
            )
            fwd.result()
            opt.result()
            step += 1
            if step >= check_from and (step - check_from) % check_every == 0:
                greedy = accuracy(model, tokenizer, renderer, held_out, temperature=0.0)
                if greedy >= target_accuracy:
                    break
    finally:
        training.close()
    sampled = accuracy(model, tokenizer, renderer, held_out, temperature=1.0, seed=seed)
    model.train(False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return WarmStart(directory, step, greedy, sampled)
