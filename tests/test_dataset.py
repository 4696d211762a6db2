"""The video-text dataset: clip shapes and values, sampling rules, bad samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import INDEX_BASE, INDEX_STEP, index_frames
from moviegen.data.buckets import BucketSpec
from moviegen.data.dataset import (
    SkipCounter,
    SkippedSample,
    VideoTextDataset,
    build_loader,
    collate_clips,
)
from moviegen.data.manifest import ClipRecord, write_manifest
from moviegen.data.video_io import write_video


def tensor_indices(video: torch.Tensor) -> list[int]:
    """Frame indices of an index clip given as (3, T, H, W) in [-1, 1]."""
    levels = (video + 1) * 127.5
    means = levels.mean(dim=(0, 2, 3))
    return [round((float(mean) - INDEX_BASE) / INDEX_STEP) for mean in means]


@pytest.fixture
def clip_folder(tmp_path):
    """Three good index clips (10 fps, 40 frames), one image, and bad entries."""
    records = []
    for number in range(3):
        path = write_video(tmp_path / f"clip{number}.mp4", index_frames(40), fps=10)
        records.append(ClipRecord(path=path, caption=f"clip {number}"))
    image = tmp_path / "still.png"
    Image.fromarray(index_frames(1)[0]).save(image)
    records.append(ClipRecord(path=image, caption="a still image"))
    return tmp_path, records


def test_sample_values_shape_and_caption(clip_folder):
    _, records = clip_folder
    dataset = VideoTextDataset(records, num_frames=8, size=(32, 32), random_start=False)
    sample = dataset[0]
    video = sample["video"]
    assert video.shape == (3, 8, 32, 32)
    assert video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert sample["caption"] == "clip 0"
    assert tensor_indices(video) == list(range(8))


def test_target_fps_and_prefix(clip_folder):
    _, records = clip_folder
    dataset = VideoTextDataset(
        records, num_frames=6, size=(32, 32), fps=5, fps_prefix=True, random_start=False
    )
    sample = dataset[1]
    assert tensor_indices(sample["video"]) == [0, 2, 4, 6, 8, 10]
    assert sample["caption"] == "FPS-5 clip 1"


def test_random_start_is_seeded_by_epoch_and_index(clip_folder):
    _, records = clip_folder
    dataset = VideoTextDataset(records, num_frames=4, size=(16, 16), seed=3)
    starts = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        first = tensor_indices(dataset[0]["video"])
        assert first == list(range(first[0], first[0] + 4)), "frames stay consecutive"
        assert tensor_indices(dataset[0]["video"]) == first, "same epoch, same window"
        starts[epoch] = first[0]
    assert len(set(starts.values())) > 1, "windows move between epochs"
    assert all(0 <= start <= 36 for start in starts.values())


def test_start_and_end_limit_the_window(tmp_path):
    path = write_video(tmp_path / "c.mp4", index_frames(40), fps=10)
    record = ClipRecord(path=path, caption="c", start=1.0, end=2.0)
    dataset = VideoTextDataset([record], num_frames=10, size=(16, 16), seed=0)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert tensor_indices(dataset[0]["video"]) == list(range(10, 20))
    too_long = VideoTextDataset([record], num_frames=11, size=(16, 16))
    assert too_long[0].reason == "too_short"


def test_bucket_requests_and_images(clip_folder):
    _, records = clip_folder
    dataset = VideoTextDataset(records, num_frames=8, size=(32, 32))
    assert dataset[(0, (4, 24, 40))]["video"].shape == (3, 4, 24, 40)
    image = dataset[(3, (1, 16, 16))]
    assert image["video"].shape == (3, 1, 16, 16)
    frame_of_video = dataset[(2, (1, 16, 16))]
    assert frame_of_video["video"].shape == (3, 1, 16, 16)
    assert dataset[(3, (8, 16, 16))].reason == "too_short", "an image has one frame"


def test_bad_samples_are_skipped_with_reasons(clip_folder):
    folder, records = clip_folder
    corrupt = folder / "noise.mp4"
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    empty = folder / "empty.mp4"
    empty.touch()
    (folder / "dir.mp4").mkdir()
    short = write_video(folder / "short.mp4", index_frames(3), fps=10)
    bad = [
        ClipRecord(path=corrupt, caption="corrupt"),
        ClipRecord(path=empty, caption="empty"),
        ClipRecord(path=folder / "dir.mp4", caption="a directory"),
        ClipRecord(path=folder / "missing.mp4", caption="missing"),
        ClipRecord(path=short, caption="short"),
        ClipRecord(path=records[0].path, caption="   "),
    ]
    dataset = VideoTextDataset(records[:3] + bad, num_frames=8, size=(16, 16))
    reasons = [dataset[index].reason for index in range(3, 9)]
    assert reasons == ["corrupt", "empty", "not_a_file", "missing", "too_short", "empty_caption"]
    skipped = dataset[3]
    assert isinstance(skipped, SkippedSample) and str(corrupt) in skipped.message

    # Through a multi-worker DataLoader: nothing raises, nothing is lost uncounted.
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_clips)
    counter = SkipCounter()
    num_good = 0
    for batch in loader:
        counter.update(batch["skipped"])
        if batch["video"] is not None:
            num_good += batch["video"].shape[0]
            assert batch["video"].shape[1:] == (3, 8, 16, 16)
    assert num_good == 3
    assert counter.total == 6
    assert counter.counts == {
        "corrupt": 1,
        "empty": 1,
        "not_a_file": 1,
        "missing": 1,
        "too_short": 1,
        "empty_caption": 1,
    }
    assert "too_short: 1" in counter.summary()


def test_collate_rejects_mixed_shapes(clip_folder):
    _, records = clip_folder
    dataset = VideoTextDataset(records, num_frames=4, size=(16, 16))
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_clips([dataset[(0, (4, 16, 16))], dataset[(1, (2, 16, 16))]])


def test_bucketed_loader_mixes_images_and_videos(clip_folder):
    folder, records = clip_folder
    manifest = write_manifest(folder / "m.jsonl", records)
    dataset = VideoTextDataset(manifest, fps=5)
    spec = BucketSpec(sizes=((16, 16), (16, 32)), frame_counts=(4, 8), default_batch_size=1)
    keys = dataset.bucket_keys(spec)
    # 40 frames at 10 fps sampled at 5 fps give 20 frames: the 8-frame bucket.
    assert keys == [(8, 16, 16)] * 3 + [(1, 16, 16)]
    loader, sampler = build_loader(
        dataset, spec, image_fraction=0.25, video_frames_as_images=True, num_workers=0
    )
    shapes = [tuple(batch["video"].shape) for batch in loader]
    assert shapes.count((1, 3, 1, 16, 16)) == 1
    assert shapes.count((1, 3, 8, 16, 16)) == 3
    assert sampler.state_dict()["offset"] == len(shapes)


def test_bad_arguments(clip_folder):
    _, records = clip_folder
    with pytest.raises(ValueError, match="num_frames"):
        VideoTextDataset(records, num_frames=0)
    with pytest.raises(ValueError, match="size"):
        VideoTextDataset(records, size=(0, 16))
    with pytest.raises(ValueError, match="fps"):
        VideoTextDataset(records, fps=-1)
    with pytest.raises(ValueError, match="cache_mib"):
        VideoTextDataset(records, cache_mib=-1)


def test_decoded_window_cache_returns_the_same_clips_and_respects_its_cap(clip_folder, monkeypatch):
    _, records = clip_folder
    import moviegen.data.dataset as dataset_module

    decoded = []
    real_read = dataset_module.read_video

    def counting_read(path, **window):
        decoded.append((str(path), window.get("start_frame")))
        return real_read(path, **window)

    monkeypatch.setattr(dataset_module, "read_video", counting_read)
    plain = VideoTextDataset(records, num_frames=4, size=(16, 16), seed=5)
    # One 4-frame 16x16 window is 3 KiB: room for two of them, not three; far too
    # little to keep the 360 KiB sources whole, so windows are what it caches.
    cached = VideoTextDataset(records, num_frames=4, size=(16, 16), seed=5, cache_mib=7 / 1024)
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in (0, 1, 0, 1, 2):
            torch.testing.assert_close(cached[index]["video"], plain[index]["video"])
    assert cached._cached_bytes <= 7 * 1024
    # Every request of `plain` decodes (15); `cached` decodes each window of an
    # epoch once (3 per epoch: the third evicts the first), as the windows move.
    decoded_by_cached = len(decoded) - 15
    assert decoded_by_cached == 9
    # A cap below one window caches nothing and still returns the clip.
    tiny = VideoTextDataset(records, num_frames=4, size=(16, 16), cache_mib=1 / 1024)
    assert tensor_indices(tiny[(0, (4, 16, 16))]["video"]) == tensor_indices(
        tiny[(0, (4, 16, 16))]["video"]
    )
    assert tiny._cached_bytes == 0


def test_short_clips_are_cached_whole_and_cut_like_a_fresh_decode(clip_folder, monkeypatch):
    _, records = clip_folder
    import moviegen.data.dataset as dataset_module

    decoded = []
    real_read = dataset_module.read_video

    def counting_read(path, **window):
        decoded.append(str(path))
        return real_read(path, **window)

    # Each 40-frame 64x48 source is 360 KiB: an 8 MiB cache keeps such clips whole.
    for fps in (None, 5):
        plain = VideoTextDataset(records, num_frames=4, size=(16, 16), fps=fps, seed=5)
        cached = VideoTextDataset(
            records, num_frames=4, size=(16, 16), fps=fps, seed=5, cache_mib=8
        )
        monkeypatch.setattr(dataset_module, "read_video", counting_read)
        decoded.clear()
        for epoch in range(3):
            plain.set_epoch(epoch)
            cached.set_epoch(epoch)
            for item in (0, 1, (0, (1, 16, 16)), 2, (1, (1, 16, 16)), (2, (6, 16, 16))):
                want, got = plain[item]["video"], cached[item]["video"]
                assert tensor_indices(got) == tensor_indices(want)
                torch.testing.assert_close(got, want)
        monkeypatch.undo()
        # 18 requests per epoch by `plain`; `cached` decoded each clip once, whole.
        assert len(decoded) - 3 * 6 == 3
        assert sorted(key[1] for key in cached._cache) == ["whole"] * 3

    # A manifest that promises more frames than the file has: the window past
    # the decoded end is skipped as too short, as a fresh decode skips it.
    overstated = [
        ClipRecord(path=records[0].path, caption="c", num_frames=60, fps=10, width=64, height=48)
    ]
    plain = VideoTextDataset(overstated, num_frames=50, size=(16, 16), random_start=False)
    cached = VideoTextDataset(
        overstated, num_frames=50, size=(16, 16), random_start=False, cache_mib=8
    )
    for dataset in (plain, cached):
        skipped = dataset[0]
        assert isinstance(skipped, SkippedSample) and skipped.reason == "too_short"
