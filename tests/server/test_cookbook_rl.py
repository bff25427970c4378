"""tinker-cookbook's own RL trainer (`tinker_cookbook.rl.train.main`) against our server.

The arithmetic environment (`ArithmeticDatasetBuilder`, renderer `role_colon`) trains a tiny
model from a local directory, warm-started to partial accuracy (see cookbook_warm_start.py), with
loss_fn "cispo" for a few steps; the cookbook's metrics.jsonl must show the reward rising and the
sampler-vs-trainer KL (`optim/kl_sample_train_v1`, computed by the cookbook from our sampled
logprobs and our forward_backward logprobs) at ~0 on every step.

Needs tinker-cookbook 0.6.1 (installed with --no-deps; one of its dependencies is not on this
index) plus chz, termcolor, blobfile and datasets; skipped without them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook")
for _dep in ("chz", "termcolor", "blobfile", "datasets"):
    pytest.importorskip(_dep)

from cookbook_warm_start import MAX_TOKENS, RENDERER, build_warm_model  # noqa: E402
from server_harness import start_server  # noqa: E402

STEPS = 40
GROUPS_PER_STEP = 32
GROUP_SIZE = 8
LEARNING_RATE = 1e-4
FIRST, LAST = slice(0, 8), slice(-8, None)
MIN_GAIN = 0.05
"""Mean reward of the last 8 steps minus the first 8 (each mean has a standard error of ~0.02 here):
a model that does not learn fails this."""


def _run_cookbook(base_url: str, model_dir: Path, log_path: Path) -> None:
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl import train

    config = train.Config(
        learning_rate=LEARNING_RATE,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=GROUPS_PER_STEP,
            model_name_for_tokenizer=str(model_dir),
            renderer_name=RENDERER,
            n_batches=STEPS,
            group_size=GROUP_SIZE,
            include_fewshot=False,
        ),
        model_name=str(model_dir),
        recipe_name="cispo_server_test",
        renderer_name=RENDERER,
        max_tokens=MAX_TOKENS,
        log_path=str(log_path),
        loss_fn="cispo",
        lora_rank=8,  # the server runs with full fine-tuning and ignores it
        eval_every=0,
        save_every=0,
        num_groups_to_log=0,
        rollout_json_export=False,
        base_url=base_url,
    )
    asyncio.run(train.main(config))


# 85-145 s on 2 shared CPU cores, most of it the supervised warm start (350-450 steps of a
# 0.5M-parameter model): over the ~2 minute budget for the default run.
@pytest.mark.slow
def test_cookbook_rl_improves_reward_with_zero_sampler_trainer_kl(tmp_path: Path) -> None:
    started = time.time()
    model_dir = tmp_path / "model"
    warm = build_warm_model(model_dir)
    warm_s = time.time() - started
    # Partial knowledge: greedy is right often, a temperature-1 sample less often.
    assert 0.2 <= warm.greedy_accuracy <= 0.7, warm

    live = start_server(tmp_path / "server", base_models=(str(model_dir),), full_finetune=True)
    try:
        _run_cookbook(live.base_url, model_dir, tmp_path / "log")
    finally:
        live.stop()

    lines = (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line]
    rows = [r for r in rows if "env/all/reward/total" in r]
    assert len(rows) == STEPS, [sorted(r) for r in rows]
    rewards = [r["env/all/reward/total"] for r in rows]
    kls = [r["optim/kl_sample_train_v1"] for r in rows]
    first = sum(rewards[FIRST]) / len(rewards[FIRST])
    last = sum(rewards[LAST]) / len(rewards[LAST])
    report = (
        f"warm start: {warm.steps} steps, greedy {warm.greedy_accuracy:.2f}, "
        f"sampled {warm.sampled_accuracy:.2f}, {warm_s:.0f}s; "
        f"rewards {[round(r, 3) for r in rewards]}; kl_v1 {[f'{k:.1e}' for k in kls]}; "
        f"total {time.time() - started:.0f}s"
    )
    print(report)
    assert all(abs(k) < 1e-3 for k in kls), report
    assert last - first > MIN_GAIN, report
