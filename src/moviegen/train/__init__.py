"""Training: trainers (TAE, text-to-video) and the utilities they share.

Shared utilities, free of ``torch.distributed`` so they work in one process:
``checkpoint`` (atomic, resumable checkpoints), ``ema`` (fp32 exponential
moving average of weights), ``schedule`` (learning-rate warmup and decay),
``logging`` (CSV/TensorBoard scalars and loss-curve plots) and ``rng``
(capture/restore of every random generator for bit-exact resume).
"""
