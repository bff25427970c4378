"""A fake vLLM engine for the contract tests of `cispo.engine.vllm_sampler`.

It emits objects shaped like vLLM's (vllm-project/vllm `vllm/outputs.py`: `RequestOutput`,
`CompletionOutput`; `vllm/logprobs.py`: `Logprob`, `SampleLogprobs` = one `dict[int, Logprob]`
per generated token, `PromptLogprobs` = None then one dict per prompt token), and computes them
with a Hugging Face model the way vLLM v1's sampler does (`vllm/v1/sample/sampler.py`,
`ops/topk_topp_sampler.py`): float32 logits; greedy below temperature 1e-5 with logprobs of the
unscaled logits; otherwise logits / T, the top-k/top-p mask, then "processed_logprobs" = log
softmax of the masked logits, "raw_logprobs" = log softmax of the logits before temperature;
draws by argmax(p / q) with q ~ Exp(1) from the request's seeded generator. Prompt logprobs are
log softmax of the raw logits (no temperature). One sequence at a time, no cache: a tiny model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cispo.engine.sampler import weight_fingerprint


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(kw_only=True)
class FakeSamplingParams:
    """The fields of `vllm.SamplingParams` the adapter sets (an unknown keyword is a TypeError,
    as for the real dataclass-like class)."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


class FakeLLM:
    """`LLM.generate` over a transformers causal LM, plus `load_weights` and `fingerprint`."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_id: int | None,
        logprobs_mode: str = "processed_logprobs",
        max_logprobs: int = -1,
    ) -> None:
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.logprobs_mode = logprobs_mode
        self.max_logprobs = max_logprobs
        self.requests = 0

    def _logits(self, ids: list[int]) -> Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]))
        return out.logits[0].float()  # [T, V]

    def generate(self, prompts: list[dict[str, list[int]]], sps: Any) -> list[RequestOutput]:
        outputs = []
        per_prompt = sps if isinstance(sps, list) else [sps] * len(prompts)  # as LLM.generate
        for prompt, sp in zip(prompts, per_prompt, strict=True):
            ids = list(prompt["prompt_token_ids"])
            if sp.prompt_logprobs == -1 and self.max_logprobs != -1:
                raise ValueError("prompt_logprobs=-1 needs LLM(max_logprobs=-1)")
            prompt_lp = None if sp.prompt_logprobs is None else self._prompt_logprobs(ids, sp)
            generator = None if sp.seed is None else torch.Generator().manual_seed(sp.seed)
            completions = [self._complete(ids, i, sp, generator) for i in range(sp.n)]
            self.requests += 1
            outputs.append(
                RequestOutput(str(self.requests), None, ids, prompt_lp, completions, True)
            )
        return outputs

    def _prompt_logprobs(self, ids: list[int], sp: Any) -> list[dict[int, Logprob] | None]:
        raw = torch.log_softmax(self._logits(ids), dim=-1)  # [T, V], no temperature
        positions: list[dict[int, Logprob] | None] = [None]
        for t in range(1, len(ids)):
            row = raw[t - 1]
            if sp.prompt_logprobs == -1:
                positions.append({v: Logprob(float(row[v])) for v in range(row.shape[0])})
            else:
                top = torch.topk(row, sp.prompt_logprobs).indices.tolist()
                positions.append({v: Logprob(float(row[v])) for v in [ids[t], *top]})
        return positions

    def _complete(
        self, prompt: list[int], index: int, sp: Any, generator: torch.Generator | None
    ) -> CompletionOutput:
        ids, tokens, logprobs = list(prompt), [], []
        reason = "length"
        for _ in range(sp.max_tokens):
            logits = self._logits(ids)[-1]  # [V]
            if sp.temperature < 1e-5:
                token = int(logits.argmax())
                returned = torch.log_softmax(logits, dim=-1)
            else:
                scaled = logits / sp.temperature
                if sp.top_k > 0:
                    kth = torch.topk(scaled, sp.top_k).values[-1]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                if sp.top_p < 1.0:
                    ordered, order = torch.sort(scaled)
                    cum = torch.softmax(ordered, -1).cumsum(-1)
                    drop = cum <= 1 - sp.top_p
                    drop[-1] = False
                    scaled = scaled.masked_fill(drop.scatter(0, order, drop), float("-inf"))
                probs = torch.softmax(scaled, dim=-1)
                q = torch.empty_like(probs).exponential_(generator=generator)
                token = int((probs / q).argmax())
                if self.logprobs_mode == "processed_logprobs":
                    returned = torch.log_softmax(scaled, dim=-1)
                else:  # raw_logprobs: before temperature
                    returned = torch.log_softmax(logits, dim=-1)
            tokens.append(token)
            logprobs.append({token: Logprob(float(returned[token]), rank=1)})
            ids.append(token)
            if (token == self.eos_token_id and not sp.ignore_eos) or token in sp.stop_token_ids:
                reason = "stop"
                break
        total = sum(p[t].logprob for p, t in zip(logprobs, tokens, strict=True))
        return CompletionOutput(
            index, "", tokens, total, logprobs if sp.logprobs is not None else None, reason
        )

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                own[name].copy_(tensor)

    def fingerprint(self) -> float:
        return weight_fingerprint(self.model.state_dict())
