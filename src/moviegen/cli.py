"""`moviegen <verb>`: parses arguments and calls into the package.

User mistakes (bad paths, malformed manifests, unreadable videos) end with a
one-line ``moviegen: error: ...`` and exit status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moviegen import __version__
from moviegen.data.manifest import ManifestError, write_manifest
from moviegen.data.video_io import VideoDecodeError

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


def _demo(args: argparse.Namespace) -> int:
    from moviegen.pipeline.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(args.out), fresh=args.fresh))
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

    demo = verbs.add_parser("demo", help="the built-in end-to-end demo on the shapes data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--fresh", action="store_true", help="start over, reuse nothing")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
