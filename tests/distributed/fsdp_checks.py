"""Launched by test_fsdp_engine.py: `torchrun --nproc-per-node 2 fsdp_checks.py OUT.json [W.pt]`.

Rank 0 first trains single-process references (no process group yet: the engine's plain path,
padded rows and for-loop AdamW), then every rank joins the group and trains the same steps on its
share of each batch with the engine's defaults (shared-prefix packing through the FSDP root, fused
AdamW on DTensor parameters), or padded rows in the "padded" case. The batches are groups of
datums that share a prompt, and one group is split over the two ranks. Rank 0 writes the
differences to OUT.json; the test reads them and applies the tolerances. With W.pt, rank 0 also
saves the final weights of every case there (the two-node test compares them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import cispo.distributed
import cispo.distributed.fsdp
import cispo.ops.packed_logprobs
from cispo.datums import rl_datum
from cispo.engine import Engine, EngineConfig
from cispo.models import load_bundle
from cispo.types import AdamParams
from tests.distributed.common import VOCAB, full_weights, max_diff, tiny_engine

STEPS = 3
LR = 1e-3
BATCH = 7  # 4 datums on rank 0, 3 on rank 1: unequal token counts (GROUPS sums to it)
MICRO = 3  # rank 0 runs 2 micro-batches, rank 1 one real + one padding micro-batch
LORA_OVERRIDES = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}
CASES = [  # (family, tied head, reduction, grad clip, sharded engine's config)
    ("llama", True, "token_mean", 0.0, {}),
    ("llama", True, "seq_mean_token_mean", 0.0, {}),
    ("qwen2", False, "token_mean", 0.5, {}),
    ("qwen2", False, "seq_mean_token_sum", 0.0, {}),
    ("llama", True, "padded", 0.0, {"shared_prefix": False, "adamw_impl": "for-loop"}),
]
REFERENCE = {"shared_prefix": False, "adamw_impl": "for-loop"}  # the single-process reference
GROUPS = (3, 2, 2)  # datums per prompt; rank 0 gets the first 4 (the group of 2 is split)
assert sum(GROUPS) == BATCH


def batches() -> list[list[Any]]:
    """Per step, RL datums whose prompts repeat in consecutive groups of `GROUPS`, with mixed
    prompt and completion lengths (so the ranks' shares differ in token counts)."""
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(10 + step)
        datums = []
        for k, size in enumerate(GROUPS):
            prompt = torch.randint(4, VOCAB, (2 + (k + step) % 3,), generator=g).tolist()
            for i in range(size):
                n = 1 + (i * 5 + k + step) % 6
                completion = torch.randint(4, VOCAB, (n,), generator=g).tolist()
                sampler = (-torch.rand(n, generator=g) * 3 - 0.5).tolist()
                advantage = float(torch.randn((), generator=g))
                datum = rl_datum(prompt, completion, sampler, advantage, old_logprobs=sampler)
                datums.append(datum)
        out.append(datums)
    return out


PACKED_GROUPS: list[int] = []  # the largest group each packed forward through the FSDP root ran


def _recording(real: Any) -> Any:
    def packed(*args: Any, group_sizes: list[int], **kwargs: Any) -> Any:
        PACKED_GROUPS.append(max(group_sizes))
        return real(*args, group_sizes=group_sizes, **kwargs)

    return packed


def train(
    engine: Engine, reduction: str, clip: float, share: bool
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """STEPS AdamW steps on the whole batch, or on this rank's share of it: (metrics of each
    step, the full gradient of the first step)."""
    cfg = {"reduction": reduction, "anchor": "old"}
    adam = AdamParams(learning_rate=LR, grad_clip_norm=clip)
    history = []
    first: dict[str, torch.Tensor] = {}
    for batch in batches():
        datums = cispo.distributed.rank_share(batch) if share else batch
        out = engine.forward_backward(datums, "cispo", cfg)
        first = first or grads_full(engine)
        history.append({**out.metrics, **engine.optim_step(adam)})
    return history, first


def loss_reduction(case: str) -> str:
    return "token_mean" if case == "padded" else case


def grads_full(engine: Engine) -> dict[str, torch.Tensor]:
    return {
        n: cispo.distributed.full_value(p.grad).detach().clone()
        for n, p in engine.model.named_parameters()
        if p.grad is not None
    }


def metric_diffs(ref: list[dict[str, float]], got: list[dict[str, float]]) -> dict[str, float]:
    """Largest relative difference per metric key over the steps (keys of the reference)."""
    out: dict[str, float] = {}
    for r, g in zip(ref, got, strict=True):
        for key, value in r.items():
            if key not in g:
                out[key] = float("inf")
                continue
            scale = max(abs(value), 1e-6)
            out[key] = max(out.get(key, 0.0), abs(g[key] - value) / scale)
    return out


def lora_engine(seed: int = 0) -> Engine:
    """The "tiny" bundle (hidden 32, 2 layers) with LoRA rank 4 on every linear layer."""
    bundle = load_bundle("tiny", lora_rank=4, seed=seed, overrides=LORA_OVERRIDES)
    return Engine(
        bundle.model, eos_token_id=None, pad_token_id=0, config=EngineConfig(micro_batch_size=MICRO)
    )


def lora_checks(rank: int, refs: dict[str, Any], results: dict[str, Any], tmp: Path) -> None:
    """LoRA (peft) under FSDP2: training against one process, the frozen base, a DCP round trip
    of adapter-only optimizer state, and both exports loaded back with peft."""
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    from cispo.engine.sharded_state import (
        export_engine_hf,
        load_sharded_engine_state,
        save_sharded_engine_state,
    )
    from cispo.export import export_checkpoint

    engine = lora_engine()
    sharded = any(type(p).__name__ == "DTensor" for p in engine.model.parameters())
    trainable = sum(p.requires_grad for p in engine.model.parameters())
    train(engine, "token_mean", 0.0, share=True)
    weights = full_weights(engine)
    checkpoint = tmp / "lora_checkpoint"
    state = {"base_model": "tiny", "model_overrides": LORA_OVERRIDES}
    save_sharded_engine_state(engine, checkpoint, state)
    other = lora_engine(seed=1)  # other base and adapter weights, no optimizer state
    load_sharded_engine_state(other, checkpoint)
    loaded = full_weights(other)  # a collective: not inside the rank-0 branch below
    options = StateDictOptions(full_state_dict=True)
    optim = [
        get_optimizer_state_dict(e.model, e.optimizer, options=options)["state"]
        for e in (engine, other)
    ]
    optim_diff = max(
        float((optim[0][k][key] - optim[1][k][key]).abs().max())
        for k in optim[0]
        for key in ("exp_avg", "exp_avg_sq")
    )
    export_engine_hf(engine, tmp / "lora_adapter")
    if rank != 0:
        return
    start, final = refs["lora"]
    lora = [k for k in start if ".lora_" in k]
    base = [k for k in start if ".lora_" not in k]

    def peft_diff(base_model: torch.nn.Module, adapter: Path) -> float | str:
        """max |Δ| between the weights peft loads and the sharded run's, or why it failed."""
        try:
            state = PeftModel.from_pretrained(base_model, str(adapter)).state_dict()
        except Exception as error:  # the test reports it
            return f"{type(error).__name__}: {error}"
        return max_diff(dict(state), weights)

    fresh_base = load_bundle("tiny", seed=0, overrides=LORA_OVERRIDES).model
    exported = export_checkpoint(checkpoint, tmp / "lora_export")
    assert exported.base_dir is not None and exported.adapter_dir is not None
    results["lora"] = {
        "sharded": sharded,
        "trainable": trainable,
        "optimizer_entries": [len(o) for o in optim],
        "weight_diff": max_diff(weights, final),
        "adapters_moved": max(float((weights[k] - start[k]).abs().max()) for k in lora),
        "base_moved": max(float((weights[k] - start[k]).abs().max()) for k in base),
        "dcp_weight_diff": max_diff(loaded, weights),
        "dcp_optimizer_diff": optim_diff,
        "engine_export_diff": peft_diff(fresh_base, tmp / "lora_adapter"),
        "cli_export_diff": peft_diff(
            AutoModelForCausalLM.from_pretrained(exported.base_dir), exported.adapter_dir
        ),
    }


def main(out_path: Path, weights_path: Path | None) -> None:
    import os

    rank = int(os.environ["RANK"])
    refs: dict[str, Any] = {}
    if rank == 0:  # single-process references, before any process group exists
        engine = lora_engine()
        start = full_weights(engine)
        train(engine, "token_mean", 0.0, share=False)
        refs["lora"] = (start, full_weights(engine))
        for family, tied, reduction, clip, _ in CASES:
            engine = tiny_engine(family, tied=tied, micro_batch_size=MICRO, **REFERENCE)
            start = full_weights(engine)
            history, grads = train(engine, loss_reduction(reduction), clip, share=False)
            refs[f"{family}/{reduction}"] = (start, full_weights(engine), history, grads)
        ref = tiny_engine("llama", micro_batch_size=MICRO, fused_logprobs=False, **REFERENCE)
        batch = batches()[0]
        out = ref.forward_backward(batch, "cispo", {"reduction": "token_mean", "anchor": "old"})
        refs["fused"] = ([o["logprobs"].to_torch() for o in out.loss_fn_outputs], grads_full(ref))

    info = cispo.distributed.init_from_env()
    assert info.world_size == 2 and cispo.distributed.active()
    results: dict[str, Any] = {"backend": info.backend, "cases": {}}
    finals: dict[str, dict[str, torch.Tensor]] = {}

    # The FSDP root's forward reaches the packed path through `cispo.ops.packed_logprobs`'s
    # `token_logprobs`, which looks this name up in its module.
    cispo.ops.packed_logprobs.packed_token_logprobs = _recording(
        cispo.ops.packed_logprobs.packed_token_logprobs
    )
    for family, tied, reduction, clip, config in CASES:
        engine = tiny_engine(family, tied=tied, micro_batch_size=MICRO, **config)
        sharded = any(type(p).__name__ == "DTensor" for p in engine.model.parameters())
        PACKED_GROUPS.clear()
        history, grads = train(engine, loss_reduction(reduction), clip, share=True)
        largest_packed = cispo.distributed.gather_objects(max(PACKED_GROUPS, default=0))
        weights = full_weights(engine)
        local_tokens = [
            sum(
                float(d.loss_fn_inputs["mask"].to_torch().sum())
                for d in cispo.distributed.rank_share(b)
            )
            for b in batches()
        ]
        tokens = cispo.distributed.gather_objects(local_tokens)
        finals[f"{family}/{reduction}"] = weights
        if rank == 0:
            start, final, ref_history, ref_grads = refs[f"{family}/{reduction}"]
            results["cases"][f"{family}/{reduction}"] = {
                "sharded": sharded,
                "packed_largest_group": largest_packed,
                "adamw_fused": bool(engine.optimizer.param_groups[0]["fused"]),
                "moved": max_diff(final, start),
                "weight_diff": max_diff(weights, final),
                "grad_diff": max_diff(grads, ref_grads),
                "grad_scale": max(float(g.abs().max()) for g in ref_grads.values()),
                "metric_diffs": metric_diffs(ref_history, history),
                "tokens_per_rank": tokens,
            }

    # The per-rank-mean mistake: each rank normalises by its own token count (the totals are not
    # summed over the ranks), then FSDP averages. The same run must land far from the reference.
    real = cispo.distributed.all_reduce_totals

    def local_totals(tokens: float, sequences: float, micro: int) -> tuple[float, float, int]:
        _, _, steps = real(tokens, sequences, micro)
        return tokens * cispo.distributed.current_world_size() / 2, sequences, steps

    cispo.distributed.all_reduce_totals = local_totals  # type: ignore[assignment]
    try:
        engine = tiny_engine("llama", micro_batch_size=MICRO)
        train(engine, "token_mean", 0.0, share=True)
        weights = full_weights(engine)
    finally:
        cispo.distributed.all_reduce_totals = real  # type: ignore[assignment]
    if rank == 0:
        results["per_rank_mean_weight_diff"] = max_diff(weights, refs["llama/token_mean"][1])

    # Ranks that built different initial weights (seed = rank) all train rank 0's: shard_model
    # broadcasts rank 0's parameters and buffers before sharding. The engine's sampler template
    # is its copy of the rank's own model taken before sharding (loaded only by `sampler()`).
    engine = tiny_engine("llama", seed=rank)
    assert engine._sampler_template is not None
    seed0 = cispo.distributed.broadcast_object(refs["llama/token_mean"][0] if rank == 0 else None)
    own = engine._sampler_template.state_dict()
    before = max_diff({k: own[k] for k in seed0}, seed0)
    diffs = cispo.distributed.gather_objects((before, max_diff(full_weights(engine), seed0)))
    if rank == 0:
        results["different_seeds"] = {
            "before": [b for b, _ in diffs],
            "after": [a for _, a in diffs],
        }

    lora_checks(rank, refs, results, out_path.parent / f"{out_path.stem}-lora")

    # The fused logprob path through the FSDP root: values and gradients against the naive
    # single-process reference.
    engine = tiny_engine("llama", micro_batch_size=MICRO, fused_logprobs=True)
    batch = batches()[0]
    mine = cispo.distributed.rank_share(batch)
    out = engine.forward_backward(mine, "cispo", {"reduction": "token_mean", "anchor": "old"})
    logprobs = cispo.distributed.gather_objects(
        [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
    )
    grads = grads_full(engine)
    engine.optimizer.zero_grad(set_to_none=True)
    only = engine.forward_backward(mine, "cispo", {"reduction": "token_mean"}, forward_only=True)
    forward_only = cispo.distributed.gather_objects(
        [o["logprobs"].to_torch() for o in only.loss_fn_outputs]
    )
    no_grads = all(p.grad is None for p in engine.model.parameters())
    if rank == 0:
        ref_logprobs, ref_grads = refs["fused"]
        got = [t for part in logprobs for t in part]
        got_forward = [t for part in forward_only for t in part]
        results["fused"] = {
            "logprob_diff": max(
                float((a - b).abs().max()) for a, b in zip(got, ref_logprobs, strict=True)
            ),
            "forward_only_diff": max(
                float((a - b).abs().max()) for a, b in zip(got_forward, ref_logprobs, strict=True)
            ),
            "grad_diff": max_diff(grads, ref_grads),
            "grad_scale": max(float(g.abs().max()) for g in ref_grads.values()),
            "forward_only_left_no_grads": no_grads,
        }
        out_path.write_text(json.dumps(results, indent=1))
        if weights_path is not None:
            torch.save(finals, weights_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
