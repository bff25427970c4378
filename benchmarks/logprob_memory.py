"""Peak memory and time of naive vs fused logprobs, forward + backward, on CPU.

Each (shape, method) runs in its own subprocess, so its peak resident memory is clean: the worker
builds the inputs in place (hidden [N, H], weight [V, H], targets [N], upstream gradients), resets
the kernel's peak-RSS counter (VmHWM) and records the RSS as the baseline, runs forward + backward
`--repeats` times and reports the peak RSS minus the baseline ("extra" memory: logits, autograd
buffers and the gradients of hidden and weight, which both methods allocate). Times are the
fastest repeat, wall clock and process CPU time; on a shared machine the CPU time is the steadier
of the two. The loss is Σ g_lp·logprob (+ Σ g_ent·entropy with --entropy), with fixed random g, so
both outputs are differentiated.

    python benchmarks/logprob_memory.py                      # the issue's two shapes (~25 GB naive)
    python benchmarks/logprob_memory.py --shapes 4096x32768x512 --threads 1
    python benchmarks/logprob_memory.py --shapes 2048x151936x1024 --entropy

Not a test: it prints a table and the fused/naive ratios (goal: peak ≤ 0.10, time ≤ 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from rss import reset_peak_rss, status_mb  # benchmarks/rss.py (this script's folder)

DEFAULT_SHAPES = "4096x32768x512,16384x151936x1024"


def _worker(args: argparse.Namespace) -> None:
    """Run one method at one shape; print one JSON line."""
    import torch

    from cispo.ops import fused_logprobs, naive_logprobs

    torch.set_num_threads(args.threads)
    n, v, h = (int(x) for x in args.shape.split("x"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    # Filled in place: a temporary the size of the weight would otherwise sit in the peak.
    hidden = torch.empty(n, h, dtype=dtype).normal_(generator=gen).requires_grad_()
    weight = torch.empty(v, h, dtype=dtype).normal_(std=h**-0.5, generator=gen)
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    g_lp = torch.randn(n, generator=gen)
    g_ent = torch.randn(n, generator=gen)
    reset = reset_peak_rss()
    baseline = (
        status_mb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )

    def step() -> None:
        if args.method == "naive":
            out = naive_logprobs(
                hidden, weight, targets, temperature=args.temperature, with_entropy=args.entropy
            )
        else:
            out = fused_logprobs(
                hidden,
                weight,
                targets,
                temperature=args.temperature,
                chunk_size=args.chunk_size,
                vocab_chunk_size=args.vocab_chunk_size,
                with_entropy=args.entropy,
            )
        loss = (out.logprobs * g_lp).sum()
        if out.entropy is not None:
            loss = loss + (out.entropy * g_ent).sum()
        torch.autograd.backward(loss)
        hidden.grad = weight.grad = None

    wall, cpu = [], []
    for _ in range(args.repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    extra_mb = status_mb("VmHWM") - baseline
    print(
        json.dumps(
            {
                "extra_mb": extra_mb,
                "inputs_mb": baseline,
                "peak_reset": reset,
                "wall_s": min(wall),
                "cpu_s": min(cpu),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxVxH")
    parser.add_argument("--methods", default="naive,fused")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per tile (1024)")
    parser.add_argument(
        "--vocab-chunk-size",
        type=int,
        default=None,
        help="vocab entries per tile (default: budget)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--entropy", action="store_true", help="also differentiate the entropy")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"threads={args.threads}, dtype={args.dtype}, entropy={args.entropy}, "
        f"chunk_size={args.chunk_size}, vocab_chunk_size={args.vocab_chunk_size or 'auto'}, "
        f"repeats={args.repeats}"
    )
    print(f"{'N x V x H':>22} {'method':>6} {'extra MB':>10} {'wall s':>8} {'cpu s':>8}")
    for shape in args.shapes.split(","):
        results = {}
        for method in args.methods.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--method",
                method,
                "--shape",
                shape,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--temperature",
                str(args.temperature),
                "--dtype",
                args.dtype,
            ]
            if args.chunk_size is not None:
                cmd += ["--chunk-size", str(args.chunk_size)]
            if args.vocab_chunk_size is not None:
                cmd += ["--vocab-chunk-size", str(args.vocab_chunk_size)]
            if args.entropy:
                cmd.append("--entropy")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                print(
                    f"{shape:>22} {method:>6} failed (rc={proc.returncode}): "
                    f"{proc.stderr.strip()[-300:]}"
                )
                continue
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            print(
                f"{shape:>22} {method:>6} {r['extra_mb']:>10.0f} {r['wall_s']:>8.2f} "
                f"{r['cpu_s']:>8.2f}"
            )
        if "naive" in results and "fused" in results:
            peak = results["fused"]["extra_mb"] / max(results["naive"]["extra_mb"], 1e-9)
            wall, cpu = (results["fused"][k] / results["naive"][k] for k in ("wall_s", "cpu_s"))
            print(f"{shape:>22} {'ratio':>6} {peak:>10.3f} {wall:>8.2f} {cpu:>8.2f}  (fused/naive)")


if __name__ == "__main__":
    main()
