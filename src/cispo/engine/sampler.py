"""Batched, KV-cached sampling that returns the sampler's per-token logprobs.

`sample` runs all prompts × samples as one batch: one prefill over the P left-padded prompts,
whose cache is then repeated G times, then one token per step against a transformers
`DynamicCache`. Rows that finish are dropped from the batch (cache included), so late steps only
pay for the rows still running. `compute_logprobs` is the
teacher-forced counterpart (Tinker's `SamplingClient.compute_logprobs`).

`Sampler` is the protocol everything above the engine samples through (the client's
`SamplingClient`, the async worker, the server): sample, compute_logprobs, load_weights(source,
version), fingerprint, close. `HFSampler` implements it with the two functions above on one frozen
transformers model; other implementations (vLLM, sharded) plug in behind the same protocol, and
tests/engine/test_sampler_protocol.py is the conformance test each must pass.

The logprob of a sampled token is log softmax(logits / temperature)[token] in float32, which is what
a trainer computes by running prompt + completion through the same model once. With left padding,
an explicit attention mask and position ids counted from each row's first real token, padded rows
give the same logits as unpadded ones, so on-policy sampler and trainer logprobs agree to float
rounding (tests/rollout/test_sampler.py checks 1e-5).

Per-row random streams: the uniform that draws token t of sample g of a prompt is
`stream_uniforms(seed, stream id, g, t)`, a counter-based hash of those four numbers and nothing
else, so a row's sample does not depend on the other rows of its batch or their order (up to the
float rounding of its logits, which the batch's padding and size can move by ~1e-6). `sample`
takes one stream id per prompt (default: its index); a seeded request through the client or the
server gets stream id 0, so its samples are a function of (weights, prompt, n, params) alone,
as with vLLM's per-request seed (`cispo.engine.batching`); a rollout passes each prompt's index
in the step's batch, so a rank sampling a slice of the batch draws what one process would
(tests/engine/test_sampler_streams.py).

Left out: speculative decoding, prefix sharing between different prompts, a static cache and
CUDA graphs.

    params = SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    seqs_P_G = sample(model, prompts_P_T, 8, params, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase

from cispo.types import SampledSequence, SamplingParams


@runtime_checkable
class Sampler(Protocol):
    """One set of policy weights that samples completions and scores sequences.

    Conventions every implementation keeps (the conformance test checks each):
    - `sample(prompts [P][T_p], n, params)` returns [P][n] sequences, each with one float32
      logprob per completion token, log softmax(logits / temperature)[token] over the full
      vocabulary (the trainer's `forward` logprob, so on-policy ratios are 1); `stop_reason` is
      "stop" when eos / a stop token / a stop string ended it, "length" when `max_tokens` did.
      With `params.seed` set, prompt i's samples are a function of (weights, prompt i, n,
      params, stream_ids[i]) (default stream id: i), whatever else is in the batch (up to float
      rounding of the logits).
    - `compute_logprobs(sequences [N][T_i], temperature)` returns [N][T_i - 1]: the teacher-forced
      logprob of tokens 1..T_i - 1, same convention.
    - `load_weights(source, version)` replaces every weight by `source[name]` (the trainer's
      state-dict names) and sets `version` (the policy version stamped on its samples).
    - `fingerprint()` is `weight_fingerprint` of its weights: after an exact load it equals the
      fingerprint of `source`.
    - `close()` releases the weights; the sampler is unusable afterwards.
    """

    version: int

    def sample(
        self,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        stream_ids: Sequence[int] | None = None,
    ) -> list[list[SampledSequence]]: ...

    def compute_logprobs(
        self, sequences: list[list[int]], *, temperature: float = 1.0
    ) -> list[list[float]]: ...

    def load_weights(self, source: Mapping[str, Tensor], version: int) -> None: ...

    def fingerprint(self) -> float: ...

    def close(self) -> None: ...


def weight_fingerprint(state: Mapping[str, Tensor]) -> float:
    """Sum of every entry in float64, in `state`'s order: equal on both sides of an exact copy."""
    return float(sum(float(t.detach().double().sum()) for t in state.values()))


class HFSampler:
    """`Sampler` over one transformers model (frozen here: eval mode, no gradients), with the
    KV-cached `sample` and `compute_logprobs` of this module.

    `generator` draws the base seed of requests without a seed (the engine passes its own, so
    that it is checkpointed with the engine's state); `tokenizer` is needed only for stop strings;
    `freeze=False` leaves the model's mode and `requires_grad` alone (`cispo.engine.engine`'s
    shared sampler, which reads a training model).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_id: int | None,
        pad_token_id: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
        generator: torch.Generator | None = None,
        version: int = 0,
        freeze: bool = True,
    ) -> None:
        self._model: torch.nn.Module | None = model
        if freeze:  # False: the caller owns the model's mode and gradients (a shared sampler)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.version = version

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError("this sampler is closed")
        return self._model

    def sample(
        self,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        stream_ids: Sequence[int] | None = None,
    ) -> list[list[SampledSequence]]:
        return sample(
            self.model,
            prompts,
            num_samples,
            params,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generator=self.generator,
            tokenizer=self.tokenizer,
            stream_ids=stream_ids,
        )

    def compute_logprobs(
        self, sequences: list[list[int]], *, temperature: float = 1.0
    ) -> list[list[float]]:
        return compute_logprobs(self.model, sequences, temperature=temperature)

    def load_weights(self, source: Mapping[str, Tensor], version: int) -> None:
        """Copy `source` into the model in place (every key, matching shapes: else an error that
        names them, and nothing is loaded)."""
        model = self.model
        own = model.state_dict()
        missing, extra = sorted(own.keys() - source.keys()), sorted(source.keys() - own.keys())
        wrong = [k for k in own.keys() & source.keys() if own[k].shape != source[k].shape]
        if missing or extra or wrong:
            raise ValueError(
                f"load_weights: the source does not fit this model (missing {missing[:3]}, "
                f"unexpected {extra[:3]}, wrong shape {sorted(wrong)[:3]})"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(source[name])
        self.version = version

    def fingerprint(self) -> float:
        return weight_fingerprint(self.model.state_dict())

    def close(self) -> None:
        self._model = None


def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int,
    params: SamplingParams,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    use_cache: bool = True,
    drop_finished: bool = True,
    stream_ids: Sequence[int] | None = None,
) -> list[list[SampledSequence]]:
    """Sample `num_samples` completions for each prompt; returns [P][G] sequences.

    A sampled token is drawn from softmax(filter(logits / temperature)), where filter keeps the
    top_k / top_p set (ties at the k-th logit are all kept), but its reported logprob is of the
    unfiltered log softmax(logits / temperature). That is the quantity a trainer recomputes, so
    the sampler/trainer ratio is exactly 1 on-policy. The price, with top_k/top_p on: the token
    was really drawn with probability p / kept_mass, not p, so the ratio hides the truncation
    (tokens outside the kept set are never seen, the kept ones are over-represented by
    1 / kept_mass) and the policy gradient is biased. Leave them off for RL.

    Args:
        prompts: token ids [P][T_p], each non-empty (start with bos where the model expects one).
        eos_token_id: ends a sequence unless `params.stop == []`; None: no eos.
        pad_token_id: any valid id; padded positions are masked out.
        generator: used when `params.seed` is None: one integer drawn from it per call is the
            base seed of the call's streams; any device.
        tokenizer: decodes completions for stop strings; required only when they are given.
        use_cache: False recomputes the whole prefix every step (the reference path for tests
            and the benchmark; same tokens, much slower).
        drop_finished: drop finished rows from the batch (True) or keep computing them masked.
        stream_ids: one per prompt, each in [0, 2^64); None: 0 .. P-1. Sample g of prompt i
            draws its step-t token with `stream_uniforms(base seed, stream_ids[i], g, t)`, so
            prompts with equal stream ids (and the same base seed) get the same uniforms.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    stop_ids, stop_strings = _resolve_stops(params.stop, eos_token_id)
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode completions")
    streams = check_stream_ids(stream_ids, len(prompts))
    device = _device(model)
    config = _config(model)
    base_seed = params.seed if params.seed is not None else _draw_seed(generator)

    prompt_len = max(len(p) for p in prompts)
    max_position = int(getattr(config, "max_position_embeddings", 0) or 0)
    max_tokens = params.max_tokens
    if max_tokens is None:
        if max_position <= prompt_len:
            raise ValueError("max_tokens=None needs config.max_position_embeddings > prompt length")
        max_tokens = max_position - prompt_len

    B = len(prompts) * num_samples  # row b is sample b % G of prompt b // G
    tokens_B: list[list[int]] = [[] for _ in range(B)]
    logprobs_B: list[list[float]] = [[] for _ in range(B)]
    reasons_B: list[Literal["stop", "length"]] = ["length"] * B
    live_list = list(range(B))  # batch position -> row b, for the rows still running
    finished = [False] * B
    max_stop_chars = max((len(s) for s in stop_strings), default=0)
    rows = torch.arange(B)
    uniforms = _Uniforms(base_seed, streams, num_samples, max_tokens, params.temperature != 0)

    with torch.inference_mode():
        cache = DynamicCache(config=config) if use_cache else None
        # Prefill each prompt once, then repeat its cache rows for the G samples.
        input_ids, attention_mask = _left_pad(prompts, pad_token_id, device)  # [P, T]
        logits = _forward_last(model, input_ids, attention_mask, cache)  # [P, V]
        logits = logits.repeat_interleave(num_samples, dim=0)  # [B, V]
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)  # [B, T]
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        if cache is not None and num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
        for step in range(max_tokens):
            u_live = uniforms.at(step)[rows].to(logits.device)  # each row its own stream
            next_tokens, next_logprobs = _choose(logits, params, u_live)
            tok_list, lp_list = next_tokens.tolist(), next_logprobs.tolist()
            keep: list[int] = []
            for i, row in enumerate(live_list):
                if finished[row]:  # only when drop_finished=False: a masked passenger
                    continue
                tokens_B[row].append(tok_list[i])
                logprobs_B[row].append(lp_list[i])
                if tok_list[i] in stop_ids or (
                    stop_strings
                    and _ends_with_stop(tokenizer, tokens_B[row], stop_strings, max_stop_chars)
                ):
                    finished[row] = True
                    reasons_B[row] = "stop"
                else:
                    keep.append(i)
            if not keep or step == max_tokens - 1:
                break
            if drop_finished and len(keep) < len(live_list):
                keep_t = torch.tensor(keep, device=device)
                next_tokens = next_tokens[keep_t]
                live_list = [live_list[i] for i in keep]
                rows = torch.tensor(live_list)
                attention_mask, input_ids = attention_mask[keep_t], input_ids[keep_t]
                if cache is not None:
                    cache.batch_select_indices(keep_t)
            ones = attention_mask.new_ones(len(live_list), 1)
            attention_mask = torch.cat([attention_mask, ones], dim=1)
            if cache is not None:
                logits = _forward_last(model, next_tokens[:, None], attention_mask, cache)
            else:
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
                logits = _forward_last(model, input_ids, attention_mask, None)

    seqs_B = [
        SampledSequence(tokens=t, logprobs=lp, stop_reason=r)
        for t, lp, r in zip(tokens_B, logprobs_B, reasons_B, strict=True)
    ]
    return [seqs_B[p * num_samples : (p + 1) * num_samples] for p in range(len(prompts))]


def compute_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], *, temperature: float = 1.0
) -> list[list[float]]:
    """Teacher-forced logprobs of tokens 1..n of each sequence: out[i][t] = logprob of token t+1.

    log softmax(logits / temperature) in float32; temperature 0 is read as 1 (as in `sample`'s
    greedy mode). The first token has no logprob and is omitted, so out[i] has len(seq) - 1
    entries; Tinker returns a leading None there instead. Shapes: [N][T_i] -> [N][T_i - 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not sequences:
        return []
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence needs at least one token")
    scale = 1.0 if temperature == 0 else temperature
    # Left padding as in `sample`: one code path for masks and positions.
    input_ids, attention_mask = _left_pad(sequences, 0, _device(model))  # [N, T]
    with torch.inference_mode():
        logits = _forward(model, input_ids, attention_mask, None, logits_to_keep=0)  # [N, T, V]
        logprobs = torch.log_softmax(logits[:, :-1].float() / scale, dim=-1)
        target = torch.gather(logprobs, 2, input_ids[:, 1:, None]).squeeze(2)  # [N, T-1]
    T = input_ids.shape[1]
    return [target[i, T - len(s) :].tolist() for i, s in enumerate(sequences)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _config(model: torch.nn.Module) -> PretrainedConfig:
    """The HF config; peft wrappers forward `.config` to the wrapped model."""
    return cast(PretrainedConfig, model.config)


def _resolve_stops(
    stop: str | list[str] | list[int] | None, eos_token_id: int | None
) -> tuple[set[int], list[str]]:
    if stop is None:
        return ({eos_token_id} if eos_token_id is not None else set()), []
    if isinstance(stop, str):
        stop = [stop]
    if not stop:
        return set(), []
    ids = {s for s in stop if isinstance(s, int)}
    strings = [s for s in stop if isinstance(s, str)]
    if eos_token_id is not None:
        ids.add(eos_token_id)
    return ids, strings


def _ends_with_stop(
    tokenizer: PreTrainedTokenizerBase | None,
    tokens: list[int],
    stop_strings: list[str],
    max_stop_chars: int,
) -> bool:
    """Whether the newest token completed a stop string.

    Only the tail is decoded: an occurrence that ends in the newest token spans at most
    max_stop_chars characters, hence at most that many tokens plus a few that decode to no
    character of their own (partial UTF-8 bytes). Earlier occurrences would have stopped earlier.
    """
    assert tokenizer is not None
    text = tokenizer.decode(tokens[-(max_stop_chars + 4) :], skip_special_tokens=False)
    return any(s in text for s in stop_strings)


def _left_pad(
    rows: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Left-pad to [B, T] input ids and a [B, T] long attention mask (1 = real token)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _forward(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    cache: DynamicCache | None,
    *,
    logits_to_keep: int,
) -> Tensor:
    """Logits [B, T_new, V] for `input_ids` [B, T_new], the last positions of `attention_mask`."""
    # Positions count real tokens only, so a left-padded row sees the positions it would unpadded.
    # Pad positions get position 0; they are masked and never attended to.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        logits_to_keep=logits_to_keep,
        **{_cache_keyword(model): cache},
    )
    return cast(Tensor, out.logits)


_CACHE_KEYWORD: dict[type, str] = {}


def _cache_keyword_of(cls: type[torch.nn.Module]) -> str:
    if cls not in _CACHE_KEYWORD:
        takes = inspect.signature(cls.forward).parameters
        _CACHE_KEYWORD[cls] = "cache" if "cache" in takes else "past_key_values"
    return _CACHE_KEYWORD[cls]


def _cache_keyword(model: torch.nn.Module) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.2x deprecates
    `past_key_values` with a warning per call), else `past_key_values`. A PEFT wrapper forwards
    keywords to its base model, so the base model's signature decides."""
    get_base = getattr(model, "get_base_model", None)
    base: torch.nn.Module = get_base() if callable(get_base) else model
    return _cache_keyword_of(type(base))


def _forward_last(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, cache: DynamicCache | None
) -> Tensor:
    """Float32 logits [B, V] at the last position."""
    return _forward(model, input_ids, attention_mask, cache, logits_to_keep=1)[:, -1].float()


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_UNIFORM_CHUNK = 256  # steps per table: one table per call unless max_tokens exceeds it


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Stafford's "Mix13"), elementwise on uint64, mod 2^64:
    z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31.
    A bijection of [0, 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def stream_uniforms(
    seed: int, stream_ids: Sequence[int], num_samples: int, steps: range
) -> np.ndarray:
    """Uniforms in [0, 1) for rows b = i·G + g (prompt i, sample g) and steps t: [P·G, len(steps)]
    float64, each a function of (seed, stream_ids[i], g, t) alone.

    A counter-based use of SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number
    generators", OOPSLA 2014): the c-th output of a SplitMix64 generator whose state is x is
    child(x, c) = mix64(x + (c + 1)·γ mod 2^64), γ = 0x9E3779B97F4A7C15; every key level splits
    the generator of the level above:

        x = child(child(child(child(seed mod 2^64, 0), stream), g), t)
        u = (x >> 11) · 2^-53                          (the top 53 bits: a float64 in [0, 1))

    Why not one torch.Generator per row: creating and seeding B generators is a Python loop,
    ~5 ms for 512 rows per call, while this is a few numpy passes over the [P·G, T] table,
    ~0.12 ms for 512 × 16 (both measured on a shared 2-core CPU machine). Numpy's uint64
    arithmetic wraps mod 2^64, as the formula needs.
    """
    streams = np.asarray(stream_ids, dtype=np.uint64)  # [P]
    g = np.arange(num_samples, dtype=np.uint64)  # [G]
    t = np.arange(steps.start, steps.stop, dtype=np.uint64)  # [T]
    with np.errstate(over="ignore"):
        x0 = _mix64(np.array([seed % 2**64], dtype=np.uint64) + _GAMMA)  # [1]
        x1 = _mix64(x0 + (streams + np.uint64(1)) * _GAMMA)  # [P]
        x2 = _mix64(x1[:, None] + (g + np.uint64(1))[None, :] * _GAMMA).reshape(-1)  # [P·G]
        x3 = _mix64(x2[:, None] + (t + np.uint64(1))[None, :] * _GAMMA)  # [P·G, T]
    return (x3 >> np.uint64(11)).astype(np.float64) * 2.0**-53


class _Uniforms:
    """`stream_uniforms` of one `sample` call, one [B, chunk] table per `_UNIFORM_CHUNK` steps
    (computed when first needed; greedy needs none)."""

    def __init__(
        self, seed: int, streams: list[int], num_samples: int, max_tokens: int, needed: bool
    ) -> None:
        self.seed, self.streams, self.num_samples = seed, streams, num_samples
        self.max_tokens, self.needed = max_tokens, needed
        self.start, self.table = 0, torch.zeros(len(streams) * num_samples, 0, dtype=torch.float64)

    def at(self, step: int) -> Tensor:
        """Step `step`'s uniforms of every row, [B] float64 (zeros when not needed)."""
        if not self.needed:
            return torch.zeros(self.table.shape[0], dtype=torch.float64)
        if not self.start <= step < self.start + self.table.shape[1]:
            steps = range(step, min(step + _UNIFORM_CHUNK, self.max_tokens))
            table = stream_uniforms(self.seed, self.streams, self.num_samples, steps)
            self.start, self.table = step, torch.from_numpy(table)
        return self.table[:, step - self.start]


def stream_seed(seed: int, stream_id: int) -> int:
    """A per-stream seed for samplers that take one seed per request (vLLM): `seed` itself for
    stream 0 (the request's own seed), else child(child(seed, 0), stream_id) >> 1 in
    `stream_uniforms`' notation, an integer in [0, 2^63)."""
    if stream_id == 0:
        return seed
    with np.errstate(over="ignore"):
        x0 = _mix64(np.array([seed % 2**64], dtype=np.uint64) + _GAMMA)
        x1 = _mix64(x0 + np.uint64((stream_id + 1) % 2**64) * _GAMMA)
    return int(x1[0] >> np.uint64(1))


def check_stream_ids(stream_ids: Sequence[int] | None, num_prompts: int) -> list[int]:
    """The validated stream ids: one integer in [0, 2^64) per prompt; None: 0 .. P-1."""
    if stream_ids is None:
        return list(range(num_prompts))
    ids = list(stream_ids)
    if len(ids) != num_prompts:
        raise ValueError(
            f"stream_ids has {len(ids)} entries for {num_prompts} prompts: need one each"
        )
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"stream_ids[{i}] must be an integer, got {value!r}")
        if not 0 <= int(value) < 2**64:
            raise ValueError(f"stream_ids[{i}]={value} must be in [0, 2^64)")
    return [int(v) for v in ids]


def _draw_seed(generator: torch.Generator | None) -> int:
    """One base seed from `generator` (torch's global CPU generator when None)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _choose(logits: Tensor, params: SamplingParams, u: Tensor) -> tuple[Tensor, Tensor]:
    """Next tokens [B] and their logprobs [B] from float32 logits [B, V] and uniforms u [B]
    (unused when greedy)."""
    if params.temperature == 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logprobs.argmax(dim=-1)
    else:
        scaled = logits / params.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(_truncate(scaled, params.top_k, params.top_p), dim=-1)
        tokens = _draw(probs, u)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _draw(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row of probs [B, V] by inverse CDF, from the rows' uniforms u [B] in [0, 1).

    u is computed on the CPU (`stream_uniforms`), so one seed gives the same draws on every
    device. In float32 it is clamped below 1 (a float64 u within 2^-25 of 1 would round to 1).
    """
    u = u.to(probs.dtype).clamp_(max=1.0 - torch.finfo(probs.dtype).eps / 2)
    cdf = probs.cumsum(dim=-1)  # [B, V]
    x = (u * cdf[:, -1])[:, None]
    # right=True: the first index with cdf > x, so zero-probability tokens are never picked.
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    # Float rounding can put x at or past cdf[-1] (odds ~1e-7); fall back to the mode there.
    picked = probs.gather(1, tokens[:, None]).squeeze(1)
    return torch.where(picked > 0, tokens, probs.argmax(dim=-1))


def _truncate(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top_k / top_p set to -inf; [B, V] -> [B, V]."""
    if top_k != -1 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled
