"""Loading trained TAEs from run folders or checkpoints."""

from __future__ import annotations

import os

import torch

from moviegen.config import config_from_dict
from moviegen.tae.model import TAE, TAEConfig
from moviegen.train.checkpoint import CheckpointManager

__all__ = ["LATENT_STATS_KEY", "TAE_KIND", "load_tae"]

# Metadata markers written by the TAE trainer and `moviegen tae stats`.
TAE_KIND = "tae"
LATENT_STATS_KEY = "latent_stats"


def load_tae(
    checkpoint: str | os.PathLike,
    *,
    use_ema: bool = True,
    expected_config: TAEConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> TAE:
    """A TAE from a run folder (its latest complete checkpoint) or a checkpoint.

    Args:
        checkpoint: run folder, ``checkpoints/`` folder or one step folder.
        use_ema: load the EMA weights when the checkpoint has them.
        expected_config: raise if the checkpoint was trained with another
            architecture (instead of failing later with shape errors).
        map_location: device for the weights.

    The latent statistics stored by ``moviegen tae stats`` are loaded into the
    model, so :meth:`TAE.encode` / :meth:`TAE.decode` work at once.

    Raises:
        FileNotFoundError: no complete checkpoint there.
        ValueError: not a TAE checkpoint, or another architecture.
    """
    path = CheckpointManager.resolve(checkpoint)
    loaded = CheckpointManager.load(path, map_location=map_location)
    metadata = loaded.metadata or {}
    if metadata.get("kind") != TAE_KIND or "model" not in metadata.get("config", {}):
        raise ValueError(f"{path} is not a TAE checkpoint (metadata kind={metadata.get('kind')!r})")
    config = config_from_dict(TAEConfig, metadata["config"]["model"], path="model")
    if expected_config is not None and expected_config != config:
        raise ValueError(
            f"{path} holds a TAE with config {config}, but {expected_config} was expected"
        )
    model = TAE(config)
    state = loaded.ema_state if use_ema and loaded.ema_state else loaded.model_state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: weights do not match the TAE config it records: {error}"
        ) from error
    stats = metadata.get(LATENT_STATS_KEY)
    if stats is not None:
        model.set_latent_stats(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    return model.to(map_location).eval()
