"""`moviegen <verb>`: parses arguments and calls into the package.

User mistakes (bad paths, malformed manifests, unreadable videos) end with a
one-line ``moviegen: error: ...`` and exit status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

from moviegen import __version__
from moviegen.data.manifest import ManifestError, write_manifest
from moviegen.data.video_io import VideoDecodeError
from moviegen.train.allocator import keep_freed_memory

# Exit status for user errors (argparse uses the same for bad arguments).
USAGE_ERROR = 2
# Exit status after Ctrl-C, as shells report SIGINT (128 + 2).
INTERRUPTED = 130


def _data_index(args: argparse.Namespace) -> int:
    from moviegen.data.index import index_folder

    result = index_folder(args.folder, verify=not args.no_verify, progress=not args.quiet)
    if not result.records:
        raise ValueError(f"no usable clips under {args.folder} (skipped {len(result.skipped)})")
    manifest = write_manifest(args.out, result.records)
    print(f"wrote {len(result.records)} clips to {manifest}")
    counts = result.skip_counts()
    if counts:
        print(f"skipped {len(result.skipped)} files:")
        for reason, count in sorted(counts.items()):
            print(f"  {reason}: {count}")
        for item in result.skipped:
            print(f"  - {item.path}: {item.message}")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from moviegen.data.index import inspect_manifest

    report = inspect_manifest(args.manifest, verify=not args.no_verify, progress=not args.quiet)
    print(report.format())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


def _data_shapes(args: argparse.Namespace) -> int:
    from moviegen.data.shapes import generate_shapes_dataset

    result = generate_shapes_dataset(
        args.out,
        num_clips=args.num_clips,
        size=args.size,
        num_frames=args.frames,
        fps=args.fps,
        seed=args.seed,
        val_fraction=args.val_fraction,
        exclude=tuple(args.exclude),
        paraphrase=args.paraphrase,
        lossless=args.lossless,
        progress=not args.quiet,
    )
    print(f"train: {result.num_train} clips -> {result.train_manifest}")
    print(f"val:   {result.num_val} clips -> {result.val_manifest}")
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the training verbs: --out, --steps, --time-budget, --set, --fresh, --quiet."""
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumed if it exists)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after this step as an interruption would (checkpoint first), e.g. to "
        "test resuming; the schedule still runs to --steps",
    )


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides plus --steps / --time-budget."""
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.time_budget is not None:
        overrides.append(f"time_budget_s={args.time_budget}")
    return overrides


def _train_run(args: argparse.Namespace, make_trainer) -> tuple[dict[str, float], bool]:
    """Run a trainer as this process of a torchrun job (or alone): deletes the run
    with --fresh (rank 0), trains; returns the logs and whether this is rank 0."""
    from moviegen.train.distributed_run import barrier, distributed_run

    with distributed_run() as env:
        if args.fresh and env.is_main and args.out.exists():
            import shutil

            shutil.rmtree(args.out)
        barrier()
        trainer = make_trainer(progress=not args.quiet and env.is_main)
        logs = trainer.train(stop_at=args.stop_at)
        # Released before distributed_run tears the process group down (see there).
        del trainer
    return logs, env.is_main


def _tae_train(args: argparse.Namespace) -> int:
    from moviegen.train.tae_trainer import TAETrainer, resolve_config

    config = resolve_config(
        args.recipe, overrides=_run_overrides(args), train=str(args.data), val=args.val
    )
    logs, main = _train_run(args, partial(TAETrainer, config, args.out))
    if not main:
        return 0
    if logs:
        print(f"val PSNR {logs['val/psnr']:.2f} dB, SSIM {logs['val/ssim']:.4f}")
    print(f"run: {args.out}")
    return 0


def _tae_stats(args: argparse.Namespace) -> int:
    from moviegen.tae.stats import store_latent_stats

    folder, stats, skips = store_latent_stats(
        args.checkpoint,
        args.data,
        size=args.size,
        num_frames=args.frames,
        max_clips=args.max_clips,
        progress=not args.quiet,
    )
    if skips.total:
        print(skips.summary())
    print(f"latent stats over {stats['num_clips']} clips written to {folder / 'metadata.json'}")
    print("channel  " + " ".join(f"{index:>6d}" for index in range(len(stats["mean"]))))
    print("mean     " + " ".join(f"{value:>6.2f}" for value in stats["mean"]))
    print("std      " + " ".join(f"{value:>6.2f}" for value in stats["std"]))
    return 0


def _tae_reconstruct(args: argparse.Namespace) -> int:
    from moviegen.data.transforms import frames_to_tensor, to_uint8_frames
    from moviegen.data.video_io import probe_video, read_video, write_video
    from moviegen.eval.metrics import psnr
    from moviegen.tae.checkpoint import load_tae

    tae = load_tae(args.checkpoint)
    size = None if args.size is None else (args.size, args.size)
    frames = read_video(args.input, num_frames=args.frames, size=size)
    video = frames_to_tensor(frames)[None]
    reconstruction = tae.reconstruct(video)
    fps = probe_video(args.input).fps
    output = to_uint8_frames(reconstruction[0])
    if args.side_by_side:
        output = np.concatenate([frames, output], axis=2)  # original | reconstruction
    write_video(args.output, output, fps=fps)
    print(f"PSNR {float(psnr(reconstruction, video)[0]):.2f} dB over {video.shape[2]} frames")
    print(f"wrote {args.output}")
    return 0


def _tae_eval(args: argparse.Namespace) -> int:
    from moviegen.eval.reconstruction import evaluate_tae
    from moviegen.tae.checkpoint import load_tae

    tae = load_tae(args.checkpoint)
    report = evaluate_tae(
        tae,
        args.data,
        size=args.size,
        num_frames=args.frames,
        max_clips=args.max_clips,
        progress=not args.quiet,
    )
    print(report.format())
    print(json.dumps(report.to_dict()))
    return 0


def _text_encoders(args: argparse.Namespace) -> list:
    """The CPU default (MiniLM) or the paper's three encoders from local folders."""
    from moviegen.text import default_text_encoders, paper_text_encoders

    paths = (args.ul2, args.byt5, args.metaclip)
    if not any(paths):
        return default_text_encoders()
    if not all(paths):
        raise ValueError("give all three of --ul2, --byt5 and --metaclip (or none: MiniLM)")
    return paper_text_encoders(*(str(path) for path in paths))


def _precompute(args: argparse.Namespace) -> int:
    from moviegen.data.precompute import PrecomputeConfig, precompute

    config = PrecomputeConfig(
        tae=str(args.tae),
        data=str(args.data),
        size=args.size,
        num_frames=args.frames,
        fps=args.fps,
        shard_size=args.shard_size,
    )
    out, skips = precompute(
        config, args.out, text_encoders=_text_encoders(args), progress=not args.quiet
    )
    if skips.total:
        print(skips.summary())
    print(f"latents and text features: {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from moviegen.train.t2v_trainer import T2VTrainer, resolve_t2v_config

    config = resolve_t2v_config(
        args.recipe, latents=str(args.latents), overrides=_run_overrides(args)
    )
    logs, main = _train_run(args, partial(T2VTrainer, config, args.out))
    if not main:
        return 0
    if logs:
        print(f"flow loss {logs['loss/flow']:.4f}")
    print(f"run: {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from moviegen.data.video_io import write_video
    from moviegen.pipeline.sample import (
        SamplingOptions,
        TextToVideoPipeline,
        read_prompts_file,
        sample_to_folder,
    )

    height, width = _parse_size(args.size)
    options = SamplingOptions(
        num_frames=args.num_frames,
        height=height,
        width=width,
        fps=args.fps,
        steps=args.steps,
        cfg_scale=args.cfg,
        cfg_interval=tuple(args.cfg_interval),
        negative_prompt=args.negative_prompt,
        solver=args.solver,
        eta=args.eta,
    )
    pipeline = TextToVideoPipeline.from_checkpoint(args.checkpoint, tae=args.tae)
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
        sample_to_folder(
            pipeline,
            prompts,
            args.output,
            seed=args.seed,
            options=options,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        print(f"{len(prompts)} videos and prompts.jsonl in {args.output}")
        return 0
    [frames] = pipeline([args.prompt], seeds=[args.seed], options=options, progress=not args.quiet)
    write_video(args.output, frames, fps=options.fps)
    print(f"wrote {args.output}")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--size must look like 64 or 64x96 (HxW), got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"--size must look like 64 or 64x96 (HxW), got {text!r}")


def _eval_shapes(args: argparse.Namespace) -> int:
    from moviegen.eval.shapes_score import score_samples

    score = score_samples(args.samples, progress=not args.quiet)
    print(score.format_table())
    print(json.dumps(score.to_dict()))
    return 0


def _info(args: argparse.Namespace) -> int:
    from moviegen.transformer import describe, transformer_recipe

    print(describe(transformer_recipe(args.recipe)))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from moviegen.distributed.planner import format_validation, plan_training, validate_on_cpu

    if args.validate:
        results = validate_on_cpu(default_malloc=True)
        if args.json:
            print(json.dumps([result.to_dict() for result in results]))
        else:
            print(format_validation(results))
        return 0
    if args.recipe is None:
        raise ValueError("plan needs --recipe (or --validate)")
    options = {
        "num_gpus": args.gpus,
        "gpu_memory_gib": args.gpu_memory,
        "num_video_tokens": args.tokens,
        "num_text_tokens": args.text_tokens,
        "micro_batch_size": args.micro_batch,
        "grad_accum": args.grad_accum,
        "context_parallel": args.cp,
        "shard_across_cp": args.shard_across_cp,
        "activation_checkpointing": args.ac,
        "precision": args.precision,
        "attention": args.attention,
        "ema": not args.no_ema,
        "extra_memory_gib": args.extra_memory,
        "peak_flops": None if args.peak_tflops is None else args.peak_tflops * 1e12,
        "mfu": args.mfu,
    }
    # Options left out take the planner's defaults.
    plan = plan_training(args.recipe, **{k: v for k, v in options.items() if v is not None})
    print(json.dumps(plan.to_dict()) if args.json else plan.format())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moviegen.pipeline.demo import DemoConfig, run_demo

    options = {
        "training_budget_s": args.training_budget,
        "tae_time_budget_s": args.tae_budget,
        "tae_steps": args.tae_steps,
        "t2v_time_budget_s": args.t2v_budget,
        "t2v_steps": args.t2v_steps,
        "sample_steps": args.sample_steps,
        "cfg_scale": args.cfg,
        "cfg_interval": None if args.cfg_interval is None else tuple(args.cfg_interval),
        "sample_eta": args.eta,
        "lossless_data": False if args.h264_data else None,
    }
    # Options left out keep the 15-minute defaults; bad values raise ValueError.
    config = DemoConfig(
        out=Path(args.out),
        fresh=args.fresh,
        **{key: value for key, value in options.items() if value is not None},
    )
    run_demo(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moviegen", description="Movie Gen Video: data, TAE, transformer, sampling."
    )
    parser.add_argument("--version", action="version", version=f"moviegen {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="datasets: index folders, inspect manifests, shapes")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)

    index = data_verbs.add_parser(
        "index", help="build a JSON Lines manifest from a folder of videos/images + captions"
    )
    index.add_argument("folder", type=Path)
    index.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    index.add_argument(
        "--no-verify",
        action="store_true",
        help="probe headers only (faster; truncated files with intact headers get through)",
    )
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(run=_data_index)

    inspect = data_verbs.add_parser("inspect", help="counts, histograms and unreadable files")
    inspect.add_argument("manifest", type=Path)
    inspect.add_argument("--no-verify", action="store_true", help="probe headers only")
    inspect.add_argument("--json", action="store_true", help="also print the report as JSON")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(run=_data_inspect)

    shapes = data_verbs.add_parser("shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--num-clips", type=int, required=True)
    shapes.add_argument("--size", type=int, default=64, help="frame side in pixels")
    shapes.add_argument("--frames", type=int, default=16, help="frames per clip")
    shapes.add_argument("--fps", type=int, default=8)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--val-fraction", type=float, default=0.1)
    shapes.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        metavar="CAPTION",
        help="canonical captions kept out of training (they go to validation)",
    )
    shapes.add_argument("--paraphrase", action="store_true", help="paraphrased captions")
    shapes.add_argument("--lossless", action="store_true", help="FFV1 .mkv instead of H.264 .mp4")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(run=_data_shapes)

    tae = verbs.add_parser("tae", help="the temporal autoencoder: train, stats, reconstruct, eval")
    tae_verbs = tae.add_subparsers(dest="tae_verb", required=True)
    train = tae_verbs.add_parser("train", help="train (or resume) a TAE run")
    train.add_argument("--recipe", default="cpu", help="debug | cpu | paper")
    train.add_argument("--data", type=Path, required=True, help="training manifest")
    train.add_argument("--val", type=str, default=None, help="validation manifest")
    _add_run_arguments(train)
    train.set_defaults(run=_tae_train)

    stats = tae_verbs.add_parser("stats", help="measure latent mean/std into the checkpoint")
    stats.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint")
    stats.add_argument("--data", type=Path, required=True, help="manifest or folder of videos")
    stats.add_argument("--size", type=int, default=None, help="centre-crop clips to SIZE x SIZE")
    stats.add_argument("--frames", type=int, default=None, help="first N frames of each clip")
    stats.add_argument("--max-clips", type=int, default=None)
    stats.add_argument("--quiet", action="store_true")
    stats.set_defaults(run=_tae_stats)

    reconstruct = tae_verbs.add_parser("reconstruct", help="encode and decode one video")
    reconstruct.add_argument("--checkpoint", type=Path, required=True)
    reconstruct.add_argument("--input", type=Path, required=True)
    reconstruct.add_argument("--output", type=Path, required=True, help=".mp4, .gif or .mkv")
    reconstruct.add_argument("--size", type=int, default=None, help="centre-crop to SIZE x SIZE")
    reconstruct.add_argument("--frames", type=int, default=None, help="first N frames")
    reconstruct.add_argument(
        "--side-by-side", action="store_true", help="original left, reconstruction right"
    )
    reconstruct.set_defaults(run=_tae_reconstruct)

    evaluate = tae_verbs.add_parser("eval", help="PSNR / SSIM / latent outliers on clips")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True, help="manifest or folder")
    evaluate.add_argument("--size", type=int, default=None, help="centre-crop to SIZE x SIZE")
    evaluate.add_argument("--frames", type=int, default=None, help="first N frames")
    evaluate.add_argument("--max-clips", type=int, default=None)
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(run=_tae_eval)

    precompute = verbs.add_parser(
        "precompute", help="encode clips (TAE) and captions (text encoders) into shards"
    )
    precompute.add_argument("--tae", type=Path, required=True, help="TAE run or checkpoint")
    precompute.add_argument("--data", type=Path, required=True, help="manifest (JSON Lines)")
    precompute.add_argument("--out", type=Path, required=True, help="output folder (resumed)")
    precompute.add_argument("--size", type=int, default=64, help="frames are SIZE x SIZE")
    precompute.add_argument("--frames", type=int, default=16, help="frames per clip")
    precompute.add_argument("--fps", type=float, default=None, help="sampling rate")
    precompute.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    for name in ("ul2", "byt5", "metaclip"):
        precompute.add_argument(
            f"--{name}", type=Path, default=None, help=f"local {name} weights folder"
        )
    precompute.add_argument("--quiet", action="store_true")
    precompute.set_defaults(run=_precompute)

    t2v = verbs.add_parser("train", help="train (or resume) the text-to-video transformer")
    t2v.add_argument("--recipe", default="tiny", help="debug | tiny | 1B | 5B | 9B | 17B | 30B")
    t2v.add_argument("--latents", type=Path, required=True, help="`moviegen precompute` folder")
    _add_run_arguments(t2v)
    t2v.set_defaults(run=_train)

    sample = verbs.add_parser("sample", help="text-to-video sampling")
    sample.add_argument("--checkpoint", type=Path, required=True, help="transformer run")
    prompt = sample.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", type=str, help="one prompt (--output is a video file)")
    prompt.add_argument(
        "--prompts-file", type=Path, help="text or JSON Lines (--output is a folder)"
    )
    sample.add_argument("--output", type=Path, required=True)
    sample.add_argument("--num-frames", type=int, default=16)
    sample.add_argument("--size", default="64", help="HxW or one side, pixels")
    sample.add_argument("--fps", type=float, default=8.0)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    sample.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LO", "HI"),
        help="guide only at flow times t in [LO, HI] (0 noise, 1 data); default 0 1",
    )
    sample.add_argument("--negative-prompt", default="")
    sample.add_argument("--solver", default="euler", help="euler | heun")
    sample.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="stochastic Euler: share of the noise drawn afresh each step, in [0, 1] "
        "(default 0: the deterministic ODE)",
    )
    sample.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    sample.add_argument("--batch-size", type=int, default=16, help="prompts solved at once")
    sample.add_argument("--tae", type=Path, default=None, help="override the recorded TAE")
    sample.add_argument("--quiet", action="store_true")
    sample.set_defaults(run=_sample)

    evaluation = verbs.add_parser("eval", help="evaluate generated samples")
    eval_verbs = evaluation.add_subparsers(dest="eval_verb", required=True)
    shapes_eval = eval_verbs.add_parser("shapes", help="prompt adherence on shapes captions")
    shapes_eval.add_argument(
        "--samples", type=Path, required=True, help="folder with prompts.jsonl"
    )
    shapes_eval.add_argument("--quiet", action="store_true")
    shapes_eval.set_defaults(run=_eval_shapes)

    info = verbs.add_parser("info", help="a transformer recipe's size")
    info.add_argument("--recipe", required=True, help="debug | tiny | 1B | 5B | 9B | 17B | 30B")
    info.set_defaults(run=_info)

    plan = verbs.add_parser(
        "plan", help="per-GPU memory and step time of training a recipe (FSDP + CP)"
    )
    plan.add_argument("--recipe", default=None, help="debug | tiny | 1B | 5B | 9B | 17B | 30B")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs in the job")
    plan.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (80)")
    plan.add_argument(
        "--tokens", type=int, default=None, help="video tokens per sample (default: the most)"
    )
    plan.add_argument("--cp", type=int, default=1, help="context-parallel degree (divides --gpus)")
    plan.add_argument(
        "--ac", default="none", help="activation checkpointing: full | selective | none"
    )
    plan.add_argument(
        "--shard-across-cp", action="store_true", help="FSDP over all GPUs, not gpus / cp"
    )
    plan.add_argument("--micro-batch", type=int, default=1, help="samples per data-parallel rank")
    plan.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    plan.add_argument("--text-tokens", type=int, default=None, help="text context length (640)")
    plan.add_argument("--precision", default="bf16-mixed", help="bf16-mixed | fp32")
    plan.add_argument("--attention", default="flash", help="flash | math (materialises N x N)")
    plan.add_argument("--no-ema", action="store_true", help="no fp32 EMA copy of the weights")
    plan.add_argument(
        "--extra-memory", type=float, default=0.0, help="GiB per GPU for text encoders, TAE"
    )
    plan.add_argument(
        "--peak-tflops", type=float, default=None, help="per GPU (default: H100 dense)"
    )
    plan.add_argument("--mfu", type=float, default=None, help="assumed fraction of peak (0.4)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    plan.add_argument(
        "--validate",
        action="store_true",
        help="train small configs on this CPU and compare their peak memory with the plan",
    )
    plan.set_defaults(run=_plan)

    demo = verbs.add_parser("demo", help="the built-in end-to-end demo on the shapes data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--fresh", action="store_true", help="start over, reuse nothing")
    demo.add_argument(
        "--training-budget",
        type=float,
        help="TAE + transformer training seconds (default 725); the transformer gets what "
        "the TAE leaves",
    )
    demo.add_argument(
        "--tae-budget", type=float, help="TAE training seconds, at most (default 330)"
    )
    demo.add_argument(
        "--tae-steps", type=int, help="TAE steps, the cosine's length (default: the recipe's 1600)"
    )
    demo.add_argument(
        "--t2v-budget", type=float, help="transformer training seconds, at most (default 460)"
    )
    demo.add_argument(
        "--t2v-steps", type=int, help="transformer steps (default: the recipe's 2700)"
    )
    demo.add_argument("--sample-steps", type=int, help="solver steps per video (default 30)")
    demo.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 1.5)")
    demo.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only at flow times in [LO, HI] (0 noise, 1 data)",
    )
    demo.add_argument(
        "--eta",
        type=float,
        help="stochastic Euler sampling (1 ancestral, 0 the ODE): share of fresh noise (default 1)",
    )
    demo.add_argument(
        "--h264-data",
        action="store_true",
        help="write the shapes clips as H.264 .mp4 instead of lossless FFV1 .mkv "
        "(smaller; libx264 may encode a few clips differently from run to run)",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every verb trains, encodes or samples: keep freed buffers mapped for reuse.
    keep_freed_memory()
    try:
        return args.run(args)
    except (ValueError, ManifestError, VideoDecodeError, FileNotFoundError) as error:
        print(f"moviegen: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("moviegen: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
