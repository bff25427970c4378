"""Seconds per RL step and reward curve: cispo's loop vs TRL's GRPOTrainer(loss_type="cispo").

Both sides start from the same weights: the embedded tiny Llama ("tiny", char tokenizer) after
a short supervised warm start, saved to a temporary HF directory that each side loads. Then each
runs `--steps` RL steps on arithmetic (`--digits`, one by default: after a short warm start
the tiny model solves part of it, so most groups carry a reward spread) with the same prompts
per step P, samples per prompt G, completion cap, temperature 1, learning rate, AdamW betas,
grad clip, float32, CPU, and the same torch thread count:

- cispo: `collect_rollout` (KV-cached sampler) + `train_on_rollout` (one CISPO step, weight band
  [0, 4], token_mean), the same calls `cispo.train.loop.train` makes.
- TRL: `GRPOTrainer(loss_type="cispo", epsilon_high=4.0)`; TRL's cispo clamps the weight at
  `epsilon_high` (an absolute cap, no lower bound), which is our [0, 4] band. One optimizer step
  per generation batch (`per_device_train_batch_size = P * G`), so the old logprobs equal the
  current ones and TRL skips their recompute, like we do. No vLLM, bf16 and gradient
  checkpointing off (TRL's defaults turn both on).

Left out on purpose: LoRA, KL/reference models, multi-epoch updates. Known differences: TRL
normalises the loss by all completion tokens, we by the tokens of groups with a reward spread
(zero-advantage groups are dropped); TRL draws its prompts from a shuffled dataset of the same
distribution, we draw fresh ones each step.

Needs TRL, which only the benchmark's environment installs:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 -e . trl
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/trl_vs_cispo.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from cispo.client import ServiceClient
from cispo.config import OptimConfig, RLConfig, SamplingConfig, TrainConfig
from cispo.engine import engine as engine_module
from cispo.engine.engine import EngineConfig
from cispo.rollout.rollouts import collect_rollout
from cispo.tasks import ArithmeticTask, Problem
from cispo.train.update import train_on_rollout
from cispo.train.warm_start import supervised_warm_start


class Timers:
    """Wall-clock seconds per named section, accumulated between `take` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Replace `owner.attribute` (a callable) by a timed version of itself."""
        inner: Callable[..., Any] = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.time(name):
                return inner(*args, **kwargs)

        setattr(owner, attribute, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def base_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig()
    return replace(
        config,
        task=replace(config.task, digits=args.digits),
        sampling=SamplingConfig(temperature=1.0, max_tokens=args.max_tokens),
        optim=OptimConfig(learning_rate=args.lr),
        sft=replace(config.sft, steps=args.sft_steps),
        rl=RLConfig(
            steps=args.steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            micro_batch_size=args.prompts * args.group,
        ),
    )


def warm_start(config: TrainConfig, directory: Path, root: Path) -> None:
    """Build the tiny model, run the supervised warm start, save it as an HF directory."""
    service = ServiceClient(checkpoint_root=root, seed=config.run.seed)
    training = service.create_lora_training_client(
        "tiny", rank=0, seed=config.run.seed, model_overrides=config.model.overrides()
    )
    supervised_warm_start(training, ArithmeticTask(digits=config.task.digits), config)
    cast(PreTrainedModel, training.engine.model).save_pretrained(directory)
    training.get_tokenizer().save_pretrained(directory)
    training.close()


def run_cispo(config: TrainConfig, directory: Path, root: Path) -> list[dict[str, float]]:
    """`rl.steps` steps of the loop's sample → reward → datums → CISPO update, timed."""
    torch.manual_seed(config.run.seed)
    service = ServiceClient(checkpoint_root=root, seed=config.run.seed)
    training = service.create_lora_training_client(
        str(directory),
        rank=0,
        seed=config.run.seed,
        engine_config=EngineConfig(micro_batch_size=config.rl.micro_batch_size),
    )
    timers = Timers()
    # The trainer's logprob forward (with grad) inside forward_backward; the rest of time/train
    # is backward + optimizer.
    timers.wrap(engine_module, "model_token_logprobs", "forward")
    task, rows = ArithmeticTask(digits=config.task.digits), []
    for step in range(config.rl.steps):
        start = time.perf_counter()
        rollout = collect_rollout(
            training.save_weights_and_get_sampling_client(), task, step, config
        )
        metrics = rollout.metrics | train_on_rollout(training, rollout, config)
        forward = timers.take().get("forward", 0.0)
        rows.append(
            {
                "step": time.perf_counter() - start,
                "reward": metrics["reward/mean"],
                "sample": metrics["time/sample"],
                "reward_fn": metrics["time/reward"],
                "forward": forward,
                "backward_optim": metrics["time/train"] - forward,
            }
        )
    training.close()
    return rows


def run_trl(config: TrainConfig, directory: Path, output: Path) -> list[dict[str, float]]:
    """The same steps with TRL's GRPOTrainer(loss_type="cispo"), timed per step and section."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rl, task = config.rl, ArithmeticTask(digits=config.task.digits)
    problems = task.problems("train", seed=config.run.seed, n=rl.prompts_per_step * rl.steps)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])

    def reward(
        prompts: list[str], completions: list[str], answer: list[str], **_: Any
    ) -> list[float]:
        return [
            task.score(Problem(prompt=p, answer=a), c)
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    args = GRPOConfig(
        output_dir=str(output),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=config.run.seed,
        max_steps=rl.steps,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=rl.prompts_per_step * rl.group_size,
        gradient_accumulation_steps=1,
        num_generations=rl.group_size,
        max_completion_length=config.sampling.max_tokens,
        temperature=config.sampling.temperature,
        learning_rate=config.optim.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=config.optim.beta1,
        adam_beta2=config.optim.beta2,
        adam_epsilon=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        max_grad_norm=config.optim.grad_clip_norm,
        loss_type="cispo",
        epsilon_high=config.loss.ratio_max,
        beta=0.0,
        use_vllm=False,
    )
    torch.manual_seed(config.run.seed)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
    )
    timers = Timers()
    timers.wrap(trainer, "_generate_single_turn", "sample")
    timers.wrap(trainer, "_calculate_rewards", "reward_fn")
    timers.wrap(trainer, "_prepare_inputs", "prepare")
    timers.wrap(trainer, "compute_loss", "forward")
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(time.perf_counter() - self.start)

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; we print a summary
    trainer.add_callback(StepTimer())
    sections: list[dict[str, float]] = []
    original_step = trainer.training_step

    def training_step(*a: Any, **k: Any) -> Any:
        out = original_step(*a, **k)
        sections.append(timers.take())
        return out

    setattr(trainer, "training_step", training_step)  # noqa: B010  # mypy: no method-assign
    trainer.train()
    rewards = [float(log["reward"]) for log in trainer.state.log_history if "reward" in log]
    rows = []
    for seconds, part, reward_mean in zip(steps, sections, rewards, strict=True):
        other = part.get("prepare", 0.0) - part.get("sample", 0.0) - part.get("reward_fn", 0.0)
        rows.append(
            {
                "step": seconds,
                "reward": reward_mean,
                "sample": part.get("sample", 0.0),
                "reward_fn": part.get("reward_fn", 0.0),
                "prepare_other": other,
                "forward": part.get("forward", 0.0),
                "backward_optim": seconds - part.get("prepare", 0.0) - part.get("forward", 0.0),
            }
        )
    return rows


def summarise(name: str, rows: list[dict[str, float]]) -> float:
    """Print the median of each timing over steps 2.. (step 1 pays one-off costs)."""
    timed = rows[1:] or rows
    median = statistics.median(r["step"] for r in timed)
    parts = ", ".join(
        f"{k} {statistics.median(r[k] for r in timed):.3f}"
        for k in rows[0]
        if k not in ("step", "reward")
    )
    print(f"{name}: {median:.3f} s/step (median of steps 2-{len(rows)}); {parts}")
    print(f"{name} reward/step: " + " ".join(f"{r['reward']:.2f}" for r in rows))
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=16, help="P, prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--digits", type=int, default=1, help="digits per operand")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = base_config(args)

    import trl

    print(
        f"torch {torch.__version__}, trl {trl.__version__}, threads {torch.get_num_threads()}, "
        f"digits={args.digits} P={args.prompts} G={args.group} max_tokens={args.max_tokens} "
        f"lr={args.lr} steps={args.steps} sft_steps={args.sft_steps}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root, directory = Path(tmp), Path(tmp) / "warm"
        warm_start(config, directory, root / "sft")
        ours = run_cispo(config, directory, root / "cispo")
        torch.set_num_threads(args.threads)
        theirs = run_trl(config, directory, root / "trl")
    a = summarise("cispo", ours)
    b = summarise("trl", theirs)
    print(f"TRL / cispo seconds per step: {b / a:.1f}x")
    mean_a = statistics.mean(r["reward"] for r in ours)
    mean_b = statistics.mean(r["reward"] for r in theirs)
    print(f"mean reward over all steps: cispo {mean_a:.3f}, trl {mean_b:.3f}")


if __name__ == "__main__":
    main()
