"""Sampling choices on a trained demo transformer: prompt adherence per variant.

Samples the 144 canonical shapes captions from one trained text-to-video run
once per variant and scores them with the shapes scorer (`moviegen eval
shapes`). A variant changes the sampling options (any field of
``SamplingOptions``: ``steps``, ``cfg_scale``, ``cfg_interval``, ``schedule``,
``solver``, ``eta``), the noise seeds (``seed``: prompt i gets seed + i) or the weights
(``ema=false`` samples the trained weights of a run that also kept an EMA).
Nothing is trained, so variants compare on the same model; one set of 144
samples still varies by a few points with the seeds, so compare across seeds
and across models before believing a difference.

Usage::

    python benchmarks/bench_t2v_sampling.py --run runs/demo/t2v \\
        --variant "demo=" --variant "seeds1000=seed=1000" --variant "ode=eta=0" \\
        --variant "raw=ema=false" --variant "late-cfg=cfg_scale=3,cfg_interval=[0.7,1.0]" \\
        [--threads 2] [--out /tmp/t2v_sampling] [--json]

``--variant NAME=KEY=VALUE[,KEY=VALUE...]``; unnamed keys keep the demo's
sampling (30 stochastic Euler steps of the linear-quadratic schedule with eta 1,
CFG 1.5, seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench_tae_shapes import parse_variant  # same --variant syntax
from moviegen.eval.shapes_score import score_samples
from moviegen.pipeline.demo import DemoConfig, sample_captions
from moviegen.pipeline.sample import SamplingOptions, TextToVideoPipeline, load_t2v

ATTRIBUTES = ("colour", "shape", "size", "direction")
_STRING_FIELDS = ("schedule", "solver", "negative_prompt")


def parse_settings(overrides: list[str]) -> tuple[dict, int, bool]:
    """``KEY=VALUE`` items -> (SamplingOptions changes, seed, use the EMA)."""
    fields = {field.name for field in dataclasses.fields(SamplingOptions)}
    changes, seed, use_ema = {}, 0, True
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"variant setting {item!r} is not KEY=VALUE")
        if key == "seed":
            seed = int(text)
        elif key == "ema":
            if text not in ("true", "false"):
                raise SystemExit(f"ema must be true or false, got {text!r}")
            use_ema = text == "true"
        elif key in _STRING_FIELDS:
            changes[key] = text
        elif key in fields:
            value = json.loads(text)
            changes[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise SystemExit(f"unknown sampling setting {key!r}; choose from seed, ema, {fields}")
    return changes, seed, use_ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo/t2v"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_t2v_sampling"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [parse_variant(text) for text in args.variant or ["demo="]]
    pipeline = TextToVideoPipeline.from_checkpoint(args.run)
    ema_model = pipeline.model
    raw_model = None
    results = []
    for name, overrides in variants:
        changes, seed, use_ema = parse_settings(overrides)
        if not use_ema and raw_model is None:
            raw_model, _ = load_t2v(args.run, use_ema=False)
        pipeline.model = ema_model if use_ema else raw_model
        out = args.out / name
        started = time.perf_counter()
        sample_captions(
            pipeline,
            out,
            seed=seed,
            options=DemoConfig().sampling_options(**changes),
            progress=False,
        )
        seconds = time.perf_counter() - started
        score = score_samples(out).to_dict()
        results.append(
            {
                "variant": name,
                "overrides": overrides,
                "sample_s": seconds,
                "all_correct": score["all_correct_rate"],
                "accuracy": score["accuracy"],
            }
        )
    print(f"sampling {args.run}, {args.threads} threads, 144 canonical captions")
    print("| variant | settings | seconds | all correct | colour | shape | size | direction |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        cells = " | ".join(f"{result['accuracy'][key]:.0%}" for key in ATTRIBUTES)
        settings = ", ".join(result["overrides"]) or "(demo)"
        print(
            f"| {result['variant']} | {settings} | {result['sample_s']:.0f} | "
            f"{result['all_correct']:.1%} | {cells} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
