"""Transformer recipe variants on the demo's latents: flow loss and prompt adherence.

Trains the ``tiny`` transformer recipe once per variant (``--set``-style
overrides) on a precompute folder, samples the 144 canonical shapes captions
from it and scores them with the shapes scorer (`moviegen eval shapes`), so
that training choices are compared on what the demo measures, not on the loss
alone. ``--cfg`` and ``--sample-steps`` may list several values; each
combination is sampled and scored from the same trained model.

Variants train for a fixed number of steps (set ``steps=`` in the variant), so
two processes with ``--threads 1`` side by side compare at equal steps; the
seconds are only meaningful for a process that has the machine to itself. One
set of 144 samples is noisy: two trainings of the same recipe scored 11.8% and
22.9% all correct, so compare variants by differences well above that.

Usage::

    python benchmarks/bench_t2v_recipe.py --latents runs/demo/latents \\
        --variant "b32=steps=700,batch_size=32,lr=2e-3" \\
        --variant "normal-init=steps=700,batch_size=32,lr=2e-3,model.position_init=normal" \\
        [--cfg 7.5 5] [--sample-steps 30 50] [--threads 2] [--out /tmp/t2v_recipe] [--json]

``--variant NAME=KEY=VALUE[,KEY=VALUE...]`` (``NAME=`` for the plain recipe).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_tae_shapes import parse_variant  # same --variant syntax
from moviegen.eval.shapes_score import score_samples
from moviegen.pipeline.demo import DemoConfig, sample_captions
from moviegen.pipeline.sample import TextToVideoPipeline
from moviegen.train.t2v_trainer import T2VTrainer, resolve_t2v_config

ATTRIBUTES = ("colour", "shape", "size", "direction")


def train(latents: Path, run: Path, overrides: list[str], seed: int) -> dict:
    config = resolve_t2v_config(
        "tiny",
        latents=str(latents),
        # No periodic samples: the benchmark samples all 144 captions itself.
        overrides=[f"seed={seed}", "sample_every=1000000", *overrides],
    )
    started = time.perf_counter()
    logs = T2VTrainer(config, run, progress=False).train()
    return {
        "train_s": time.perf_counter() - started,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "flow_loss": logs.get("loss/flow"),
    }


def sample_and_score(run: Path, out: Path, cfg: float, steps: int, seed: int) -> dict:
    pipeline = TextToVideoPipeline.from_checkpoint(run)
    options = DemoConfig().sampling_options(cfg_scale=cfg, steps=steps)
    started = time.perf_counter()
    sample_captions(pipeline, out, seed=seed, options=options, progress=False)
    seconds = time.perf_counter() - started
    score = score_samples(out).to_dict()
    return {
        "cfg": cfg,
        "sample_steps": steps,
        "sample_s": seconds,
        "all_correct": score["all_correct_rate"],
        "accuracy": score["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=Path, default=Path("runs/demo/latents"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,...")
    parser.add_argument("--cfg", type=float, nargs="+", default=[7.5])
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[30])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_t2v_recipe"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.latents / "meta.json").is_file():
        raise SystemExit(f"{args.latents} is not a precompute folder (run `make demo` first)")
    torch.set_num_threads(args.threads)
    results = []
    for name, overrides in [parse_variant(text) for text in args.variant or ["recipe="]]:
        run = args.out / name / "t2v"
        trained = train(args.latents, run, overrides, args.seed)
        for cfg in args.cfg:
            for steps in args.sample_steps:
                samples = args.out / name / f"samples_cfg{cfg}_steps{steps}"
                result = {"variant": name, "overrides": overrides, **trained}
                result.update(sample_and_score(run, samples, cfg, steps, args.seed))
                results.append(result)
    print(f"tiny transformer on {args.latents}, {args.threads} threads, 144 canonical captions")
    print(
        "| variant | overrides | steps x batch | train s | flow loss | CFG | sampling steps "
        "| all correct | colour | shape | size | direction |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        cells = " | ".join(f"{result['accuracy'][key]:.0%}" for key in ATTRIBUTES)
        overrides = ", ".join(result["overrides"]) or "(recipe)"
        print(
            f"| {result['variant']} | {overrides} | {result['steps']} x {result['batch_size']} | "
            f"{result['train_s']:.0f} | {result['flow_loss']:.3f} | {result['cfg']:g} | "
            f"{result['sample_steps']} | {result['all_correct']:.1%} | {cells} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
