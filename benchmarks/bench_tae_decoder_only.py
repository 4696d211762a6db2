"""Decoder-only TAE steps after the fact: prompt adherence of one fixed transformer.

A text-to-video run was trained on the latents of one TAE. This continues that
TAE run for ``--steps`` more steps that train the decoder alone
(``decoder_only_steps``; the encoder, and so the latent space and the
transformer's training data, stay exactly as they were), then samples the 144
canonical shapes captions with the transformer for every ``--seeds`` entry and
decodes them once with the original decoder and once with each continued one.
Transformer, captions and noise are the same for every decoder, so the
difference in the shapes scorer's all-correct rate is the decoder's alone.
The table also gives the median fill ratio (object area over its bounding
box, as the scorer reads it) of the small squares (read as squares above
0.8925) and small triangles (as triangles below 0.72) over all seeds.

The continued runs resume the TAE's own checkpoint with the recorded training
config (data, losses, learning rate); the cosine is stretched to the new
length, so the extra steps run near the schedule's floor. The latent statistics
of the original run are kept (the encoder does not change).

Usage::

    python benchmarks/bench_tae_decoder_only.py --t2v runs/demo/t2v --steps 300 \\
        [--seeds 0 1000 2000] [--threads 2] [--out /tmp/bench_tae_decoder_only] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_tae_shapes import FILL_KINDS  # small squares and triangles
from moviegen.config import config_from_dict
from moviegen.eval.shapes_score import score_samples
from moviegen.pipeline.demo import DemoConfig, sample_captions
from moviegen.pipeline.sample import TextToVideoPipeline
from moviegen.tae.checkpoint import load_tae
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.checkpoint_files import CHECKPOINTS_DIRNAME
from moviegen.train.tae_trainer import TAETrainConfig, TAETrainer


def continue_decoder(tae_run: Path, out: Path, steps: int) -> tuple[Path, float]:
    """A copy of ``tae_run`` trained ``steps`` more steps, decoder only; (run, seconds)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tae_run, out)
    checkpoint = CheckpointManager.load(out)
    saved = config_from_dict(TAETrainConfig, checkpoint.metadata["config"])
    config = replace(
        saved,
        steps=checkpoint.step + steps,
        decoder_only_steps=steps,
        time_budget_s=None,
        fit_schedule_to_budget=False,
    )
    started = time.perf_counter()
    TAETrainer(config, out, progress=False).train()
    seconds = time.perf_counter() - started
    continued = CheckpointManager.load(out)
    if continued.step != config.steps:
        raise SystemExit(f"{out} ended at step {continued.step}, expected {config.steps}")
    for name, tensor in checkpoint.model_state.items():
        if name.startswith("encoder.") and not torch.equal(continued.model_state[name], tensor):
            raise SystemExit(f"decoder-only steps changed the encoder weight {name}")
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t2v", type=Path, default=Path("runs/demo/t2v"))
    parser.add_argument("--steps", type=int, nargs="+", default=[300])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_tae_decoder_only"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = TextToVideoPipeline.from_checkpoint(args.t2v)
    base_tae = pipeline.tae
    # The transformer records the TAE checkpoint it was trained on; its run folder
    # holds the training state (optimizer, schedule) the continuation resumes.
    tae_run = CheckpointManager.resolve(
        CheckpointManager.load(args.t2v).metadata["precompute"]["tae_checkpoint"]
    )
    if tae_run.parent.name == CHECKPOINTS_DIRNAME:
        tae_run = tae_run.parent.parent
    decoders = [{"name": "original", "tae": base_tae, "extra_steps": 0, "train_s": None}]
    for steps in args.steps:
        run, seconds = continue_decoder(tae_run, args.out / f"tae_plus{steps}", steps)
        tae = load_tae(run)
        tae.set_latent_stats(base_tae.latent_mean, base_tae.latent_std)
        decoders.append(
            {"name": f"+{steps} decoder-only", "tae": tae, "extra_steps": steps, "train_s": seconds}
        )
    results = []
    for decoder in decoders:
        pipeline.tae = decoder["tae"].eval()
        rates = []
        fills: dict[str, list[float]] = {f"{size} {kind}": [] for size, kind in FILL_KINDS}
        for seed in args.seeds:
            out = args.out / f"samples_plus{decoder['extra_steps']}_seed{seed}"
            sample_captions(
                pipeline, out, seed=seed, options=DemoConfig().sampling_options(), progress=False
            )
            score = score_samples(out)
            rates.append(score.all_correct_rate)
            for row in score.rows:
                kind = f"{row['expected']['size']} {row['expected']['shape']}"
                if kind in fills and row["reading"]["fill_ratio"] is not None:
                    fills[kind].append(row["reading"]["fill_ratio"])
        results.append(
            {
                "decoder": decoder["name"],
                "extra_steps": decoder["extra_steps"],
                "train_s": decoder["train_s"],
                "all_correct_per_seed": dict(zip(args.seeds, rates, strict=True)),
                "all_correct_mean": statistics.mean(rates),
                "median_fill": {kind: statistics.median(v) for kind, v in fills.items() if v},
            }
        )
    print(
        f"transformer {args.t2v}, TAE {tae_run} (step {CheckpointManager.load(tae_run).step}), "
        f"{args.threads} threads, 144 canonical captions per seed"
    )
    seeds = " | ".join(f"seed {seed}" for seed in args.seeds)
    fill_names = [f"{size} {kind}" for size, kind in FILL_KINDS]
    fill_heads = " | ".join(f"{name} fill" for name in fill_names)
    print(f"| decoder | train s | {seeds} | mean | {fill_heads} |")
    print("|---|---:|" + "---:|" * (len(args.seeds) + 1 + len(fill_names)))
    for result in results:
        cells = " | ".join(f"{rate:.1%}" for rate in result["all_correct_per_seed"].values())
        train_s = "" if result["train_s"] is None else f"{result['train_s']:.0f}"
        fill_cells = " | ".join(
            f"{result['median_fill'][name]:.3f}" if name in result["median_fill"] else ""
            for name in fill_names
        )
        print(
            f"| {result['decoder']} | {train_s} | {cells} | "
            f"{result['all_correct_mean']:.1%} | {fill_cells} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
