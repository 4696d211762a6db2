"""Precomputed training inputs for the transformer: `moviegen precompute`.

Transformer training should run neither the TAE nor the text encoders (Movie Gen
cached its high-resolution latents too). This module encodes every clip of a
manifest once, with a trained TAE (normalised posterior means) and with the
frozen text encoders (token sequences and masks, not pooled), and writes them
into a folder of shards:

```
DIR/meta.json                what made it: TAE checkpoint, latent stats, encoders, clip geometry
DIR/null_text.safetensors    encoder features of the empty prompt (caption dropout, CFG)
DIR/shard_00000.safetensors  "<i>.latent" (C, T, H, W) per clip i of the manifest, and
                             "text.<k>.<encoder>.hidden/mask" per distinct caption k of the shard
DIR/shard_00000.jsonl        one line per manifest clip of the shard: caption, shape, or skip reason
```

A shard is complete when its ``.jsonl`` exists (it is written last, atomically),
so an interrupted run resumes at the first incomplete shard. Unreadable clips
are listed with their reason in the shard's ``.jsonl`` and counted; they are
never silently dropped.

:class:`LatentDataset` reads such a folder for training, with the bucket keys
(latent shapes) that :class:`~moviegen.data.buckets.BucketBatchSampler` needs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from moviegen.config import atomic_write_text, config_to_dict
from moviegen.data.buckets import BucketKey
from moviegen.data.dataset import SkipCounter, SkippedSample, VideoTextDataset
from moviegen.data.manifest import read_manifest
from moviegen.tae.checkpoint import LATENT_STATS_KEY, load_tae
from moviegen.text import TextConditioner, TextEncoderConfig, TextFeatures, pad_features
from moviegen.train.checkpoint import CheckpointManager

__all__ = [
    "LatentDataset",
    "PrecomputeConfig",
    "collate_latents",
    "concat_text_features",
    "load_null_features",
    "pad_text_features",
    "precompute",
    "read_precompute_meta",
    "repeat_text_features",
]

META_FILE = "meta.json"
NULL_TEXT_FILE = "null_text.safetensors"
FORMAT_VERSION = 1
# Clips encoded per TAE call: measured on 2 CPU cores (cpu recipe, 16x64x64
# clips), batches of 2-4 take 35-40 ms per clip, single clips 150 ms, 16 clips 56 ms.
ENCODE_BATCH_SIZE = 4
# Captions encoded per text-encoder call.
TEXT_BATCH_SIZE = 64


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    """What to encode and how clips are cut before encoding."""

    tae: str  # TAE run folder or checkpoint (must hold latent statistics)
    data: str  # manifest (JSON Lines)
    size: int = 64  # clips are resized (shorter side) and centre-cropped to size x size
    num_frames: int = 16  # frames per clip (from the start of each clip)
    fps: float | None = None  # sampling rate; None keeps each file's rate
    fps_prefix: bool = True  # prepend "FPS-N " to captions (Movie Gen's fps conditioning)
    shard_size: int = 256  # clips per shard (the unit of resumption)


def _shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


def _trim(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's features cut to its real tokens (at least one position,
    masked out when the encoder saw nothing, e.g. ByT5 without quoted text)."""
    length = max(int(mask.sum()), 1)
    return hidden[:length].clone(), mask[:length].clone()  # own storage, for safetensors


def _encode_captions(
    conditioner: TextConditioner, captions: Sequence[str]
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per unique caption, per encoder: trimmed ``(hidden (L, D), mask (L,))``."""
    unique = list(dict.fromkeys(captions))
    result: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {c: {} for c in unique}
    for start in range(0, len(unique), TEXT_BATCH_SIZE):
        chunk = unique[start : start + TEXT_BATCH_SIZE]
        features = conditioner.encode(chunk, allow_empty=False)
        for name, (hidden, mask) in features.items():
            for row, caption in enumerate(chunk):
                result[caption][name] = _trim(hidden[row].float().cpu(), mask[row].cpu())
    return result


def _null_features(conditioner: TextConditioner) -> dict[str, torch.Tensor]:
    """The empty prompt, encoded by every encoder (rows of a one-prompt batch)."""
    features = conditioner.encode_null()
    tensors = {}
    for name, (hidden, mask) in features.items():
        hidden, mask = _trim(hidden[0].float().cpu(), mask[0].cpu())
        tensors[f"{name}.hidden"], tensors[f"{name}.mask"] = hidden, mask
    return tensors


def _meta(config: PrecomputeConfig, checkpoint: Path, tae, encoders, conditioner) -> dict:
    metadata = CheckpointManager.load_metadata(checkpoint)
    stats = metadata.get(LATENT_STATS_KEY)
    return {
        "format": FORMAT_VERSION,
        "config": config_to_dict(config),
        "tae_checkpoint": os.fspath(checkpoint.resolve()),
        "tae_config": config_to_dict(tae.config),
        "latent_stats": stats,
        "text_encoders": [config_to_dict(encoder) for encoder in encoders],
        "text_dims": dict(conditioner.dims),
    }


def read_precompute_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a precompute folder (ValueError when it is not one)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a precompute folder (no {META_FILE}); run `moviegen precompute`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}")
    return meta


def precompute(
    config: PrecomputeConfig,
    out_dir: str | os.PathLike,
    *,
    text_encoders: Sequence[TextEncoderConfig],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, SkipCounter]:
    """Encode ``config.data`` into shards under ``out_dir``; resumes a partial run.

    Returns the folder and the counter of skipped clips (also recorded in the
    shards' ``.jsonl`` files).

    Raises:
        ValueError: the TAE has no latent statistics, or ``out_dir`` holds a
            precompute made with other settings (use a new folder).
    """
    out = Path(out_dir)
    if config.shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {config.shard_size}")
    checkpoint = CheckpointManager.resolve(config.tae)
    tae = load_tae(checkpoint, map_location=device)
    if not bool(tae.has_latent_stats):
        raise ValueError(
            f"{checkpoint} has no latent statistics: run `moviegen tae stats --checkpoint "
            f"{config.tae} --data MANIFEST` first"
        )
    conditioner = TextConditioner(list(text_encoders))
    meta = _meta(config, checkpoint, tae, text_encoders, conditioner)
    meta_path = out / META_FILE
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise ValueError(
                f"{out} already holds a precompute made with other settings "
                "(TAE, encoders or clip geometry); choose a new --out folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_file(_null_features(conditioner), out / NULL_TEXT_FILE)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))

    records = read_manifest(config.data)
    dataset = VideoTextDataset(
        records,
        num_frames=config.num_frames,
        size=(config.size, config.size),
        fps=config.fps,
        fps_prefix=config.fps_prefix,
        random_start=False,
    )
    skips = SkipCounter()
    num_shards = math.ceil(len(records) / config.shard_size)
    bar = tqdm(total=len(records), desc="precompute", unit="clip", disable=not progress)
    for shard in range(num_shards):
        start = shard * config.shard_size
        indices = range(start, min(start + config.shard_size, len(records)))
        index_path = out / f"{_shard_stem(shard)}.jsonl"
        if index_path.is_file():  # finished by an earlier run
            for line in index_path.read_text().splitlines():
                entry = json.loads(line)
                if "skipped" in entry:
                    skips.add(SkippedSample(entry["index"], entry["path"], entry["skipped"], ""))
            bar.update(len(indices))
            continue
        _write_shard(out, shard, indices, dataset, tae, conditioner, skips, bar, device)
    bar.close()
    return out, skips


@torch.no_grad()
def _write_shard(out, shard, indices, dataset, tae, conditioner, skips, bar, device) -> None:
    tensors: dict[str, torch.Tensor] = {}
    lines: list[dict] = []
    good: list[tuple[int, str]] = []  # (manifest index, caption)
    pending: list[tuple[int, dict]] = []  # read clips of one shape, waiting to be encoded

    def flush() -> None:
        videos = torch.stack([sample["video"] for _, sample in pending]).to(device)
        for (index, sample), latent in zip(pending, tae.encode(videos).cpu(), strict=True):
            tensors[f"{index}.latent"] = latent.clone(memory_format=torch.contiguous_format)
            good.append((index, sample["caption"]))
            record = dataset.records[index]
            lines.append(
                {
                    "index": index,
                    "path": str(record.path),
                    "caption": sample["caption"],
                    "latent_shape": list(latent.shape),
                    "attributes": record.attributes,
                }
            )
        pending.clear()

    for index in indices:
        sample = dataset[index]
        bar.update(1)
        if isinstance(sample, SkippedSample):
            skips.add(sample)
            lines.append({"index": index, "path": sample.path, "skipped": sample.reason})
            continue
        if pending and pending[0][1]["video"].shape != sample["video"].shape:
            flush()
        pending.append((index, sample))
        if len(pending) == ENCODE_BATCH_SIZE:
            flush()
    if pending:
        flush()
    # Features are stored once per distinct caption of the shard; lines point at them.
    text = _encode_captions(conditioner, [caption for _, caption in good])
    text_keys = {caption: key for key, caption in enumerate(text)}
    for line in lines:
        if "caption" in line:
            line["text_key"] = text_keys[line["caption"]]
    for caption, key in text_keys.items():
        for name, (hidden, mask) in text[caption].items():
            tensors[f"text.{key}.{name}.hidden"] = hidden
            tensors[f"text.{key}.{name}.mask"] = mask
    stem = _shard_stem(shard)
    temp = out / f".{stem}.safetensors.tmp"
    save_file(tensors, temp)
    os.replace(temp, out / f"{stem}.safetensors")
    # Written last: its presence marks the shard complete.
    atomic_write_text(out / f"{stem}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


# ----------------------------------------------------------------------------- reading


def pad_text_features(
    rows: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
) -> TextFeatures:
    """Per-sample ``{name: (hidden (L_i, D), mask (L_i,))}`` -> padded batch
    ``{name: (hidden (B, L, D), mask (B, L))}``; padding is masked out."""
    if not rows:
        raise ValueError("no text features to batch")
    batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in rows[0]:
        length = max(row[name][0].shape[0] for row in rows)
        dim = rows[0][name][0].shape[1]
        hidden = rows[0][name][0].new_zeros(len(rows), length, dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            row_hidden, row_mask = row[name]
            hidden[i, : row_hidden.shape[0]] = row_hidden
            mask[i, : row_mask.shape[0]] = row_mask
        batch[name] = (hidden, mask)
    return batch


def concat_text_features(first: TextFeatures, second: TextFeatures) -> TextFeatures:
    """Two batches of features -> one (``first`` rows, then ``second`` rows),
    padding every encoder's sequence to the longer one (padding masked out)."""
    if set(first) != set(second):
        raise ValueError(f"encoders differ: {sorted(first)} vs {sorted(second)}")
    joined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in first:
        length = max(first[name][0].shape[1], second[name][0].shape[1])
        parts = [pad_features(*features[name], length) for features in (first, second)]
        joined[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return joined


def repeat_text_features(features: TextFeatures, batch_size: int) -> TextFeatures:
    """A one-row batch of features repeated to ``batch_size`` rows."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (hidden, mask) in features.items():
        if hidden.shape[0] != 1:
            raise ValueError(f"expected one row to repeat, got {hidden.shape[0]}")
        out[name] = (hidden.expand(batch_size, -1, -1), mask.expand(batch_size, -1))
    return out


def load_null_features(folder: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The empty prompt's features ``{name: (hidden (L, D), mask (L,))}``."""
    tensors = {}
    with safe_open(Path(folder) / NULL_TEXT_FILE, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[key] = handle.get_tensor(key)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.hidden"], tensors[f"{name}.mask"].bool()) for name in names}


class LatentDataset(Dataset):
    """Samples of a precompute folder: ``{"latent", "text", "caption", "index"}``.

    Shards are memory-mapped; a sample is read when asked for. Clips that were
    skipped during precompute are counted in :attr:`skips`. Use :meth:`bucket_keys`
    with a :class:`~moviegen.data.buckets.BucketBatchSampler` (keys are latent
    shapes ``(T', H', W')``) so that a batch holds one latent shape.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_precompute_meta(self.folder)
        self.entries: list[tuple[str, dict]] = []  # (shard file, line)
        self.skips = SkipCounter()
        index_files = sorted(self.folder.glob("shard_*.jsonl"))
        if not index_files:
            raise ValueError(f"{folder} has no finished shards; run `moviegen precompute`")
        for index_file in index_files:
            shard = index_file.with_suffix(".safetensors").name
            for line in index_file.read_text().splitlines():
                entry = json.loads(line)
                if "skipped" in entry:
                    self.skips.add(
                        SkippedSample(entry["index"], entry["path"], entry["skipped"], "")
                    )
                else:
                    self.entries.append((shard, entry))
        if not self.entries:
            raise ValueError(f"{folder}: every clip was skipped during precompute")
        self.encoder_names = sorted(self.meta["text_dims"])
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def captions(self) -> list[str]:
        return [entry["caption"] for _, entry in self.entries]

    def bucket_keys(self) -> list[BucketKey]:
        """``(T', H', W')`` of every sample's latent."""
        return [tuple(entry["latent_shape"][1:]) for _, entry in self.entries]

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        return self._handles[shard]

    def __getitem__(self, item: int | tuple[int, BucketKey]) -> dict:
        position = item[0] if isinstance(item, tuple) else item
        shard, entry = self.entries[position]
        handle = self._handle(shard)
        key, text_key = entry["index"], entry["text_key"]
        text = {
            name: (
                handle.get_tensor(f"text.{text_key}.{name}.hidden"),
                handle.get_tensor(f"text.{text_key}.{name}.mask").bool(),
            )
            for name in self.encoder_names
        }
        return {
            "latent": handle.get_tensor(f"{key}.latent"),
            "text": text,
            "caption": entry["caption"],
            "index": position,
        }

    def __getstate__(self) -> dict:  # DataLoader workers reopen the shards
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def collate_latents(items: Sequence[dict]) -> dict:
    """Stack latents ``(B, C, T, H, W)``, pad text features, keep captions."""
    shapes = {tuple(item["latent"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(f"latents of one batch differ in shape: {sorted(shapes)}")
    return {
        "latent": torch.stack([item["latent"] for item in items]),
        "text": pad_text_features([item["text"] for item in items]),
        "caption": [item["caption"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
    }
