"""Tests for bucket assignment and the bucketed, sharded, resumable batch sampler."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from torch.utils.data import DataLoader, Dataset

from moviegen.data.buckets import BucketBatchSampler, BucketSpec, bucket_summary

WIDE, SQUARE, TALL = (48, 80), (64, 64), (80, 48)
VIDEO_BATCH = 2
IMAGE_BATCH = 4


def make_spec(**overrides) -> BucketSpec:
    fields = dict(
        sizes=(WIDE, SQUARE, TALL),
        frame_counts=(8, 16),
        default_batch_size=VIDEO_BATCH,
        image_batch_size=IMAGE_BATCH,
    )
    fields.update(overrides)
    return BucketSpec(**fields)


def make_keys() -> list:
    """Buckets whose sizes are not multiples of batch_size * world_size for 2 or 3 ranks.

    Interleaved so that bucket membership is not a contiguous index range.
    Tails are at least 3 samples, so no padding is needed and coverage is exact.
    """
    counts = {(16, 64, 64): 23, (8, 48, 80): 10, (16, 80, 48): 11, (1, 64, 64): 7, None: 3}
    pool = [key for key, n in counts.items() for _ in range(n)]
    # A fixed stride permutation (coprime with the length) mixes the buckets.
    stride = 7
    assert len(pool) % stride != 0
    return [pool[(i * stride) % len(pool)] for i in range(len(pool))]


def run_epoch(sampler: BucketBatchSampler) -> list[list[tuple[int, tuple]]]:
    return list(iter(sampler))


def assigned_indices(keys: list) -> list[int]:
    return [i for i, key in enumerate(keys) if key is not None]


# ---------------------------------------------------------------- BucketSpec


def test_assign_picks_nearest_aspect_ratio():
    spec = make_spec()
    assert spec.assign(1920, 1080, 100, False)[1:] == WIDE
    assert spec.assign(1080, 1920, 100, False)[1:] == TALL
    assert spec.assign(500, 500, 100, False)[1:] == SQUARE
    # W/H = 1.31 is nearer 1:1 on a linear scale (0.31 vs 0.36) but nearer 5:3
    # in log space (the geometric midpoint of 1 and 5/3 is 1.29).
    assert spec.assign(131, 100, 100, False)[1:] == WIDE
    assert spec.assign(128, 100, 100, False)[1:] == SQUARE


def test_assign_frames():
    spec = make_spec()
    assert spec.assign(64, 64, 40, False) == (16, 64, 64)
    assert spec.assign(64, 64, 16, False) == (16, 64, 64)
    assert spec.assign(64, 64, 15, False) == (8, 64, 64)
    assert spec.assign(64, 64, 8, False) == (8, 64, 64)
    assert spec.assign(64, 64, 7, False) is None
    assert spec.assign(64, 64, 0, False) is None
    # Images are one-frame videos whatever the frame argument says.
    assert spec.assign(64, 64, 0, True) == (1, 64, 64)
    assert spec.assign(1920, 1080, 1, True) == (1, *WIDE)


def test_assign_rejects_bad_dimensions():
    spec = make_spec()
    with pytest.raises(ValueError, match="width"):
        spec.assign(0, 64, 16, False)
    with pytest.raises(ValueError, match="available_frames"):
        spec.assign(64, 64, -1, False)


def test_batch_size_override_image_and_default():
    spec = make_spec(batch_sizes={(8, 64, 64): 5, (1, 48, 80): 7})
    assert spec.batch_size((8, 64, 64)) == 5
    assert spec.batch_size((1, 48, 80)) == 7
    assert spec.batch_size((1, 64, 64)) == IMAGE_BATCH
    assert spec.batch_size((16, 64, 64)) == VIDEO_BATCH
    assert make_spec(image_batch_size=None).batch_size((1, 64, 64)) == VIDEO_BATCH


def test_spec_normalises_lists():
    spec = make_spec(sizes=[[64, 64]], frame_counts=[16, 8, 16])
    assert spec.sizes == ((64, 64),)
    assert spec.frame_counts == (8, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sizes": ()}, "sizes is empty"),
        ({"sizes": ((64, 0),)}, "width"),
        ({"sizes": ((64,),)}, "height, width"),
        ({"frame_counts": ()}, "frame_counts is empty"),
        ({"frame_counts": (16, -1)}, "frame_counts"),
        ({"default_batch_size": 0}, "default_batch_size"),
        ({"image_batch_size": 0}, "image_batch_size"),
        ({"batch_sizes": {(16, 32, 32): 2}}, "not a bucket"),
        ({"batch_sizes": {(16, 64, 64): 0}}, "batch_sizes"),
    ],
)
def test_spec_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_spec(**overrides)


def test_bucket_summary():
    keys = make_keys()
    assert bucket_summary(keys) == {
        (1, 64, 64): 7,
        (8, 48, 80): 10,
        (16, 64, 64): 23,
        (16, 80, 48): 11,
    }


# ---------------------------------------------------------------- batching


def test_batches_are_single_bucket_and_sized():
    keys = make_keys()
    spec = make_spec()
    sampler = BucketBatchSampler(keys, spec, seed=3)
    assert sampler.num_unassigned == 3
    batches = run_epoch(sampler)
    assert len(batches) == len(sampler)
    short_per_bucket = Counter()
    for batch in batches:
        (key,) = {k for _, k in batch}
        assert all(keys[i] == key for i, _ in batch)
        assert 0 < len(batch) <= spec.batch_size(key)
        if len(batch) < spec.batch_size(key):
            short_per_bucket[key] += 1
    # Only a bucket's tail can be short.
    assert all(n == 1 for n in short_per_bucket.values())
    yielded = sorted(i for batch in batches for i, _ in batch)
    assert yielded == assigned_indices(keys)


def test_same_seed_same_batches_different_seed_different_order():
    keys = make_keys()
    first = run_epoch(BucketBatchSampler(keys, make_spec(), seed=1))
    again = run_epoch(BucketBatchSampler(keys, make_spec(), seed=1))
    other = run_epoch(BucketBatchSampler(keys, make_spec(), seed=2))
    assert first == again
    assert first != other
    # Same samples, just another order.
    assert sorted(i for b in first for i, _ in b) == sorted(i for b in other for i, _ in b)


def test_set_epoch_changes_order_and_is_reproducible():
    keys = make_keys()
    sampler = BucketBatchSampler(keys, make_spec(), seed=1)
    sampler.set_epoch(0)
    epoch0 = run_epoch(sampler)
    sampler.set_epoch(1)
    epoch1 = run_epoch(sampler)
    sampler.set_epoch(0)
    assert epoch0 != epoch1
    assert run_epoch(sampler) == epoch0


def test_shuffle_mixes_within_and_across_buckets():
    keys = make_keys()
    batches = run_epoch(BucketBatchSampler(keys, make_spec(), seed=13))
    batch_keys = [batch[0][1] for batch in batches]
    # Buckets are interleaved, not one after another.
    num_runs = 1 + sum(a != b for a, b in itertools.pairwise(batch_keys))
    assert num_runs > len(bucket_summary(keys))
    # Without in-bucket shuffling every batch would be a run of neighbours in
    # the bucket's index order; shuffled, most batches are not.
    for key in bucket_summary(keys):
        position = {i: p for p, i in enumerate(i for i, k in enumerate(keys) if k == key)}
        spans = [
            max(position[i] for i, _ in b) - min(position[i] for i, _ in b) + 1 - len(b)
            for b in batches
            if b[0][1] == key
        ]
        assert any(span > 0 for span in spans)


def test_no_shuffle_is_sorted_and_in_index_order():
    keys = make_keys()
    batches = run_epoch(BucketBatchSampler(keys, make_spec(), shuffle=False))
    batch_keys = [batch[0][1] for batch in batches]
    assert batch_keys == sorted(batch_keys)
    flat = [i for batch in batches for i, _ in batch]
    for key in bucket_summary(keys):
        in_bucket = [i for i in flat if keys[i] == key]
        assert in_bucket == sorted(in_bucket)


def test_works_as_dataloader_batch_sampler():
    keys = make_keys()

    class EchoDataset(Dataset):
        def __len__(self):
            return len(keys)

        def __getitem__(self, item):
            index, key = item
            return index, key

    sampler = BucketBatchSampler(keys, make_spec(), seed=4)
    loader = DataLoader(EchoDataset(), batch_sampler=sampler, collate_fn=list)
    assert list(loader) == run_epoch(BucketBatchSampler(keys, make_spec(), seed=4))


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_disjoint_cover_everything_equal_length(world_size):
    keys = make_keys()
    spec = make_spec()
    per_rank = [
        run_epoch(BucketBatchSampler(keys, spec, seed=5, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1
    assert lengths == {
        len(BucketBatchSampler(keys, spec, rank=r, world_size=world_size))
        for r in range(world_size)
    }
    # Step j on every rank is one global batch: one bucket, no empty share.
    for step in zip(*per_rank, strict=True):
        assert len({batch[0][1] for batch in step}) == 1
        assert all(len(batch) > 0 for batch in step)
    counts = Counter(i for batches in per_rank for batch in batches for i, _ in batch)
    assert sorted(counts) == assigned_indices(keys)
    assert set(counts.values()) == {1}


def test_tiny_tail_is_padded_so_no_rank_is_empty():
    # One sample in a bucket, three ranks: every rank still gets a batch.
    keys = [(16, 64, 64)] * 6 + [(8, 64, 64)]
    world_size = 3
    per_rank = [
        run_epoch(BucketBatchSampler(keys, make_spec(), seed=0, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1
    for step in zip(*per_rank, strict=True):
        assert all(len(batch) > 0 for batch in step)
    assert {i for batches in per_rank for batch in batches for i, _ in batch} == set(range(7))
    lone = [batch for batches in per_rank for batch in batches if batch[0][1] == (8, 64, 64)]
    assert lone == [[(6, (8, 64, 64))]] * world_size


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_drops_only_tails(world_size):
    keys = make_keys()
    spec = make_spec()
    per_rank = [
        run_epoch(
            BucketBatchSampler(keys, spec, seed=6, rank=r, world_size=world_size, drop_last=True)
        )
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1
    for batches in per_rank:
        assert all(len(batch) == spec.batch_size(batch[0][1]) for batch in batches)
    yielded = Counter(i for batches in per_rank for batch in batches for i, _ in batch)
    assert set(yielded.values()) == {1}
    for key, n in bucket_summary(keys).items():
        global_size = spec.batch_size(key) * world_size
        kept = sum(1 for i in yielded if keys[i] == key)
        assert kept == n - n % global_size


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("consumed", [0, 1, 5, 12])
def test_resume_mid_epoch_yields_exactly_the_rest(consumed):
    keys = make_keys()
    spec = make_spec()
    reference = run_epoch(BucketBatchSampler(keys, spec, seed=7, rank=1, world_size=2))
    sampler = BucketBatchSampler(keys, spec, seed=7, rank=1, world_size=2)
    sampler.set_epoch(0)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(consumed)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "offset": consumed, "seed": 7, "world_size": 2}

    resumed = BucketBatchSampler(keys, spec, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert head + rest == reference
    assert resumed.state_dict()["offset"] == len(resumed)


def test_exhausted_epoch_advances_automatically_and_resumes_across_boundary():
    keys = make_keys()
    spec = make_spec()
    reference = BucketBatchSampler(keys, spec, seed=8)
    reference.set_epoch(1)
    epoch1 = run_epoch(reference)

    sampler = BucketBatchSampler(keys, spec, seed=8)
    run_epoch(sampler)
    end_of_epoch0 = sampler.state_dict()
    assert end_of_epoch0["epoch"] == 0 and end_of_epoch0["offset"] == len(sampler)

    # Without set_epoch the next pass is epoch 1.
    assert run_epoch(sampler) == epoch1
    assert sampler.epoch == 1

    # A checkpoint taken at the very end of epoch 0 resumes into epoch 1 ...
    resumed = BucketBatchSampler(keys, spec, seed=8)
    resumed.load_state_dict(end_of_epoch0)
    assert run_epoch(resumed) == epoch1

    # ... and one taken inside epoch 1 continues it.
    partial = BucketBatchSampler(keys, spec, seed=8)
    partial.load_state_dict({**end_of_epoch0, "epoch": 1, "offset": 3})
    assert run_epoch(partial) == epoch1[3:]


def test_set_epoch_after_exhaustion_wins_over_auto_advance():
    keys = make_keys()
    sampler = BucketBatchSampler(keys, make_spec(), seed=9)
    epoch0 = run_epoch(sampler)
    sampler.set_epoch(0)
    assert run_epoch(sampler) == epoch0


def test_load_state_dict_rejects_mismatch():
    keys = make_keys()
    sampler = BucketBatchSampler(keys, make_spec(), seed=1, world_size=2)
    good = sampler.state_dict()
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({**good, "seed": 2})
    with pytest.raises(ValueError, match="world_size"):
        sampler.load_state_dict({**good, "world_size": 4})
    with pytest.raises(ValueError, match="keys"):
        sampler.load_state_dict({**good, "rank": 0})
    with pytest.raises(ValueError, match="offset"):
        sampler.load_state_dict({**good, "offset": len(sampler) + 1})


# ---------------------------------------------------------------- image/video mix


def mixed_keys() -> list:
    """16 square 16-frame clips, 8 wide 8-frame clips (12 video batches on one rank), 5 images.

    Bucket sizes are multiples of batch_size * 2, so one and two ranks both get
    a whole number of video batches divisible by three.
    """
    return [(16, 64, 64)] * 16 + [(8, 48, 80)] * 8 + [(1, 64, 64)] * 5 + [None]


@pytest.mark.parametrize("world_size", [1, 2])
def test_image_fraction_quarter_with_video_frames(world_size):
    keys = mixed_keys()
    spec = make_spec()
    per_rank = [
        run_epoch(
            BucketBatchSampler(
                keys,
                spec,
                seed=10,
                rank=r,
                world_size=world_size,
                image_fraction=0.25,
                video_frames_as_images=True,
            )
        )
        for r in range(world_size)
    ]
    num_video = 24 // (VIDEO_BATCH * world_size)
    for batches in per_rank:
        is_image = [batch[0][1][0] == 1 for batch in batches]
        assert sum(is_image) == num_video // 3
        assert len(batches) - sum(is_image) == num_video
        # Evenly spread: three video batches, then one image batch, repeatedly.
        assert is_image == [False, False, False, True] * (num_video // 3)
    # All ranks see the same bucket at each step.
    for step in zip(*per_rank, strict=True):
        assert len({batch[0][1] for batch in step}) == 1

    # The image pool holds true images and video samples re-keyed to one frame
    # of their own size; videos themselves are yielded once each in video batches.
    image_items = {item for batches in per_rank for b in batches if b[0][1][0] == 1 for item in b}
    for index, key in image_items:
        assert key == (1, *keys[index][1:])
    video_items = Counter(
        i for batches in per_rank for b in batches if b[0][1][0] != 1 for i, _ in b
    )
    assert sorted(video_items) == list(range(24))
    assert set(video_items.values()) == {1}


def test_small_image_pool_is_cycled_and_reshuffled():
    # 12 video batches need 4 image batches; 5 images make only 2 per cycle.
    keys = mixed_keys()
    sampler = BucketBatchSampler(keys, make_spec(), seed=11, image_fraction=0.25)
    batches = run_epoch(sampler)
    images = [batch for batch in batches if batch[0][1][0] == 1]
    assert len(images) == 4
    assert len(sampler) == 16
    counts = Counter(i for batch in images for i, _ in batch)
    assert set(counts) == {24, 25, 26, 27, 28}
    assert set(counts.values()) == {2}
    first_cycle, second_cycle = images[:2], images[2:]
    assert first_cycle != second_cycle


def test_without_image_fraction_images_are_a_bucket_like_any_other():
    keys = mixed_keys()
    batches = run_epoch(BucketBatchSampler(keys, make_spec(), seed=12))
    image_items = sorted(i for b in batches if b[0][1][0] == 1 for i, _ in b)
    assert image_items == [24, 25, 26, 27, 28]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (3, 2), (0, 0)])
def test_rejects_bad_rank_or_world_size(rank, world_size):
    with pytest.raises(ValueError, match=r"rank|world_size"):
        BucketBatchSampler(make_keys(), make_spec(), rank=rank, world_size=world_size)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.25, 1.5])
def test_rejects_bad_image_fraction(fraction):
    with pytest.raises(ValueError, match="image_fraction"):
        BucketBatchSampler(mixed_keys(), make_spec(), image_fraction=fraction)


def test_rejects_empty_image_pool():
    videos_only = [(16, 64, 64)] * 8
    with pytest.raises(ValueError, match="image pool is empty"):
        BucketBatchSampler(videos_only, make_spec(), image_fraction=0.25)
    # Video frames fill the pool when asked to.
    sampler = BucketBatchSampler(
        videos_only, make_spec(), image_fraction=0.25, video_frames_as_images=True
    )
    assert len(sampler) == 4 + 1


def test_rejects_other_bad_input():
    with pytest.raises(ValueError, match="video_frames_as_images"):
        BucketBatchSampler(mixed_keys(), make_spec(), video_frames_as_images=True)
    with pytest.raises(ValueError, match="no video samples"):
        BucketBatchSampler([(1, 64, 64)] * 8, make_spec(), image_fraction=0.25)
    with pytest.raises(ValueError, match="no batch can be formed"):
        BucketBatchSampler([(16, 64, 64)], make_spec(), drop_last=True)
    with pytest.raises(ValueError, match="no batch can be formed"):
        BucketBatchSampler([None, None], make_spec())
    with pytest.raises(ValueError, match="num_frames, height, width"):
        BucketBatchSampler([(16, 64)], make_spec())
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(make_keys(), make_spec(), seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        BucketBatchSampler(make_keys(), make_spec()).set_epoch(-1)
