"""Throughput and final accuracy: the synchronous loop vs the async lag-1 loop, same seed budget.

Both runs use one recipe (`arithmetic_cispo_async` by default: same model, data stream,
rollout batches, optimizer steps and evaluations); the synchronous run turns `asynchronous.enabled`
off. Cores: the synchronous trainer gets every thread (`--sync-threads`, default 2), the async run
one thread for the trainer and one for the sampler worker (the recipe's split). The supervised warm
start runs once (with the synchronous run's threads) and both runs resume from its checkpoint, so
they start from the same weights.

Two throughputs: "RL steps/s" over the whole RL phase (from the "before RL" evaluation to the end:
the worker's start-up, periodic evaluations and checkpoints included) and "steady" over steps 2..N
(the sum of their `time/step`). On a shared machine both depend on the other tenants; the
"CPU-bound estimate" does not: RL steps / max(trainer CPU seconds, worker CPU seconds), the rate if
each process had a core to itself and the overlap were perfect (an upper bound for async; for sync
it is exact only with `--sync-threads=1`, since the CPU time of both threads adds up).

    OMP_NUM_THREADS=1 python benchmarks/async_vs_sync.py                   # the full recipe
    OMP_NUM_THREADS=1 python benchmarks/async_vs_sync.py --quick           # 30 steps × 32 prompts
    OMP_NUM_THREADS=1 python benchmarks/async_vs_sync.py -- --rl.steps=50  # any overrides
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cispo.cli import apply_overrides, load_recipe
from cispo.config import TrainConfig
from cispo.train.loop import train

QUICK = ["--rl.steps=30", "--rl.prompts_per_step=32", "--eval.num_problems=128", "--eval.every=15"]


def run_one(config: TrainConfig, warm: Path) -> dict[str, float]:
    """Train `config` from the warm start in `warm`; seconds, steps/s and accuracies."""
    shutil.copytree(warm / "checkpoints", Path(config.run.dir) / "checkpoints")
    marks: dict[str, float] = {}

    def echo(line: str) -> None:
        if "before RL" in line:
            marks["rl_start"] = time.perf_counter()
            marks["cpu_start"] = _cpu_seconds()

    summary = train(config, resume=True, echo=echo)
    seconds = time.perf_counter() - marks["rl_start"]
    trainer_cpu = _cpu_seconds() - marks["cpu_start"]
    rows = [json.loads(line) for line in (Path(config.run.dir) / "metrics.jsonl").open()]
    steady = [r["time/step"] for r in rows if "time/step" in r and r["step"] >= 2]
    out = {
        "rl_seconds": seconds,
        "steps_per_s": config.rl.steps / seconds,
        "steady_steps_per_s": len(steady) / sum(steady) if steady else float("nan"),
        "trainer_cpu_s": trainer_cpu,
        "worker_cpu_s": rows[-1].get("time/worker_cpu_total", 0.0),
        "accuracy_start": summary.accuracy_start,
        "accuracy_end": summary.accuracy_end,
    }
    for name in ("lag_mean", "lag_max", "discarded", "trainer_wait_s", "generator_wait_s"):
        if hasattr(summary, name):
            out[name] = float(getattr(summary, name))
    return out


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_bound_steps_per_s(result: dict[str, float], steps: int) -> float:
    """Steps/s if each process had an idle core to itself and the overlap were perfect."""
    return steps / max(result["trainer_cpu_s"], result["worker_cpu_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="arithmetic_cispo_async")
    parser.add_argument("--sync-threads", type=int, default=2)
    parser.add_argument(
        "--async-threads", type=int, default=1, help="trainer threads of the async run"
    )
    parser.add_argument("--quick", action="store_true", help="30 RL steps × 32 prompts")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", type=Path, help="copy the two run directories here")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both runs")
    args = parser.parse_args()

    base = load_recipe(args.recipe)
    quick = QUICK if args.quick else []
    base = apply_overrides(base, [*quick, *args.overrides, "--run.tensorboard=false"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = dataclasses.replace(
            base,
            rl=dataclasses.replace(base.rl, steps=0),
            run=dataclasses.replace(base.run, dir=f"{tmp}/warm", threads=args.sync_threads),
            asynchronous=dataclasses.replace(base.asynchronous, enabled=False),
        )
        train(warm, echo=lambda _: None)
        for name, enabled, threads in (
            ("sync", False, args.sync_threads),
            ("async", True, args.async_threads),
        ):
            config = dataclasses.replace(
                base,
                run=dataclasses.replace(base.run, dir=f"{tmp}/{name}", threads=threads),
                asynchronous=dataclasses.replace(base.asynchronous, enabled=enabled),
            )
            results[name] = run_one(config, Path(tmp) / "warm")
            print(name, json.dumps(results[name]), flush=True)
            if args.keep:
                shutil.copytree(config.run.dir, args.keep / name, dirs_exist_ok=True)
    sync, lag1 = results["sync"], results["async"]
    steps = base.rl.steps
    print("\n| run | threads | RL steps/s | steady steps/s | CPU-bound est. | accuracy |")
    print("|---|---|---|---|---|---|")
    for name, threads, r in (
        ("sync", str(args.sync_threads), sync),
        ("async lag 1", f"{args.async_threads} trainer + 1 worker", lag1),
    ):
        r["cpu_bound_steps_per_s"] = cpu_bound_steps_per_s(r, steps)
        print(
            f"| {name} | {threads} | {r['steps_per_s']:.3f} | {r['steady_steps_per_s']:.3f} | "
            f"{r['cpu_bound_steps_per_s']:.3f} | "
            f"{r['accuracy_start']:.1%} → {r['accuracy_end']:.1%} |"
        )
    ratios = {
        key: lag1[key] / sync[key]
        for key in ("steps_per_s", "steady_steps_per_s", "cpu_bound_steps_per_s")
    }
    print(
        f"\nspeed-up: {ratios['steps_per_s']:.2f}× over the RL phase, "
        f"{ratios['steady_steps_per_s']:.2f}× steady state, "
        f"{ratios['cpu_bound_steps_per_s']:.2f}× CPU-bound estimate"
    )
    if args.out:
        args.out.write_text(json.dumps({"results": results, "speedup": ratios}, indent=2))


if __name__ == "__main__":
    main()
