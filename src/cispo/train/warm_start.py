"""The supervised warm start: cross_entropy on the task's answers, so that a random model
earns some reward before RL."""

from __future__ import annotations

import math

from cispo import distributed
from cispo.client import AdamParams
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.datums import sft_datum
from cispo.logging import Progress
from cispo.prompts import encode_answer, encode_prompt
from cispo.rollout.rollouts import step_seed
from cispo.tasks import Task


def supervised_warm_start(training: TrainingClient, task: Task, config: TrainConfig) -> None:
    """`sft.steps` cross_entropy steps on the task's training answers."""
    tok = training.get_tokenizer()
    sft = config.sft
    progress = Progress(sft.steps, desc="warm start (SFT)", disable=distributed.current_rank() != 0)
    for step in range(sft.steps):
        warm = min(1.0, (step + 1) / max(1, sft.warmup_steps))
        floor = sft.final_lr_ratio
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, sft.steps)))
        adam = AdamParams(
            learning_rate=sft.learning_rate * warm * decay,
            beta1=config.optim.beta1,
            beta2=config.optim.beta2,
            eps=config.optim.eps,
            grad_clip_norm=config.optim.grad_clip_norm,
        )
        problems = task.problems(
            "train", seed=step_seed(config.run.seed, step, 1), n=config.sft.batch_size
        )
        datums = [
            sft_datum(encode_prompt(tok, p.prompt), encode_answer(tok, p.answer)) for p in problems
        ]
        fwd = training.forward_backward(  # under torchrun: this rank's share of the problems
            distributed.rank_share(datums), "cross_entropy", {"reduction": "token_mean"}
        )
        training.optim_step(adam).result()
        progress.update({"nll": fwd.result().metrics["loss:sum"]})
    progress.close()
