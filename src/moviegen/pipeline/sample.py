"""Text-to-video sampling: `moviegen sample`.

The pipeline runs in numbered stages:

1. encode the prompts (FPS prefix, frozen text encoders) and the negative prompt;
2. prepare the noise, one generator per prompt seeded by its own seed, so a
   video depends on its prompt and seed only (not on what it was batched with);
3. solve the flow ODE from t=0 (noise) to t=1 (data) with classifier-free
   guidance on the linear-quadratic schedule (or, with ``eta > 0``, the
   stochastic Euler sampler, whose fresh noise comes from the same per-prompt
   generators);
4. decode the latents with the TAE (tiled above one tile, automatically);
5. write the videos (and ``prompts.jsonl`` when sampling into a folder).

A transformer run records the TAE checkpoint and text encoders it was trained
with, so a checkpoint alone is enough to sample; ``tae=`` overrides the TAE.
Latent statistics come from the TAE checkpoint, never from this module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moviegen.config import atomic_write_text, config_from_dict
from moviegen.data.precompute import concat_text_features, repeat_text_features
from moviegen.data.transforms import add_fps_prefix, to_uint8_frames
from moviegen.data.video_io import write_video
from moviegen.flow import (
    SIGMA_MIN,
    ClassifierFreeGuidance,
    FlowPath,
    build_schedule,
    solve,
    stochastic_euler_solve,
)
from moviegen.flow.guidance import check_interval
from moviegen.tae.checkpoint import load_tae
from moviegen.tae.model import TAE
from moviegen.text import TextConditioner, TextEncoderConfig, TextFeatures, validate_prompt
from moviegen.train.checkpoint import CheckpointManager
from moviegen.transformer.conditioned import TextToVideoModel
from moviegen.transformer.config import TransformerConfig

__all__ = [
    "T2V_KIND",
    "SamplingOptions",
    "TextToVideoPipeline",
    "generate_latents",
    "latent_shape_for",
    "load_t2v",
    "read_prompts_file",
    "sample_to_folder",
]

# Metadata marker written by the text-to-video trainer.
T2V_KIND = "t2v"
# Pixels per latent position of the TAE (8x8 spatially, 8 frames per latent frame).
TAE_COMPRESSION = 8
PROMPTS_INDEX = "prompts.jsonl"


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How videos are generated."""

    num_frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 8.0  # conditioning rate (FPS prefix) and playback rate
    steps: int = 50  # solver steps
    cfg_scale: float = 7.5  # classifier-free guidance (1.0: conditional only)
    # Guide only at flow times in [lo, hi] (0 = noise, 1 = data); conditional elsewhere.
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    schedule: str = "linear_quadratic"
    solver: str = "euler"
    # Stochastic Euler (moviegen.flow.stochastic_euler_solve): the share of the
    # posterior spread drawn afresh each step; 0 solves the ODE. Euler only.
    eta: float = 0.0
    negative_prompt: str = ""  # the unconditional branch of CFG

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta > 0 and self.solver != "euler":
            raise ValueError(
                f"eta > 0 is a stochastic Euler sampler; solver must be 'euler', got {self.solver!r}"
            )
        check_interval(self.cfg_interval)


def latent_shape_for(
    config: TransformerConfig,
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_compression: int = TAE_COMPRESSION,
) -> tuple[int, int, int, int]:
    """The latent ``(C, T', H', W')`` of a ``num_frames x height x width`` video.

    ``temporal_compression`` is the TAE's frames per latent frame (space is
    always compressed by ``TAE_COMPRESSION``). Raises ValueError when the TAE
    and the patching cannot represent the size, or the transformer's position
    tables are too small for it.
    """
    patch_t, patch_h, patch_w = config.patch_size
    for name, pixels, patch in (("height", height, patch_h), ("width", width, patch_w)):
        multiple = TAE_COMPRESSION * patch
        if pixels < multiple or pixels % multiple:
            raise ValueError(
                f"{name} {pixels} cannot be represented: the TAE compresses by "
                f"{TAE_COMPRESSION} and the transformer patches by {patch}, so {name} must be "
                f"a positive multiple of {multiple}"
            )
    frames = math.ceil(num_frames / temporal_compression)
    if num_frames < 1 or frames % patch_t:
        raise ValueError(
            f"{num_frames} frames cannot be represented: the TAE makes one latent frame of "
            f"{temporal_compression} and the transformer patches {patch_t} latent frames, so "
            f"ceil(frames / {temporal_compression}) must be a positive multiple of {patch_t}"
        )
    latent_h, latent_w = height // TAE_COMPRESSION, width // TAE_COMPRESSION
    limits = (
        ("frames", frames, config.max_latent_frames, num_frames, temporal_compression),
        ("height", latent_h, config.max_latent_height, height, TAE_COMPRESSION),
        ("width", latent_w, config.max_latent_width, width, TAE_COMPRESSION),
    )
    for name, latent, limit, pixels, factor in limits:
        if latent > limit:
            raise ValueError(
                f"{name} {pixels} needs {latent} latent positions, but the model's position "
                f"tables hold {limit} (at most {limit * factor} {name})"
            )
    return (config.latent_channels, frames, latent_h, latent_w)


@torch.no_grad()
def generate_latents(
    model: TextToVideoModel,
    text: TextFeatures,
    negative_text: TextFeatures,
    *,
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    steps: int = 50,
    cfg_scale: float = 7.5,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    schedule: str = "linear_quadratic",
    solver: str = "euler",
    eta: float = 0.0,
    path: FlowPath | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Solve the flow ODE for a batch: ``(B, C, T', H', W')`` normalised latents.

    ``text`` and ``negative_text`` hold ``B`` rows each; ``seeds[i]`` fixes the
    noise of row ``i`` (drawn on the CPU, so the same seed gives the same video
    on any device). With ``eta > 0`` the stochastic Euler sampler draws its
    fresh noise from the same per-row generators, after the starting noise;
    ``path`` is the flow path the model was trained on.
    """
    device = next(model.parameters()).device
    text = {name: (h.to(device), m.to(device)) for name, (h, m) in text.items()}
    negative_text = {name: (h.to(device), m.to(device)) for name, (h, m) in negative_text.items()}
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw_noise() -> torch.Tensor:
        rows = [torch.randn(tuple(latent_shape), generator=g) for g in generators]
        return torch.stack(rows).to(device)

    noise = draw_noise()

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: TextFeatures) -> torch.Tensor:
        return model(x, t, cond)

    guided = ClassifierFreeGuidance(
        velocity,
        text,
        negative_text,
        cfg_scale,
        concat=concat_text_features,
        interval=cfg_interval,
    )
    grid = build_schedule(schedule, steps)  # float64 on the CPU; the solver casts t
    model.eval()
    if eta > 0:
        if solver != "euler":
            raise ValueError(f"eta > 0 needs solver 'euler', got {solver!r}")
        return stochastic_euler_solve(
            guided,
            noise,
            grid,
            eta=eta,
            noise_fn=lambda x: draw_noise(),
            path=path,
            progress=progress,
        )
    return solve(guided, noise, grid, method=solver, progress=progress)


def load_t2v(
    checkpoint: str | os.PathLike, *, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[TextToVideoModel, dict]:
    """A trained text-to-video model and its checkpoint metadata."""
    path = CheckpointManager.resolve(checkpoint)
    loaded = CheckpointManager.load(path, map_location=map_location)
    metadata = loaded.metadata or {}
    if metadata.get("kind") != T2V_KIND:
        raise ValueError(
            f"{path} is not a text-to-video checkpoint (metadata kind={metadata.get('kind')!r})"
        )
    config = config_from_dict(TransformerConfig, metadata["config"]["model"], path="model")
    model = TextToVideoModel(config, metadata["precompute"]["text_dims"])
    state = loaded.ema_state if use_ema and loaded.ema_state else loaded.model_state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the recorded config: {error}") from error
    return model.to(map_location).eval(), metadata


class TextToVideoPipeline:
    """Prompts in, videos out; see the module docstring for the stages."""

    def __init__(
        self,
        model: TextToVideoModel,
        tae: TAE,
        conditioner: TextConditioner,
        *,
        fps_prefix: bool = True,
        sigma_min: float = SIGMA_MIN,
    ):
        if not bool(tae.has_latent_stats):
            raise ValueError("the TAE has no latent statistics; run `moviegen tae stats` first")
        self.model = model.eval()
        self.tae = tae.eval()
        self.conditioner = conditioner
        self.fps_prefix = fps_prefix
        self.path = FlowPath(sigma_min)  # the path the model was trained on

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        *,
        tae: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> TextToVideoPipeline:
        """Everything from a transformer run; ``tae`` overrides the recorded TAE."""
        model, metadata = load_t2v(checkpoint, map_location=device)
        precompute = metadata["precompute"]
        tae_path = tae if tae is not None else precompute["tae_checkpoint"]
        try:
            tae_model = load_tae(tae_path, map_location=device)
        except FileNotFoundError as error:
            raise ValueError(
                f"the TAE this model was trained with is not at {tae_path}; pass --tae RUN"
            ) from error
        encoders = [
            config_from_dict(TextEncoderConfig, entry, path="text_encoders")
            for entry in precompute["text_encoders"]
        ]
        conditioner = TextConditioner(encoders).to(device)
        if dict(conditioner.dims) != precompute["text_dims"]:
            raise ValueError(
                f"text encoders give widths {dict(conditioner.dims)}, the model was trained "
                f"with {precompute['text_dims']}"
            )
        return cls(
            model,
            tae_model,
            conditioner,
            fps_prefix=precompute["config"].get("fps_prefix", True),
            sigma_min=metadata["config"].get("sigma_min", SIGMA_MIN),
        )

    # -- stage 1
    def encode_prompts(self, prompts: Sequence[str], fps: float) -> TextFeatures:
        prompts = [validate_prompt(prompt) for prompt in prompts]
        if self.fps_prefix:
            prompts = [add_fps_prefix(prompt, fps) for prompt in prompts]
        return self.conditioner.encode(prompts)

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        options: SamplingOptions = SamplingOptions(),
        progress: bool = False,
    ) -> list[np.ndarray]:
        """Videos ``uint8 (T, H, W, 3)``, one per prompt."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        shape = latent_shape_for(
            self.model.config,
            options.num_frames,
            options.height,
            options.width,
            temporal_compression=self.tae.config.temporal_compression,
        )
        text = self.encode_prompts(prompts, options.fps)  # 1. encode
        negative = self.conditioner.encode([options.negative_prompt])
        negative = repeat_text_features(negative, len(prompts))
        latents = generate_latents(  # 2. noise and 3. solve
            self.model,
            text,
            negative,
            latent_shape=shape,
            seeds=seeds,
            steps=options.steps,
            cfg_scale=options.cfg_scale,
            cfg_interval=options.cfg_interval,
            schedule=options.schedule,
            solver=options.solver,
            eta=options.eta,
            path=self.path,
            progress=progress,
        )
        video = self.tae.decode(  # 4. decode
            latents.to(next(self.tae.parameters()).device),
            num_frames=options.num_frames,
            frame_size=(options.height, options.width),
        )
        return [to_uint8_frames(clip) for clip in video]


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from plain text (one per line) or JSON Lines (``{"prompt": ...}``
    or ``{"caption": ...}`` per line); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
            prompt = entry.get("prompt", entry.get("caption")) if isinstance(entry, dict) else None
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{number}: expected a 'prompt' (or 'caption') string")
            line = prompt
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def sample_to_folder(
    pipeline: TextToVideoPipeline,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    options: SamplingOptions = SamplingOptions(),
    batch_size: int = 16,
    extension: str = ".mp4",
    progress: bool = True,
) -> list[Path]:
    """One video per prompt (prompt ``i`` uses seed ``seed + i``) into
    ``out_dir``, plus ``prompts.jsonl`` lines ``{"path", "prompt", "seed"}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    bar = tqdm(total=len(prompts), desc="sample", unit="video", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        seeds = [seed + start + i for i in range(len(batch))]
        for offset, frames in enumerate(pipeline(batch, seeds=seeds, options=options)):
            index = start + offset
            path = write_video(out / f"{index:04d}{extension}", frames, fps=options.fps)
            paths.append(path)
            lines.append({"path": path.name, "prompt": batch[offset], "seed": seeds[offset]})
        bar.update(len(batch))
    bar.close()
    atomic_write_text(out / PROMPTS_INDEX, "".join(json.dumps(line) + "\n" for line in lines))
    return paths
