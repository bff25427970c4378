"""A complete CISPO loop written against the Tinker client API, to be read top to bottom.

A short supervised warm start teaches a random tiny model the task's format and some arithmetic, so
that it earns reward; then each RL step samples G completions per prompt with their sampler
logprobs, scores them, turns the rewards into group advantages and trains with loss_fn "cispo"
(MiniMax-M1, arXiv:2506.13585) in Tinker's one-sided weight band [0, 4]. Every model call goes
through the client API, so the same script drives the in-process client (`cispo.client`) or, with
--base-url, a `cispo serve` server through the `tinker` SDK:

    python examples/rl_loop.py
    cispo serve --api-key tml-local --port 8000 &
    python examples/rl_loop.py --base-url http://127.0.0.1:8000 --api-key tml-local

From the package it takes only pure helpers: the task and its verifier (`cispo.tasks`), failure-safe
scoring (`cispo.rewards`) and the GRPO advantage (`cispo.advantages`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import tyro

from cispo.advantages import compute_advantages
from cispo.rewards import score_all
from cispo.tasks import ArithmeticTask, Problem


@dataclass(frozen=True, kw_only=True)
class Config:
    base_url: str | None = None
    """A `cispo serve` URL, driven through the tinker SDK; None: the in-process client."""
    api_key: str | None = None
    """The server's API key (None: the SDK reads $TINKER_API_KEY)."""
    base_model: str = "tiny"
    """The embedded 0.54M-parameter model (a server offers it by default)."""
    seed: int = 0
    """Seeds the problems and every sampling request, and the base weights in process (a server
    takes those from `cispo serve --seed`, default 0): the same seed, the same run."""
    sft_steps: int = 200
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    rl_steps: int = 100
    prompts_per_step: int = 32
    group_size: int = 8
    """G: completions sampled per prompt, whose rewards are compared within the group."""
    rl_learning_rate: float = 3e-4
    max_tokens: int = 6
    eval_problems: int = 64
    """Held-out problems answered greedily before and after RL."""

    def __post_init__(self) -> None:  # G >= 2: a group's rewards are compared with each other
        for name in ("group_size", "prompts_per_step", "sft_batch_size", "eval_problems"):
            low = 2 if name == "group_size" else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


def make_clients(cfg: Config) -> tuple[Any, Any, Any]:
    """(service client, training client, API module). `cispo.client` and `tinker` export the same
    names (ServiceClient, Datum, ModelInput, SamplingParams, AdamParams): the loop is shared."""
    api: Any
    if cfg.base_url is None:
        import cispo.client

        api = cispo.client
        service = api.ServiceClient(seed=cfg.seed)
    else:
        import tinker

        api = tinker
        service = api.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key)
    # rank=0: full fine-tuning of the tiny model (both clients take it; the server then skips PEFT)
    training = service.create_lora_training_client(cfg.base_model, rank=0, seed=cfg.seed).result()
    return service, training, api


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = tyro.cli(Config, args=argv)
    service, training, api = make_clients(cfg)
    tok = training.get_tokenizer()
    task = ArithmeticTask(digits=1, operators="+-")  # "7-9=" -> "-2", reward 1 for exact answers
    rng = random.Random(cfg.seed)  # every problem and sampling seed comes from here

    def prompt_tokens(problem: Problem) -> list[int]:
        return [tok.bos_token_id, *tok.encode(problem.prompt, add_special_tokens=False)]

    def answer_tokens(problem: Problem) -> list[int]:
        return [*tok.encode(problem.answer, add_special_tokens=False), tok.eos_token_id]

    # Datum layout: model_input = prompt + completion[:-1]; position i predicts target_tokens[i],
    # so the first len(prompt) - 1 targets are prompt tokens, with weight/advantage 0.
    def datum(prompt: list[int], completion: list[int], **per_token: list[float]) -> Any:
        pad = [0.0] * (len(prompt) - 1)
        return api.Datum(
            model_input=api.ModelInput.from_ints(prompt + completion[:-1]),
            loss_fn_inputs={"target_tokens": prompt[1:] + completion}
            | {key: pad + values for key, values in per_token.items()},
        )

    # 1. Supervised warm start: cross_entropy on the answers, linear warm-up then constant (an
    #    annealed warm start settles in a sharp minimum that RL updates knock it out of).
    sft_nll = math.nan
    for step in range(cfg.sft_steps):
        problems = task.problems("train", seed=rng.randrange(2**31), n=cfg.sft_batch_size)
        pairs = [(prompt_tokens(p), answer_tokens(p)) for p in problems]
        lr = cfg.sft_learning_rate * min(1.0, (step + 1) / max(1, cfg.sft_steps // 10))
        fwd = training.forward_backward(
            [datum(p, a, weights=[1.0] * len(a)) for p, a in pairs], "cross_entropy"
        )
        training.optim_step(api.AdamParams(learning_rate=lr, grad_clip_norm=1.0)).result()
        # cross_entropy is a sum over the weighted tokens (Tinker's convention)
        sft_nll = fwd.result().metrics["loss:sum"] / sum(len(a) for _, a in pairs)
    print(f"warm start: {cfg.sft_steps} steps, last nll/token {sft_nll:.3f}")

    test = task.problems("test", seed=cfg.seed, n=cfg.eval_problems)
    probe_prompt, probe_answer = prompt_tokens(test[0]), answer_tokens(test[0])

    def evaluate(sampler: Any, when: str) -> dict[str, float]:
        """Greedy accuracy on `test` and the logprob of one held-out answer: what RL changes."""
        greedy = api.SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
        inputs = [api.ModelInput.from_ints(prompt_tokens(p)) for p in test]
        futures = [sampler.sample(x, 1, greedy) for x in inputs]
        tokens = [f.result().sequences[0].tokens for f in futures]
        texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        accuracy = sum(task.score(p, t) for p, t in zip(test, texts, strict=True)) / len(test)
        probe = api.ModelInput.from_ints(probe_prompt + probe_answer)
        probe_logprob = sum(sampler.compute_logprobs(probe).result()[len(probe_prompt) :])
        print(f"{when} RL: greedy accuracy {accuracy:.1%}, probe logprob {probe_logprob:.4f}")
        return {f"accuracy_{when}": accuracy, f"probe_logprob_{when}": probe_logprob}

    sampler = training.save_weights_and_get_sampling_client().result()
    before = evaluate(sampler, "before")

    # 2. RL: sample -> rewards -> group advantages -> datums -> one CISPO update, per step.
    steps: list[dict[str, float]] = []
    P, G = cfg.prompts_per_step, cfg.group_size
    for step in range(1, cfg.rl_steps + 1):
        started = time.time()
        problems = task.problems("train", seed=rng.randrange(2**31), n=P)
        prompts = [prompt_tokens(p) for p in problems]
        # One request per prompt, each with its own seed: no draw depends on how a client batches
        # concurrent requests, so both clients sample the same tokens.
        params = [
            api.SamplingParams(max_tokens=cfg.max_tokens, seed=rng.randrange(2**31))
            for _ in prompts
        ]
        futures = [
            sampler.sample(api.ModelInput.from_ints(x), G, sp)
            for x, sp in zip(prompts, params, strict=True)
        ]
        groups = [f.result().sequences for f in futures]  # [P][G], each with .tokens, .logprobs
        texts = [tok.decode(s.tokens, skip_special_tokens=True) for g in groups for s in g]
        scored = score_all(task, [p for p in problems for _ in range(G)], texts)
        rewards_P_G = torch.tensor(scored.rewards).view(P, G)  # NaN: the verifier failed
        # GRPO: A = (r - mean) / (std + eps) within each group; exactly 0 for a constant group
        adv_P_G = compute_advantages(rewards_P_G, "grpo").advantages.tolist()
        batch, sampled = [], []
        for prompt, group, adv_G in zip(prompts, groups, adv_P_G, strict=True):
            if not any(adv_G):
                continue  # all G rewards equal: no signal from this prompt
            for seq, adv in zip(group, adv_G, strict=True):
                # `logprobs` are the sampler's: the denominator of CISPO's importance ratio.
                n = len(seq.tokens)
                batch.append(datum(prompt, seq.tokens, logprobs=seq.logprobs, advantages=[adv] * n))
                sampled.append(seq.logprobs)
        metrics = {"step": step, "reward": float(torch.nanmean(rewards_P_G)), "datums": len(batch)}
        metrics |= {"loss": math.nan, "sampler_minus_trainer_logprob": math.nan}
        if batch:
            fwd = training.forward_backward(
                batch, "cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
            )
            optim = training.optim_step(api.AdamParams(learning_rate=cfg.rl_learning_rate))
            out = fwd.result()
            optim.result()
            # The trainer's logprobs of the sampled tokens, which on-policy equal the sampler's.
            diffs = [
                s - t
                for lp, o in zip(sampled, out.loss_fn_outputs, strict=True)
                for s, t in zip(lp, o["logprobs"].data[-len(lp) :], strict=True)
            ]
            metrics["loss"] = out.metrics["loss:sum"]
            metrics["sampler_minus_trainer_logprob"] = sum(diffs) / len(diffs)
            sampler = training.save_weights_and_get_sampling_client().result()
        metrics["seconds"] = time.time() - started
        steps.append(metrics)
        print("  ".join(f"{key} {value:.4g}" for key, value in metrics.items()))

    after = evaluate(sampler, "after")
    service.close("success").result()  # ends the session (on a server: frees its models)
    return {"sft_nll": sft_nll, **before, **after, "steps": steps}


if __name__ == "__main__":
    main()
