"""Training steps with glibc's malloc defaults against kept freed memory.

:func:`moviegen.train.allocator.keep_freed_memory` is process-wide and cannot be
undone, so each measurement runs in a fresh subprocess: the demo TAE's training
step (``cpu`` recipe) and the ``tiny`` transformer's, with the trainers' own
call to it switched off ("defaults") or left on ("kept"), alternating, for
``--repeats`` processes each. Reports medians of seconds per step and minor page
faults per step (``getrusage``), after warm-up steps (for the TAE, one epoch, so
its clip cache is full).

Usage::

    python benchmarks/bench_allocator.py --data runs/demo/data/shapes \\
        --latents runs/demo/latents [--repeats 2] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

# Steps before timing, and timed steps, per model.
WARM_STEPS = {"tae": 240, "t2v": 10}
TIMED_STEPS = {"tae": 80, "t2v": 60}

_CHILD = """
import json, resource, sys, time
import torch
import moviegen.train.t2v_trainer as t2v_module
import moviegen.train.tae_trainer as tae_module
model, mode, source, out, threads, warm, timed = sys.argv[1:8]
torch.set_num_threads(int(threads))
if mode == "defaults":
    tae_module.keep_freed_memory = t2v_module.keep_freed_memory = lambda: False
if model == "tae":
    config = tae_module.resolve_config(
        "cpu", train=f"{source}/train.jsonl", overrides=["checkpoint_every=100000", "val_every=100000"]
    )
    trainer = tae_module.TAETrainer(config, out, progress=False)
else:
    config = t2v_module.resolve_t2v_config(
        "tiny", latents=source, overrides=["sample_every=0", "checkpoint_every=100000"]
    )
    trainer = t2v_module.T2VTrainer(config, out, progress=False)
batches = trainer._batches()
def run(steps):
    for _ in range(steps):
        trainer._train_step(batches)
        trainer.step += 1
run(int(warm))
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
run(int(timed))
seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s_per_step": seconds / int(timed),
                  "faults_per_step": (after.ru_minflt - before.ru_minflt) / int(timed)}))
"""


def measure(model: str, mode: str, source: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                model,
                mode,
                source,
                out,
                str(threads),
                str(WARM_STEPS[model]),
                str(TIMED_STEPS[model]),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/demo/data/shapes", help="shapes dataset folder")
    parser.add_argument("--latents", default="runs/demo/latents", help="precompute folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for model, source in (("tae", args.data), ("t2v", args.latents)):
        runs: dict[str, list[dict]] = {"defaults": [], "kept": []}
        for _ in range(args.repeats):
            for mode in runs:  # alternate, so a slow stretch of the machine hits both
                runs[mode].append(measure(model, mode, source, args.threads))
        results[model] = {
            mode: {key: statistics.median(r[key] for r in values) for key in values[0]}
            for mode, values in runs.items()
        }
    print(f"{args.threads} threads, medians of {args.repeats} processes each")
    print("| step | defaults s | kept s | defaults / kept | faults per step (defaults -> kept) |")
    print("|---|---:|---:|---:|---|")
    for model, name in (("tae", "demo TAE (`cpu`)"), ("t2v", "`tiny` transformer")):
        d, k = results[model]["defaults"], results[model]["kept"]
        print(
            f"| {name} | {d['s_per_step']:.3f} | {k['s_per_step']:.3f} | "
            f"{d['s_per_step'] / k['s_per_step']:.2f}x | "
            f"{d['faults_per_step']:.0f} -> {k['faults_per_step']:.0f} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
