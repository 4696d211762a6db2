"""Bucketed batch sampling for variable-shape video training.

Movie Gen trains on clips of several aspect ratios and durations, and on images
as one-frame videos. A batch must hold one latent shape, so every sample is put
in a *bucket* ``(num_frames, height, width)`` and every batch is drawn from one
bucket:

* :class:`BucketSpec` lists the allowed output sizes and clip lengths, gives each
  bucket a batch size, and assigns a sample to its bucket
  (:meth:`BucketSpec.assign`).
* :class:`BucketBatchSampler` turns the per-sample buckets into batches of
  ``(sample_index, bucket_key)`` tuples, sharded over data-parallel ranks,
  deterministic from ``(seed, epoch)``, resumable mid-epoch, and optionally
  mixing image and video batches at a fixed ratio.

Use it as a DataLoader's ``batch_sampler``; the dataset's ``__getitem__`` then
receives one ``(sample_index, bucket_key)`` tuple and returns the sample resized
and trimmed to that bucket::

    sampler = BucketBatchSampler(keys, spec, seed=0, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "BucketKey", "BucketSpec", "bucket_summary"]

BucketKey = tuple[int, int, int]
"""``(num_frames, height, width)`` of every sample in a bucket."""

# Images are one-frame videos: their buckets have this many frames.
IMAGE_NUM_FRAMES = 1
# Random streams of one epoch. Every stream is seeded with a tuple of the same
# length, (seed, epoch, stream, cycle), because numpy's SeedSequence maps
# entropy that differs only by trailing zeros (e.g. [1] and [1, 0]) to the same
# state.
_MAIN_STREAM = 0
_IMAGE_STREAM = 1
_STATE_KEYS = frozenset({"epoch", "offset", "seed", "world_size"})


def _as_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def _as_key(name: str, value: object) -> BucketKey:
    """Validate a bucket key; accepts any length-3 sequence (e.g. a list from JSON)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(f"{name} must be (num_frames, height, width), got {value!r}")
    num_frames, height, width = (_as_int(f"{name}[{i}]", v, minimum=1) for i, v in enumerate(value))
    return (num_frames, height, width)


@dataclass(frozen=True, kw_only=True)
class BucketSpec:
    """Which buckets exist and how big their batches are.

    A bucket is ``(num_frames, height, width)`` with ``(height, width)`` one of
    ``sizes`` and ``num_frames`` one of ``frame_counts`` (videos) or 1 (images).
    """

    # Allowed output (height, width) sizes, e.g. ((64, 64),) or several aspect
    # ratios such as ((48, 80), (64, 64), (80, 48)).
    sizes: tuple[tuple[int, int], ...]
    # Allowed video lengths in frames, e.g. (16,) or (8, 16, 32). Stored sorted.
    frame_counts: tuple[int, ...]
    # Batch size of every bucket without an entry in ``batch_sizes``.
    default_batch_size: int
    # Per-bucket batch sizes, e.g. smaller batches for longer clips so that
    # tokens per batch stay roughly constant. Keys must be buckets of this spec.
    batch_sizes: dict[BucketKey, int] | None = None
    # Batch size of one-frame (image) buckets; None means ``default_batch_size``.
    # ``batch_sizes`` entries take precedence.
    image_batch_size: int | None = None

    def __post_init__(self) -> None:
        # Normalised copies: lists from a JSON/YAML config become tuples, and the
        # caller's dict cannot change the spec after construction.
        if isinstance(self.sizes, str) or not isinstance(self.sizes, Sequence):
            raise TypeError(f"sizes must be a sequence of (height, width), got {self.sizes!r}")
        if len(self.sizes) == 0:
            raise ValueError("sizes is empty: give at least one (height, width) output size")
        sizes = []
        for i, size in enumerate(self.sizes):
            if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
                raise ValueError(f"sizes[{i}] must be (height, width), got {size!r}")
            height = _as_int(f"sizes[{i}] height", size[0], minimum=1)
            width = _as_int(f"sizes[{i}] width", size[1], minimum=1)
            sizes.append((height, width))
        object.__setattr__(self, "sizes", tuple(sizes))

        if isinstance(self.frame_counts, str) or not isinstance(self.frame_counts, Sequence):
            raise TypeError(f"frame_counts must be a sequence of ints, got {self.frame_counts!r}")
        if len(self.frame_counts) == 0:
            raise ValueError("frame_counts is empty: give at least one video length in frames")
        frame_counts = {
            _as_int(f"frame_counts[{i}]", n, minimum=1) for i, n in enumerate(self.frame_counts)
        }
        object.__setattr__(self, "frame_counts", tuple(sorted(frame_counts)))

        object.__setattr__(
            self,
            "default_batch_size",
            _as_int("default_batch_size", self.default_batch_size, minimum=1),
        )
        if self.image_batch_size is not None:
            object.__setattr__(
                self,
                "image_batch_size",
                _as_int("image_batch_size", self.image_batch_size, minimum=1),
            )

        if self.batch_sizes is not None:
            if not isinstance(self.batch_sizes, Mapping):
                raise TypeError(f"batch_sizes must be a dict, got {type(self.batch_sizes)}")
            batch_sizes = {}
            for raw_key, value in self.batch_sizes.items():
                key = _as_key(f"batch_sizes key {raw_key!r}", raw_key)
                # An entry for a bucket the spec never produces is almost
                # certainly a typo; fail instead of silently ignoring it.
                if not self.is_bucket(key):
                    raise ValueError(
                        f"batch_sizes has an entry for {key}, which is not a bucket of this "
                        f"spec (sizes {self.sizes}, frame_counts {self.frame_counts} or "
                        f"{IMAGE_NUM_FRAMES} for images)"
                    )
                batch_sizes[key] = _as_int(f"batch_sizes[{key}]", value, minimum=1)
            object.__setattr__(self, "batch_sizes", batch_sizes)

    def is_bucket(self, key: BucketKey) -> bool:
        """Whether ``key`` is a bucket this spec can produce."""
        num_frames, height, width = key
        frames_ok = num_frames == IMAGE_NUM_FRAMES or num_frames in self.frame_counts
        return frames_ok and (height, width) in self.sizes

    def assign(
        self, width: int, height: int, available_frames: int, is_image: bool
    ) -> BucketKey | None:
        """The bucket of a sample of ``width`` x ``height`` pixels.

        The output size is the one whose aspect ratio (W/H) is nearest in log
        space, so that 2:1 and 1:2 are equally far from 1:1 (ties go to the size
        listed first). Images get ``num_frames == 1``; videos get the largest
        frame count ``<= available_frames``, so as much of the clip as possible
        is used, or None when the clip is shorter than every frame count.
        ``available_frames`` is ignored for images.
        """
        width = _as_int("width", width, minimum=1)
        height = _as_int("height", height, minimum=1)
        log_aspect = math.log(width / height)
        out_height, out_width = min(
            self.sizes, key=lambda size: abs(math.log(size[1] / size[0]) - log_aspect)
        )
        if is_image:
            return (IMAGE_NUM_FRAMES, out_height, out_width)
        available_frames = _as_int("available_frames", available_frames, minimum=0)
        fitting = [n for n in self.frame_counts if n <= available_frames]
        if not fitting:
            return None
        return (fitting[-1], out_height, out_width)

    def batch_size(self, key: BucketKey) -> int:
        """Per-rank batch size of bucket ``key``.

        ``batch_sizes[key]`` if given, else ``image_batch_size`` for one-frame
        buckets (when set), else ``default_batch_size``.
        """
        if self.batch_sizes is not None and key in self.batch_sizes:
            return self.batch_sizes[key]
        if key[0] == IMAGE_NUM_FRAMES and self.image_batch_size is not None:
            return self.image_batch_size
        return self.default_batch_size


def bucket_summary(bucket_keys: Sequence[BucketKey | None]) -> dict[BucketKey, int]:
    """Number of samples per bucket, sorted by key; unassigned (None) samples are left out."""
    counts = Counter(tuple(key) for key in bucket_keys if key is not None)
    return dict(sorted(counts.items()))


class BucketBatchSampler(Sampler[list[tuple[int, BucketKey]]]):
    """Batches of ``(sample_index, bucket_key)``, each batch from one bucket.

    Args:
        bucket_keys: ``bucket_keys[i]`` is the bucket of sample ``i`` (e.g. from
            :meth:`BucketSpec.assign`), or None for a sample that cannot be used
            (too short, unreadable); None samples are never yielded and are
            counted in :attr:`num_unassigned`.
        spec: gives each bucket its per-rank batch size.
        seed: non-negative; with the epoch it fixes the whole epoch.
        rank, world_size: this process's data-parallel rank and their number.
        shuffle: shuffle samples within buckets and batches across buckets. When
            False, buckets come in sorted key order and samples in index order.
        drop_last: drop each bucket's tail (fewer than ``batch_size * world_size``
            samples) instead of yielding smaller batches.
        image_fraction: in (0, 1). When given, image batches (one-frame buckets)
            are interleaved to make up this fraction of the epoch's batches,
            evenly spread (0.25 = one image batch after every three video
            batches, as in the Movie Gen paper). When None, one-frame buckets are
            batched like any other bucket.
        video_frames_as_images: with ``image_fraction``, also put every video
            sample into the image pool, re-keyed to the one-frame bucket of its
            (height, width): the dataset then returns one frame of the clip.

    **Epoch construction** (the same on every rank, from ``(seed, epoch)`` only):
    each bucket's samples are shuffled and cut into global batches of
    ``batch_size(key) * world_size``; rank ``r`` takes the contiguous slice
    ``[r * B, (r + 1) * B)`` of each. A bucket's tail is dropped when
    ``drop_last``; otherwise it is split over the ranks as evenly as possible
    (``np.array_split``), so ranks stay disjoint and together cover every sample;
    only a tail with fewer samples than ranks is padded with other samples of
    the same bucket so that no rank gets an empty batch. Global batches of all
    buckets are then shuffled. Every rank therefore gets the same number of
    batches (collectives in distributed training would deadlock otherwise).

    **Image/video mixing**: with ``image_fraction = f`` the epoch has ``V``
    video batches (built as above from buckets with more than one frame) and
    ``round(V * f / (1 - f))`` image batches. Image batches come from cycling
    through the image pool, each cycle batched as above and reshuffled, so a
    small image set is repeated and a large one is sampled afresh each epoch.

    **Resume**: :meth:`state_dict` records the epoch and ``offset``, the number
    of batches this sampler has yielded in that epoch; after
    :meth:`load_state_dict` iteration continues with exactly the remaining
    batches. A DataLoader fetches indices ahead of the training loop
    (``prefetch_factor * num_workers`` batches), so the sampler's own offset runs
    ahead of training: a trainer should count the batches it has consumed and
    save ``{**sampler.state_dict(), "offset": consumed}`` instead.

    **Epochs**: once an epoch has been fully yielded the next ``__iter__`` starts
    the next epoch (epoch + 1, offset 0) unless :meth:`set_epoch` was called in
    between. ``len()`` is the number of batches per rank in an epoch (the same
    for every epoch); after a mid-epoch resume the first iteration yields
    ``len() - offset`` batches. The sampler holds the position, so do not
    iterate it from two places at once.
    """

    def __init__(
        self,
        bucket_keys: Sequence[BucketKey | None],
        spec: BucketSpec,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        image_fraction: float | None = None,
        video_frames_as_images: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(spec, BucketSpec):
            raise TypeError(f"spec must be a BucketSpec, got {type(spec)}")
        self.spec = spec
        self.seed = _as_int("seed", seed, minimum=0)
        self.world_size = _as_int("world_size", world_size, minimum=1)
        self.rank = _as_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size); got rank={self.rank}, "
                f"world_size={self.world_size}"
            )
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if image_fraction is not None and not 0.0 < image_fraction < 1.0:
            raise ValueError(
                f"image_fraction must be in (0, 1) or None, got {image_fraction!r} "
                "(e.g. 0.25 for one image batch per three video batches)"
            )
        if video_frames_as_images and image_fraction is None:
            raise ValueError(
                "video_frames_as_images only applies to the image pool of image_fraction; "
                "set image_fraction too"
            )
        self.image_fraction = image_fraction
        self.video_frames_as_images = bool(video_frames_as_images)

        groups: dict[BucketKey, list[int]] = {}
        self.num_unassigned = 0
        for index, raw_key in enumerate(bucket_keys):
            if raw_key is None:
                self.num_unassigned += 1
                continue
            key = _as_key(f"bucket_keys[{index}]", raw_key)
            groups.setdefault(key, []).append(index)
        # Sorted so that the random draws map to buckets identically on every
        # rank and in every run.
        all_groups = {key: np.asarray(groups[key], dtype=np.int64) for key in sorted(groups)}

        if image_fraction is None:
            self._main_groups = all_groups
            self._image_groups: dict[BucketKey, np.ndarray] = {}
        else:
            self._main_groups = {k: v for k, v in all_groups.items() if k[0] != IMAGE_NUM_FRAMES}
            image_lists = {k: [v] for k, v in all_groups.items() if k[0] == IMAGE_NUM_FRAMES}
            if video_frames_as_images:
                for (_, height, width), indices in self._main_groups.items():
                    image_lists.setdefault((IMAGE_NUM_FRAMES, height, width), []).append(indices)
            self._image_groups = {
                key: np.concatenate(image_lists[key]) for key in sorted(image_lists)
            }
            if not self._image_groups:
                raise ValueError(
                    "image_fraction is set but the image pool is empty: no sample is in a "
                    "one-frame bucket (pass video_frames_as_images=True to use video frames)"
                )
            if not self._main_groups:
                raise ValueError(
                    "image_fraction is set but there are no video samples; the epoch "
                    "length is set by the video batches (use image_fraction=None for "
                    "image-only training)"
                )

        num_main = sum(self._num_global_batches(k, len(v)) for k, v in self._main_groups.items())
        if num_main == 0:
            raise ValueError(
                f"no batch can be formed from {len(all_groups)} bucket(s) "
                f"({len(bucket_keys) - self.num_unassigned} assigned samples): every bucket "
                "is smaller than batch_size * world_size and drop_last=True, or no sample "
                "has a bucket"
            )
        if image_fraction is None:
            self._num_image_batches = 0
        else:
            self._num_image_batches = math.floor(
                num_main * image_fraction / (1.0 - image_fraction) + 0.5
            )
            per_cycle = sum(
                self._num_global_batches(k, len(v)) for k, v in self._image_groups.items()
            )
            if per_cycle == 0:
                raise ValueError(
                    "the image pool cannot fill one batch: every image bucket is smaller "
                    "than batch_size * world_size and drop_last=True"
                )
        self._num_batches = num_main + self._num_image_batches

        self._epoch = 0
        self._offset = 0
        self._plan_epoch: int | None = None
        self._plan: list[tuple[BucketKey, np.ndarray]] = []

    # ----------------------------------------------------------------- position
    @property
    def epoch(self) -> int:
        """The epoch being (or last) iterated."""
        return self._epoch

    @property
    def offset(self) -> int:
        """Batches already yielded in the current epoch."""
        return self._offset

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next ``__iter__``."""
        self._epoch = _as_int("epoch", epoch, minimum=0)
        self._offset = 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "offset", "seed", "world_size"}``; see the class docstring on prefetching."""
        return {
            "epoch": self._epoch,
            "offset": self._offset,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly with a corrected offset).

        The seed and world size must match this sampler's, since the batches of
        an epoch depend on both; resuming on a different number of ranks would
        silently repeat or skip samples.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state)}")
        if set(state) != _STATE_KEYS:
            raise ValueError(
                f"sampler state must have exactly the keys {sorted(_STATE_KEYS)}, "
                f"got {sorted(state)}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']} but this sampler has "
                f"seed={self.seed}; the resumed epoch would not match the saved one"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"sampler state was saved with world_size={state['world_size']} but this "
                f"sampler has world_size={self.world_size}; resuming mid-epoch on a "
                "different number of ranks would repeat or skip samples"
            )
        epoch = _as_int("state['epoch']", state["epoch"], minimum=0)
        offset = _as_int("state['offset']", state["offset"], minimum=0)
        if offset > self._num_batches:
            raise ValueError(
                f"state['offset']={offset} exceeds the {self._num_batches} batches per epoch "
                "of this sampler; was it saved for a different dataset or spec?"
            )
        self._epoch = epoch
        self._offset = offset

    # ---------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[tuple[int, BucketKey]]]:
        if self._offset >= self._num_batches:
            self._epoch += 1
            self._offset = 0
        plan = self._epoch_plan(self._epoch)
        while self._offset < len(plan):
            key, indices = plan[self._offset]
            # Counted before yielding: offset means "handed out", so a state
            # saved while the consumer holds this batch does not repeat it.
            self._offset += 1
            yield [(index, key) for index in indices.tolist()]

    def _num_global_batches(self, key: BucketKey, num_samples: int) -> int:
        global_size = self.spec.batch_size(key) * self.world_size
        num_full, tail = divmod(num_samples, global_size)
        return num_full + (1 if tail and not self.drop_last else 0)

    def _rng(self, epoch: int, stream: int, cycle: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, stream, cycle))

    def _rank_batches(
        self, groups: dict[BucketKey, np.ndarray], rng: np.random.Generator
    ) -> list[tuple[BucketKey, np.ndarray]]:
        """This rank's share of every global batch of ``groups``, in epoch order."""
        batches: list[tuple[BucketKey, np.ndarray]] = []
        rank, world = self.rank, self.world_size
        for key, indices in groups.items():
            order = rng.permutation(indices) if self.shuffle else indices
            size = self.spec.batch_size(key)
            global_size = size * world
            num_full = len(order) // global_size
            for start in range(0, num_full * global_size, global_size):
                batches.append((key, order[start + rank * size : start + (rank + 1) * size]))
            tail = order[num_full * global_size :]
            if len(tail) == 0 or self.drop_last:
                continue
            if len(tail) < world:
                # np.resize repeats the bucket cyclically: the padding is real
                # samples of this shape, and no rank is left with an empty batch.
                tail = np.concatenate([tail, np.resize(order, world - len(tail))])
            batches.append((key, np.array_split(tail, world)[rank]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _epoch_plan(self, epoch: int) -> list[tuple[BucketKey, np.ndarray]]:
        """All of this rank's batches of ``epoch`` (cached for the current epoch)."""
        if self._plan_epoch == epoch:
            return self._plan
        plan = self._rank_batches(self._main_groups, self._rng(epoch, _MAIN_STREAM, 0))
        if self._num_image_batches:
            images: list[tuple[BucketKey, np.ndarray]] = []
            cycle = 0
            while len(images) < self._num_image_batches:
                rng = self._rng(epoch, _IMAGE_STREAM, cycle)
                images.extend(self._rank_batches(self._image_groups, rng))
                cycle += 1
            plan = self._interleave(plan, images[: self._num_image_batches])
        assert len(plan) == self._num_batches, (len(plan), self._num_batches)
        self._plan_epoch, self._plan = epoch, plan
        return plan

    @staticmethod
    def _interleave(videos: list, images: list) -> list:
        """Spread ``images`` evenly among ``videos``.

        Position ``j`` of ``n`` holds an image batch when ``floor((j + 1) * i / n)``
        steps up (Bresenham's line), so every window of ``n / i`` batches holds
        one image batch; for a quarter images: video, video, video, image, ...
        """
        total = len(videos) + len(images)
        video_iter, image_iter = iter(videos), iter(images)
        merged = []
        for j in range(total):
            is_image = (j + 1) * len(images) // total > j * len(images) // total
            merged.append(next(image_iter) if is_image else next(video_iter))
        return merged
