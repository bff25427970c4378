"""The RL loop: sample → reward → advantages → datums → CISPO updates → metrics → checkpoint.

Written only against the Tinker-style client API (`cispo.client`), like tinker-cookbook's
`recipes/rl_loop.py`, so the same loop can drive a remote server. One run = an optional supervised
warm start (cross_entropy on the task's answers, so that a random model gets some reward), then
`rl.steps` rollout batches. Each batch is sampled from the current weights; `rl.epochs ×
rl.minibatches` optimizer steps follow, and every step after the first of a batch is off-policy: the
ratio is anchored on `old_logprobs`, which equal the sampler's logprobs (the sampler is numerically
the trainer here; set `rl.recompute_old_logprobs` when it is not).

Deliberately left out: multi-turn environments, a value function (GAE), async generation (see
`cispo.train.async_loop` when present).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cispo.advantages import compute_advantages
from cispo.checkpoint import latest_named_state
from cispo.client import AdamParams, ModelInput, SamplingClient, SamplingParams, ServiceClient
from cispo.client.service import TrainingClient
from cispo.configs import config_to_dict
from cispo.datums import rl_datum, sft_datum
from cispo.logging import Progress, RunLogger
from cispo.prompts import decode_completion, encode_answer, encode_prompt
from cispo.rewards import score_all
from cispo.tasks import Problem, Task, make_task
from cispo.train.config import TrainConfig
from cispo.train.engine import EngineConfig


@dataclass(frozen=True)
class RunSummary:
    steps: int
    accuracy_start: float
    accuracy_end: float
    seconds: float


def _seed(base: int, step: int, salt: int) -> int:
    return (base * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


def evaluate(
    sampler: SamplingClient, task: Task, problems: Sequence[Problem], config: TrainConfig
) -> dict[str, float]:
    """Greedy accuracy on held-out problems (+ pass@k at the sampling temperature if asked)."""
    tok = sampler.get_tokenizer()
    greedy = SamplingParams(max_tokens=config.sampling.max_tokens, temperature=0.0, seed=0)
    futures = [
        sampler.sample(ModelInput.from_ints(encode_prompt(tok, p.prompt)), 1, greedy)
        for p in problems
    ]
    texts = [decode_completion(tok, f.result().sequences[0].tokens) for f in futures]
    scores = score_all(task, list(problems), texts, timeout_s=config.task.reward_timeout_s)
    metrics = {"eval/accuracy": sum(r == 1.0 for r in scores.rewards) / len(problems)}
    k = config.eval.pass_k
    if k > 0:
        params = SamplingParams(
            max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, seed=1
        )
        futures = [
            sampler.sample(ModelInput.from_ints(encode_prompt(tok, p.prompt)), k, params)
            for p in problems
        ]
        hits = 0
        for problem, future in zip(problems, futures, strict=True):
            texts = [decode_completion(tok, s.tokens) for s in future.result().sequences]
            rewards = score_all(task, [problem] * k, texts, timeout_s=config.task.reward_timeout_s)
            hits += any(r == 1.0 for r in rewards.rewards)
        metrics[f"eval/pass@{k}"] = hits / len(problems)
    return metrics


def supervised_warm_start(training: TrainingClient, task: Task, config: TrainConfig) -> None:
    """`sft.steps` cross_entropy steps on the task's training answers."""
    tok = training.get_tokenizer()
    sft = config.sft
    progress = Progress(sft.steps, desc="warm start (SFT)")
    for step in range(sft.steps):
        warm = min(1.0, (step + 1) / max(1, sft.warmup_steps))
        decay = 0.55 + 0.45 * math.cos(math.pi * step / max(1, sft.steps))  # 1 → 0.1
        adam = AdamParams(
            learning_rate=sft.learning_rate * warm * decay,
            beta1=config.optim.beta1,
            beta2=config.optim.beta2,
            eps=config.optim.eps,
            grad_clip_norm=config.optim.grad_clip_norm,
        )
        problems = task.problems(
            "train", seed=_seed(config.run.seed, step, 1), n=config.sft.batch_size
        )
        datums = [
            sft_datum(encode_prompt(tok, p.prompt), encode_answer(tok, p.answer)) for p in problems
        ]
        fwd = training.forward_backward(datums, "cross_entropy", {"reduction": "token_mean"})
        training.optim_step(adam).result()
        progress.update({"nll": fwd.result().metrics["loss:sum"]})
    progress.close()


@dataclass
class Rollout:
    """One rollout batch: sampled groups, rewards, advantages and the datums built from them."""

    step: int
    problems: list[Problem]
    texts: list[str]  # [P * G] decoded completions
    rewards: torch.Tensor  # [P, G]
    advantages: torch.Tensor  # [P, G]
    datums: list[Any]
    metrics: dict[str, float]
    version: int = 0  # policy version (optimizer steps) of the weights that sampled it


def collect_rollout(sampler: SamplingClient, task: Task, step: int, config: TrainConfig) -> Rollout:
    """Sample `rl.group_size` completions for `rl.prompts_per_step` prompts, score, build datums."""
    rl, tok = config.rl, sampler.get_tokenizer()
    t0 = time.perf_counter()
    problems = task.problems("train", seed=_seed(config.run.seed, step, 2), n=rl.prompts_per_step)
    params = SamplingParams(
        max_tokens=config.sampling.max_tokens,
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        seed=_seed(config.run.seed, step, 3),
    )
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    futures = [sampler.sample(ModelInput.from_ints(p), rl.group_size, params) for p in prompts]
    groups = [f.result().sequences for f in futures]
    t1 = time.perf_counter()
    texts = [decode_completion(tok, s.tokens) for g in groups for s in g]
    flat_problems = [p for p in problems for _ in range(rl.group_size)]
    scored = score_all(task, flat_problems, texts, timeout_s=config.task.reward_timeout_s)
    rewards = torch.tensor(scored.rewards, dtype=torch.float32).reshape(len(problems), -1)
    adv = compute_advantages(rewards, rl.advantage)
    datums = []
    for i, group in enumerate(groups):
        if bool((adv.advantages[i] == 0).all()):
            continue  # a group with no signal adds no gradient, only normaliser mass
        for j, seq in enumerate(group):
            if seq.tokens:
                datums.append(
                    rl_datum(
                        prompts[i],
                        seq.tokens,
                        seq.logprobs,
                        float(adv.advantages[i, j]),
                        old_logprobs=seq.logprobs,
                    )
                )
    correct = [r == 1.0 for r in scored.rewards]
    metrics = adv.metrics | {
        "time/sample": t1 - t0,
        "time/reward": time.perf_counter() - t1,
        "reward/mean": float(torch.nanmean(rewards)),
        "reward/accuracy": sum(correct) / len(correct),
        "reward/errors": float(scored.num_errors + scored.num_timeouts),
        "rl/datums": float(len(datums)),
        "rl/tokens": float(sum(len(s.tokens) for g in groups for s in g)),
    }
    return Rollout(
        step,
        problems,
        texts,
        rewards,
        adv.advantages,
        datums,
        metrics,
        version=getattr(sampler, "version", 0),
    )


def train_on_rollout(
    training: TrainingClient,
    rollout: Rollout,
    config: TrainConfig,
    *,
    loss_fn_config: dict[str, Any] | None = None,
) -> dict[str, float]:
    """`rl.epochs × rl.minibatches` optimizer steps on one rollout batch; returns metrics.

    `loss_fn_config` replaces `config.loss.loss_fn_config()` (the async loop adds corrections).
    """
    rl, datums = config.rl, rollout.datums
    if loss_fn_config is None:
        loss_fn_config = config.loss.loss_fn_config()
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    if datums and rl.recompute_old_logprobs:
        old = training.forward(datums, "cross_entropy", temperature=config.sampling.temperature)
        datums = [
            _with_old_logprobs(d, out["logprobs"].tolist())
            for d, out in zip(datums, old.result().loss_fn_outputs, strict=True)
        ]
    if datums:
        adam = AdamParams(
            learning_rate=config.optim.lr_at(rollout.step, rl.steps),
            beta1=config.optim.beta1,
            beta2=config.optim.beta2,
            eps=config.optim.eps,
            weight_decay=config.optim.weight_decay,
            grad_clip_norm=config.optim.grad_clip_norm,
        )
        per = math.ceil(len(datums) / rl.minibatches)
        for epoch in range(rl.epochs):
            for start in range(0, len(datums), per):
                fwd = training.forward_backward(
                    datums[start : start + per],
                    config.loss.name,
                    loss_fn_config,
                    temperature=config.sampling.temperature,
                )
                opt = training.optim_step(adam)
                out = fwd.result()
                if epoch == 0 and start == 0:
                    metrics |= {k.replace(":sum", ""): v for k, v in out.metrics.items()}
                    metrics |= _sample_train_kl(datums[start : start + per], out.loss_fn_outputs)
                metrics |= opt.result().metrics or {}
    metrics["time/train"] = time.perf_counter() - t0
    return metrics


def sample_rows(rollout: Rollout, group_size: int, n: int = 4) -> list[dict[str, Any]]:
    """A few (prompt, completion, reward, advantage) rows for the samples table."""
    return [
        {
            "prompt": rollout.problems[i].prompt,
            "completion": rollout.texts[i * group_size],
            "reward": float(rollout.rewards[i, 0]),
            "advantage": float(rollout.advantages[i, 0]),
        }
        for i in range(min(n, len(rollout.problems)))
    ]


def _with_old_logprobs(datum: Any, logprobs: list[float] | list[int]) -> Any:
    inputs = dict(datum.loss_fn_inputs)
    inputs["old_logprobs"] = logprobs
    return type(datum)(model_input=datum.model_input, loss_fn_inputs=inputs)


def _sample_train_kl(datums: Sequence[Any], outputs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Sampler-vs-trainer mismatch on the sampled tokens: k1 = mean(q - p) (cookbook's v1)."""
    diffs = []
    for datum, out in zip(datums, outputs, strict=True):
        mask = datum.loss_fn_inputs["mask"].to_torch() > 0
        q = datum.loss_fn_inputs["logprobs"].to_torch()[mask]
        p = out["logprobs"].to_torch()[mask]
        diffs.append(q - p)
    d = torch.cat(diffs)
    return {
        "mismatch/kl_sample_train_k1": float(d.mean()),
        "mismatch/max_abs_logprob_diff": float(d.abs().max()),
    }


def train(
    config: TrainConfig, *, resume: bool = False, echo: Callable[[str], None] = print
) -> RunSummary:
    """Run (or resume) the whole job described by `config`."""
    if config.asynchronous.enabled:
        from cispo.train.async_loop import train_async  # it imports this module

        return train_async(config, resume=resume, echo=echo)
    started = time.perf_counter()
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(config.task.name, **config.task.kwargs())
    service = ServiceClient(checkpoint_root=run_dir / "checkpoints", seed=config.run.seed)
    training = service.create_lora_training_client(
        config.model.base_model,
        rank=config.model.lora_rank,
        seed=config.run.seed,
        engine_config=EngineConfig(micro_batch_size=config.rl.micro_batch_size),
        model_overrides=config.model.overrides(),
    )
    logger = RunLogger(
        run_dir, tensorboard=config.run.tensorboard, wandb_project=config.run.wandb_project
    )
    start, state = 0, {}
    latest = latest_named_state(training.checkpoint_dir) if resume else None
    if latest is not None:
        state = training.load_state(str(latest)).result()
        start = int(state["step"])
        logger.resume(start)
        echo(f"resumed from {latest} at step {start}")
    else:
        (run_dir / "config.json").write_text(_json(config_to_dict(config)))
    rl, test = config.rl, task.problems("test", seed=config.run.seed, n=config.eval.num_problems)
    echo(_plan(config, training))
    if not state.get("warm_started"):
        supervised_warm_start(training, task, config)
        training.save_state("step_000000", metadata={"step": 0, "warm_started": True}).result()
    first = evaluate(training.save_weights_and_get_sampling_client(), task, test, config)
    last = first
    if start == 0:
        logger.log(0, first)
    echo(f"held-out greedy accuracy before RL: {first['eval/accuracy']:.1%}")
    progress = Progress(
        rl.steps, initial=start, desc="CISPO" if config.loss.name == "cispo" else config.loss.name
    )
    for step in range(start, rl.steps):
        t = time.perf_counter()
        rollout = collect_rollout(
            training.save_weights_and_get_sampling_client(), task, step, config
        )
        metrics = rollout.metrics | train_on_rollout(training, rollout, config)
        rows = sample_rows(rollout, rl.group_size)
        metrics["time/step"] = time.perf_counter() - t
        done = step + 1
        if done % config.eval.every == 0 or done == rl.steps:
            last = evaluate(training.save_weights_and_get_sampling_client(), task, test, config)
            metrics |= last
            logger.log_samples(done, rows)
        logger.log(done, metrics)
        if (config.run.checkpoint_every and done % config.run.checkpoint_every == 0) or (
            done == rl.steps
        ):
            training.save_state(
                f"step_{done:06d}",
                metadata={"step": done, "warm_started": True},
                keep_last=config.run.keep_last,
                durable=done == rl.steps,  # atomic either way; fsync only the final one
            ).result()
        progress.update(
            {
                "reward": metrics["reward/mean"],
                "acc": metrics["reward/accuracy"],
                "s/step": metrics["time/step"],
            }
        )
    progress.close()
    logger.plot()
    logger.close()
    training.close()
    summary = RunSummary(
        rl.steps, first["eval/accuracy"], last["eval/accuracy"], time.perf_counter() - started
    )
    echo(
        f"held-out greedy accuracy: {summary.accuracy_start:.1%} -> {summary.accuracy_end:.1%} "
        f"in {summary.seconds:.0f} s; run directory: {run_dir}"
    )
    return summary


def _plan(config: TrainConfig, training: TrainingClient) -> str:
    rl = config.rl
    params = sum(p.numel() for p in training.engine.model.parameters())
    trainable = sum(p.numel() for p in training.engine.model.parameters() if p.requires_grad)
    return "\n".join(
        [
            f"model: {config.model.base_model} ({params / 1e6:.2f}M parameters, "
            f"{trainable / 1e6:.2f}M trainable); task: {config.task.name}",
            f"warm start: {config.sft.steps} supervised steps × {config.sft.batch_size} problems",
            f"RL: {rl.steps} steps × {rl.prompts_per_step} prompts × {rl.group_size} samples = "
            f"{rl.prompts_per_step * rl.group_size} samples/step, "
            f"{rl.epochs * rl.minibatches} optimizer step(s) per rollout batch, "
            f"≤ {rl.prompts_per_step * rl.group_size * config.sampling.max_tokens} "
            "completion tokens/step",
            f"loss: {config.loss.describe()}; reduction {config.loss.reduction}; "
            f"advantages {rl.advantage}",
            f"run directory: {config.run.dir}",
        ]
    )


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)
