"""Launched by test_checkpoint.py: `torchrun --nproc-per-node 2 checkpoint_checks.py OUT_DIR`.

Under 2 ranks: 4 uninterrupted steps against 2 steps + sharded save + load into a fresh engine
(other initial weights) + 2 steps; the HF export; a refused overwrite. Then, with the group gone,
rank 0 loads the 2-rank checkpoint into a single-process engine (a different world size) and
finishes the run there. Rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import cispo.distributed
from cispo.engine import Engine
from cispo.engine.sharded_state import (
    export_engine_hf,
    load_sharded_engine_state,
    save_sharded_engine_state,
)
from cispo.types import AdamParams
from tests.distributed.common import full_weights, max_diff, random_datums, tiny_engine

STEPS = 4
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.1)
CFG = {"reduction": "token_mean", "anchor": "old"}


def step(engine: Engine, index: int, *, share: bool = True) -> None:
    batch = random_datums(6, seed=20 + index)
    engine.forward_backward(cispo.distributed.rank_share(batch) if share else batch, "cispo", CFG)
    engine.optim_step(ADAM)


def flat(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors and numbers of a nested state dict, by dotted path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out |= flat(value, f"{prefix}{i}.")
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree.detach().clone()
    elif isinstance(tree, (int, float)):
        out[prefix] = torch.tensor(float(tree))
    return out


def full_optimizer(engine: Engine) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return flat(get_optimizer_state_dict(engine.model, engine.optimizer, options=options))


def bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def draws(engine: Engine) -> list[float]:
    return [*torch.rand(2).tolist(), *torch.rand(2, generator=engine.sample_generator).tolist()]


def main(out_dir: Path) -> None:
    cispo.distributed.init_from_env()
    rank = cispo.distributed.current_rank()
    torch.manual_seed(100 + rank)  # each rank's RNG differs, so a mixed-up restore would show
    results: dict[str, Any] = {}

    whole = tiny_engine("llama")
    start = full_weights(whole)
    for i in range(STEPS):
        step(whole, i)
    whole_weights, whole_optim = full_weights(whole), full_optimizer(whole)

    first = tiny_engine("llama")
    for i in range(STEPS // 2):
        step(first, i)
    half_weights = full_weights(first)
    ckpt = out_dir / "half"
    save_sharded_engine_state(first, ckpt, {"step": STEPS // 2})
    saved_draws = draws(first)
    try:
        save_sharded_engine_state(first, ckpt, {"step": STEPS // 2})
        refused = False
    except FileExistsError:
        refused = True

    resumed = tiny_engine("llama", seed=1)  # other initial weights: the load must replace them
    fresh_diff = max_diff(full_weights(resumed), half_weights)
    loaded = load_sharded_engine_state(resumed, ckpt)
    loaded_draws = draws(resumed)
    for i in range(STEPS // 2, STEPS):
        step(resumed, i)
    resumed_weights, resumed_optim = full_weights(resumed), full_optimizer(resumed)
    export = export_engine_hf(resumed, out_dir / "hf")
    every_rank_draws = cispo.distributed.gather_objects(saved_draws)
    refusals = cispo.distributed.gather_objects(refused)
    rng_back = cispo.distributed.gather_objects(loaded.rng_restored and loaded_draws == saved_draws)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        assert export is not None
        hf = AutoModelForCausalLM.from_pretrained(export)
        hf_state = {k: v.detach() for k, v in hf.state_dict().items()}
        results.update(
            moved=max_diff(whole_weights, start),
            fresh_engine_differed=fresh_diff,
            resume_weights_bitwise=bitwise(resumed_weights, whole_weights),
            resume_optimizer_bitwise=bitwise(resumed_optim, whole_optim),
            resume_weight_diff=max_diff(resumed_weights, whole_weights),
            optimizer_entries=len(whole_optim),
            optimizer_steps=float(max(v for k, v in whole_optim.items() if k.endswith("step."))),
            version=resumed.version,
            trainer_state=loaded.trainer_state,
            rng_restored_on_every_rank=all(rng_back),
            ranks_rng_differ=every_rank_draws[0] != every_rank_draws[1],
            overwrite_refused_on_every_rank=all(refusals),
            hf_files=sorted(p.name for p in export.iterdir()),
            hf_tied=bool(hf.config.tie_word_embeddings)
            and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(),
            hf_exact=bitwise(hf_state, resumed_weights),
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

    if rank == 0:  # a different world size: the 2-rank checkpoint in one plain process
        assert not cispo.distributed.active()
        single = tiny_engine("llama", seed=1)
        loaded = load_sharded_engine_state(single, ckpt)
        reshard_exact = bitwise(full_weights(single), half_weights)
        for i in range(STEPS // 2, STEPS):
            step(single, i, share=False)
        results.update(
            reshard_saved_world_size=loaded.saved_world_size,
            reshard_rng_restored=loaded.rng_restored,
            reshard_load_bitwise=reshard_exact,
            reshard_continue_diff=max_diff(full_weights(single), whole_weights),
        )
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
