"""vLLM behind the `Sampler` protocol (`cispo.engine.sampler`), imported lazily.

`VLLMSampler` turns the protocol's calls into `LLM.generate` requests and vLLM's outputs back into
`SampledSequence`s. vLLM is an optional extra (`pip install cispo[vllm]`, range pinned in
pyproject.toml); nothing here imports it until `VLLMSampler.from_pretrained` builds an engine.
The adapter itself only needs an object with vLLM's `LLM.generate` signature and output types, so
tests/engine/test_vllm_sampler.py contract-tests it against a fake engine that emits vLLM-shaped
objects, and the sampler conformance suite runs it through that fake. Real vLLM has not been run
with it (no accelerator here): tests marked `gpu` do that and skip without CUDA or vllm.

vLLM's types (vllm-project/vllm `vllm/outputs.py`, `vllm/logprobs.py`): `LLM.generate(prompts,
sampling_params)` returns one `RequestOutput` per prompt, in order; `RequestOutput.outputs` holds
`n` `CompletionOutput`s with `token_ids`, `logprobs` (`SampleLogprobs`: one `dict[int, Logprob]`
per generated token, holding at least the sampled token; `Logprob.logprob` a float),
`finish_reason` ("stop" at eos / a stop token / a stop string, "length" at `max_tokens`); and
`RequestOutput.prompt_logprobs` (`PromptLogprobs`: None for the first prompt token, then one dict
per token).

The logprob convention. The trainer's, and the protocol's, is log softmax(logits / T)[token] over
the full vocabulary, float32. vLLM v1's sampler (`vllm/v1/sample/sampler.py`,
`ops/topk_topp_sampler.py`) returns, with `logprobs_mode="processed_logprobs"`, the log softmax of
the logits after temperature and after the top-k/top-p mask (and after penalties, bad words and
logit processors), float32; in a greedy batch, log softmax of the logits without temperature. So:
- with top_k = -1, top_p = 1, no penalties: processed = the trainer's convention exactly (up to
  kernels and dtype). That is the only configuration this adapter accepts; top_k/top_p are
  refused (with them, vLLM reports the renormalised truncated distribution, log(p / kept mass),
  which the trainer does not compute; the HF sampler reports the unfiltered value instead, which
  vLLM cannot). `raw_logprobs` (vLLM's default) would be wrong at any temperature ≠ 1: it is taken
  before the temperature.
- greedy (temperature 0): log softmax(logits), which is the HF sampler's greedy value too.
- prompt logprobs (`compute_logprobs`) are log softmax of the raw logits, no temperature (vllm v1
  `GPUModelRunner._get_prompt_logprobs_dict`; Trinity-RFT patches vLLM 0.10.2-0.19 for exactly
  that). At temperature 1 (or 0) the adapter asks for the scored token only
  (`prompt_logprobs=0`); at another temperature it asks for the whole vocabulary
  (`prompt_logprobs=-1`, which needs `LLM(max_logprobs=-1)`) and takes log softmax(l / T) of the
  raw logprobs l, equal to log softmax(logits / T) since log softmax ignores a constant shift.
  That is V floats per token: use it for probes, not bulk scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from cispo.engine.sampler import check_stream_ids, stream_seed
from cispo.types import SampledSequence, SamplingParams

__all__ = ["VLLMEngine", "VLLMSampler", "vllm_sampling_kwargs"]

LOGPROBS_MODE = "processed_logprobs"
"""The `LLM(logprobs_mode=...)` this adapter needs (module docstring)."""


class VLLMEngine(Protocol):
    """What the adapter needs of an engine: `vllm.LLM.generate`, plus weight loading and a
    fingerprint of the weights it holds (`RealVLLMEngine` for vLLM, a fake in the tests)."""

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: Any) -> list[Any]:
        """`sampling_params`: one `vllm.SamplingParams`, or a list of one per prompt."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None: ...

    def fingerprint(self) -> float: ...


def vllm_sampling_kwargs(params: SamplingParams, num_samples: int) -> dict[str, Any]:
    """`vllm.SamplingParams(**kwargs)` for a protocol request (ValueError for what vLLM cannot
    report in the trainer's convention; module docstring)."""
    if params.top_k != -1 or params.top_p != 1.0:
        raise ValueError(
            f"VLLMSampler: top_k={params.top_k}, top_p={params.top_p} is not supported (allowed: "
            "top_k=-1, top_p=1.0): vLLM's processed logprobs are then those of the truncated, "
            "renormalised distribution, not the trainer's log softmax(logits / T)"
        )
    kwargs: dict[str, Any] = {
        "n": num_samples,
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "logprobs": 0,  # the sampled token's logprob only
        "detokenize": False,
    }
    stop = params.stop
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not stops:
            kwargs["ignore_eos"] = True  # stop == []: nothing ends a sequence but max_tokens
        ids = [s for s in stops if isinstance(s, int)]
        strings = [s for s in stops if isinstance(s, str)]
        if ids:
            kwargs["stop_token_ids"] = ids
        if strings:
            kwargs["stop"] = strings
            kwargs["detokenize"] = True  # vLLM matches stop strings on the text
    return kwargs


class VLLMSampler:
    """`Sampler` over a vLLM engine (module docstring for the conventions).

    `engine`: a `vllm.LLM` built with `logprobs_mode="processed_logprobs"` wrapped in
    `RealVLLMEngine`, or anything with the same `generate` outputs. `sampling_params_cls`:
    `vllm.SamplingParams` (imported lazily when None). `weight_names`: the trainer's state-dict
    names that `load_weights` must receive, all and only those.
    """

    def __init__(
        self,
        engine: VLLMEngine,
        *,
        weight_names: Iterable[str],
        sampling_params_cls: Callable[..., Any] | None = None,
        version: int = 0,
    ) -> None:
        self._engine: VLLMEngine | None = engine
        self.weight_names = frozenset(weight_names)
        if sampling_params_cls is None:
            from vllm import SamplingParams as VLLMSamplingParams  # lazy: an optional extra

            sampling_params_cls = VLLMSamplingParams
        self.sampling_params_cls = sampling_params_cls
        self.version = version

    @classmethod
    def from_pretrained(cls, model_dir: str, **llm_kwargs: Any) -> VLLMSampler:
        """A vLLM engine on a Hugging Face directory (e.g. `cispo export`'s), in this process."""
        from safetensors import safe_open
        from vllm import LLM

        llm = LLM(model=model_dir, logprobs_mode=LOGPROBS_MODE, **llm_kwargs)
        names: set[str] = set()
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                names |= set(handle.keys())
        return cls(RealVLLMEngine(llm), weight_names=names)

    @property
    def engine(self) -> VLLMEngine:
        if self._engine is None:
            raise RuntimeError("this sampler is closed")
        return self._engine

    def sample(
        self,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        stream_ids: Sequence[int] | None = None,
    ) -> list[list[SampledSequence]]:
        """With `params.seed`, prompt i's request gets its own vLLM seed,
        `stream_seed(seed, stream_ids[i])` (the seed itself for stream 0); vLLM draws each
        request from its own seeded generator, so that is the protocol's per-stream guarantee."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        engine = self.engine
        if not prompts:
            return []
        streams = check_stream_ids(stream_ids, len(prompts))
        kwargs = vllm_sampling_kwargs(params, num_samples)
        request: Any = self.sampling_params_cls(**kwargs)
        if params.seed is not None:  # one SamplingParams per prompt (LLM.generate takes a list)
            request = [
                self.sampling_params_cls(**{**kwargs, "seed": stream_seed(params.seed, s)})
                for s in streams
            ]
        outputs = engine.generate([{"prompt_token_ids": list(p)} for p in prompts], request)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [_group(out, num_samples) for out in outputs]

    def compute_logprobs(
        self, sequences: list[list[int]], *, temperature: float = 1.0
    ) -> list[list[float]]:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        engine = self.engine
        if not sequences:
            return []
        if any(len(s) == 0 for s in sequences):
            raise ValueError("every sequence needs at least one token")
        scale = 1.0 if temperature == 0 else temperature
        whole_vocab = scale != 1.0
        request = self.sampling_params_cls(
            n=1, max_tokens=1, temperature=1.0, prompt_logprobs=-1 if whole_vocab else 0
        )
        outputs = engine.generate([{"prompt_token_ids": list(s)} for s in sequences], request)
        result = []
        for seq, out in zip(sequences, outputs, strict=True):
            positions = out.prompt_logprobs
            if positions is None or len(positions) != len(seq):
                raise RuntimeError("vLLM returned no prompt logprobs for every prompt token")
            row = []
            for token, position in zip(seq[1:], positions[1:], strict=True):
                if whole_vocab:
                    ids = list(position)
                    raw = torch.tensor([position[i].logprob for i in ids], dtype=torch.float32)
                    scaled = torch.log_softmax(raw / scale, dim=-1)
                    row.append(float(scaled[ids.index(token)]))
                else:
                    row.append(float(position[token].logprob))
            result.append(row)
        return result

    def load_weights(self, source: Mapping[str, Tensor], version: int) -> None:
        """Hand every weight to vLLM's `load_weights` (it maps the trainer's names onto its own
        fused layout); refused, loading nothing, unless `source` has exactly `weight_names`."""
        engine = self.engine
        missing = sorted(self.weight_names - source.keys())
        extra = sorted(source.keys() - self.weight_names)
        if missing or extra:
            raise ValueError(
                f"load_weights: the source does not fit this model (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        engine.load_weights((name, source[name]) for name in source)
        self.version = version

    def fingerprint(self) -> float:
        return self.engine.fingerprint()

    def close(self) -> None:
        self._engine = None


def _group(out: Any, num_samples: int) -> list[SampledSequence]:
    """One `RequestOutput`'s completions as [G] `SampledSequence`s, in `index` order."""
    completions = sorted(out.outputs, key=lambda c: c.index)
    if len(completions) != num_samples:
        raise RuntimeError(f"vLLM returned {len(completions)} completions, asked for {num_samples}")
    group = []
    for completion in completions:
        tokens = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(tokens):
            raise RuntimeError(
                "vLLM returned no logprob for every sampled token: build the LLM with "
                f"logprobs_mode={LOGPROBS_MODE!r} and request logprobs=0"
            )
        if any(t not in p for t, p in zip(tokens, completion.logprobs, strict=True)):
            raise RuntimeError("vLLM's logprobs lack a sampled token (request logprobs=0)")
        logprobs = [
            float(position[token].logprob)
            for token, position in zip(tokens, completion.logprobs, strict=True)
        ]
        if any(math.isinf(x) for x in logprobs):
            raise RuntimeError("vLLM reported a -inf logprob for a sampled token")
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with {reason!r}")
        group.append(SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=reason))
    return group


class RealVLLMEngine:
    """`VLLMEngine` over a `vllm.LLM` (not run here: no accelerator, no vllm).

    Weights go in through `LLM.apply_model` (a function run on the model in each worker; vLLM's
    own `model.load_weights(iterable of (name, tensor))`), which pickles the function and the
    tensors to the workers (V1 needs VLLM_ALLOW_INSECURE_SERIALIZATION=1); for large models,
    `cispo.engine.weight_sync` directories read by the workers are the route. The fingerprint
    sums vLLM's parameters in float64, adding the embedding again for a tied head (the trainer's
    state dict lists `lm_head.weight` too); it equals the trainer's only when vLLM holds the
    trainer's dtype (`dtype="float32"`).
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        config = llm.llm_engine.model_config.hf_config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: Any) -> list[Any]:
        return list(self.llm.generate(prompts, sampling_params, use_tqdm=False))

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        items = [(name, tensor.detach().cpu()) for name, tensor in weights]
        self.llm.apply_model(lambda model: model.load_weights(iter(items)))

    def fingerprint(self) -> float:
        tied = self.tied

        def total(model: torch.nn.Module) -> float:
            params = dict(model.named_parameters())
            out = sum(float(p.detach().double().sum()) for p in params.values())
            embed = next((p for n, p in params.items() if n.endswith("embed_tokens.weight")), None)
            if tied and embed is not None and not any(n.startswith("lm_head") for n in params):
                out += float(embed.detach().double().sum())
            return out

        sums: Sequence[float] = self.llm.apply_model(total)
        return float(sums[0])
