"""Parallel training of the transformer: device mesh, FSDP2, activation
checkpointing, compile and context parallel, applied from outside the model.

For now it holds :mod:`moviegen.distributed.planner`, the per-GPU memory and
step-time estimate behind ``moviegen plan``.
"""
