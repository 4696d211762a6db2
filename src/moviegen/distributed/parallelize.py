"""Parallelise the Movie Gen transformer from outside the model (torchtitan's ``parallelize``).

:func:`parallelize_transformer` applies, in this order:

1. **context parallel** (cp > 1): ``moviegen.distributed.context_parallel.apply_context_parallel``;
2. **activation checkpointing** of the repeated blocks (``checkpoint_wrapper``;
   ``full``, every k-th block, or per operator);
3. **per-block ``torch.compile``**, in place (``block.compile()``), so that
   parameter names do not gain an ``_orig_mod.`` prefix;
4. **FSDP2**: ``fully_shard`` on every block, then on the root.

The model is found by its declared capabilities, not by its class: the first
submodule with a ``block_class`` attribute and a ``blocks`` ModuleList is the
transformer (``MovieGenTransformer`` itself, or ``TextToVideoModel.transformer``).

Mixed precision (:class:`~torch.distributed.fsdp.MixedPrecisionPolicy`): the
blocks compute and all-gather in ``config.compute_dtype`` (bf16 on CUDA) and
hand fp32 back; everything outside the blocks (patch embedding, position
tables, timestep MLP and modulation, final layer, text projections) computes in
fp32. That keeps the model's declared ``fp32_modules`` in fp32, keeps ``t`` out
of bf16 (whose 8-bit mantissa cannot resolve ``1000 t``), and costs little:
those layers are well under 1% of the FLOPs. Sharded weights, gradients and
optimizer state are fp32 whatever the compute dtype; gradients are reduced in
``config.reduce_dtype``.

Meta-device construction (:func:`build_parallel_model`): build under
``torch.device("meta")``, parallelise, ``to_empty``, then ``init_weights()``
under a seed, with every random in-place op on a sharded parameter drawn for
the *full* tensor and then sliced (:func:`init_parallel_weights`). The
guarantee: **the gathered parameters equal those of one process that calls
``torch.manual_seed(seed); model.init_weights()``** on the same device type,
for any mesh; in particular every rank initialises its replicas identically.
The cost is one full parameter at a time of transient memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moviegen.distributed import _PARALLELIZE_NAMES
from moviegen.distributed.mesh import SELECTIVE_OP, ParallelConfig, cp_mesh, fsdp_mesh

# Listed by the package, which serves these names without importing this module.
__all__ = list(_PARALLELIZE_NAMES)

# Operators whose outputs per-operator selective AC keeps: the FLOP-heavy
# matmuls and attention kernels. Everything else in a block (norms,
# modulation, SiLU, gates, residual adds) is recomputed in backward.
_SAC_SAVED_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


# --------------------------------------------------------------------------- pieces


def find_transformer(model: nn.Module) -> nn.Module:
    """The submodule whose ``blocks`` are the unit of AC, compile and FSDP.

    It is the first module (``model`` itself included) that declares a
    ``block_class`` and holds its blocks in a ``blocks`` ``nn.ModuleList``.
    """
    for module in model.modules():
        if hasattr(type(module), "block_class") and isinstance(
            getattr(module, "blocks", None), nn.ModuleList
        ):
            return module
    raise TypeError(
        f"{type(model).__name__} has no submodule declaring `block_class` with a `blocks` "
        "ModuleList (as MovieGenTransformer does); nothing to parallelise"
    )


def _saved_ops() -> frozenset:
    # Kernels missing from this build (e.g. cuDNN attention on CPU wheels) are skipped.
    ops = (getattr(torch.ops.aten, name, None) for name in _SAC_SAVED_OP_NAMES)
    return frozenset(op.default for op in ops if op is not None)


def _sac_policy(saved: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(transformer: nn.Module, config: ParallelConfig) -> None:
    """Wrap the blocks of ``transformer`` in place for ``config.activation_checkpointing``.

    ``state_dict()`` keys are unchanged (the wrapper strips its own prefix);
    ``named_parameters()`` gain ``._checkpoint_wrapped_module``. RNG state is
    not preserved for the recomputation: the blocks have no dropout.
    """
    mode = config.activation_checkpointing
    if mode == "none":
        return
    option = config.selective_ac_option
    every = 1 if mode == "full" or option == SELECTIVE_OP else option
    wrapper_kwargs = {"preserve_rng_state": False}
    if mode == "selective" and option == SELECTIVE_OP:
        policy = functools.partial(_sac_policy, _saved_ops())
        wrapper_kwargs["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, policy
        )
    for index, block in enumerate(transformer.blocks):
        if index % every == 0:
            transformer.blocks[index] = checkpoint_wrapper(block, **wrapper_kwargs)


def apply_compile(transformer: nn.Module) -> None:
    """``torch.compile`` every block in place: one graph per block shape, reused by all."""
    for block in transformer.blocks:
        block.compile(fullgraph=True)


def apply_fsdp(
    model: nn.Module, transformer: nn.Module, mesh: DeviceMesh, config: ParallelConfig
) -> None:
    """``fully_shard`` every block, then ``model`` (the root), with the mixed precision
    described in the module docstring. ``mesh`` is the FSDP mesh (:func:`fsdp_mesh`)."""
    config = config.resolve(mesh.size())  # the FSDP mesh spans every rank
    compute = config.compute_dtype(mesh.device_type)
    reduce = config.gradient_reduce_dtype
    block_policy = MixedPrecisionPolicy(
        param_dtype=compute,
        reduce_dtype=reduce,
        # Hand fp32 back so the fp32 layers after the blocks see fp32 inputs.
        output_dtype=torch.float32 if compute != torch.float32 else None,
    )
    # The root casts floating inputs (latents, t, text) to fp32, its compute dtype.
    root_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=reduce)
    last = len(transformer.blocks) - 1
    for index, block in enumerate(transformer.blocks):
        # The last block is needed again at once by backward: keep it gathered.
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    if config.context_parallel_degree > 1:
        _sum_over_context_parallel(model, config, mesh.device_type)


def _sum_over_context_parallel(model: nn.Module, config: ParallelConfig, device_type: str) -> None:
    """Make FSDP's gradient reduction sum over the cp ranks and average over the rest.

    Each cp rank's gradients are partial sums over its slice of the same
    samples (see ``moviegen.distributed.context_parallel``), so the right
    gradient is their sum; FSDP's default would average over every rank of
    its mesh, cp ones included, and come out ``cp`` times too small.
    """
    data_parallel = float(config.dp_replicate * config.dp_shard)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(data_parallel)
            if device_type == "cpu":
                # gloo has no pre-multiplied sum: reduce with SUM, divide after.
                module.set_force_sum_reduction_for_comms(True)


def parallelize_transformer(
    model: nn.Module, mesh: DeviceMesh, config: ParallelConfig
) -> nn.Module:
    """Apply CP -> AC -> compile -> FSDP2 to ``model`` in place; returns ``model``.

    Args:
        model: a ``MovieGenTransformer`` or a module containing one (``TextToVideoModel``),
            on the ``meta`` device or already on the mesh's device.
        mesh: the ``(dp_replicate, dp_shard, cp)`` mesh from :func:`build_mesh`.
        config: the parallel config; its degrees must match ``mesh``.

    Raises:
        ValueError: ``config`` does not match ``mesh``, or ``model`` is already sharded.
        TypeError: ``model`` has no transformer blocks.
    """
    config = config.resolve(mesh.size())
    if tuple(mesh.shape) != config.degrees:
        raise ValueError(
            f"mesh shape {tuple(mesh.shape)} does not match the config's "
            f"(dp_replicate, dp_shard, cp) = {config.degrees}"
        )
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise ValueError("model is already sharded; parallelize_transformer applies once")
    transformer = find_transformer(model)
    if config.context_parallel_degree > 1:
        # Imported here: the module is optional until context parallel is needed.
        from moviegen.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(transformer, cp_mesh(mesh))
    apply_activation_checkpointing(transformer, config)
    if config.compile:
        apply_compile(transformer)
    apply_fsdp(model, transformer, fsdp_mesh(mesh, config), config)
    return model


# --------------------------------------------------------------------------- init


class _FullTensorRandomInit(TorchDispatchMode):
    """Draw random fills of sharded tensors for the full tensor, keep the local shard.

    Every rank consumes its generator exactly as one process filling the whole
    tensor would, so a seeded ``init_weights()`` gives the same parameters
    sharded or not. (DTensor's own random ops give shard-dependent streams on
    CUDA and per-rank duplicates on CPU: neither equals an unsharded init.)
    Works at the aten level, so every ``nn.init`` function is covered; a plain
    tensor copied into a sharded one (``param.copy_(full)``) also keeps its shard.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten.copy_.default
            and isinstance(args[0], DTensor)
            and not isinstance(args[1], DTensor)
        ):
            # A whole tensor copied into a sharded one (e.g. a computed table):
            # keep this rank's shard of it.
            return self._keep_shard(args[0], args[1])
        is_random = torch.Tag.nondeterministic_seeded in func.tags
        if not is_random or not any(isinstance(arg, DTensor) for arg in args):
            return func(*args, **kwargs)
        target = args[0]
        if torch.Tag.inplace not in func.tags or not isinstance(target, DTensor):
            raise NotImplementedError(
                f"init_weights() used {func} on a sharded tensor; only in-place random "
                "fills (normal_, uniform_, ...) can be initialised shard by shard"
            )
        full = torch.empty(target.shape, dtype=target.dtype, device=target.device)
        func(full, *args[1:], **kwargs)
        return self._keep_shard(target, full)

    @staticmethod
    def _keep_shard(target: DTensor, full: torch.Tensor) -> DTensor:
        """Copy this rank's shard of the unsharded ``full`` into ``target``."""
        full = full.to(device=target.device, dtype=target.dtype)
        # src_data_rank=None: every rank slices its own copy, no communication.
        shard = distribute_tensor(
            full, target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(shard)
        return target


def init_parallel_weights(model: nn.Module, seed: int) -> None:
    """``torch.manual_seed(seed); model.init_weights()`` on a (possibly sharded) model.

    The result equals that of one process running the same two calls on an
    unsharded copy on the same device type. The caller's RNG state is restored.
    """
    if not callable(getattr(model, "init_weights", None)):
        raise TypeError(f"{type(model).__name__} has no init_weights() to initialise it with")
    device = next(model.parameters()).device
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        with torch.no_grad(), _FullTensorRandomInit():
            model.init_weights()


def build_parallel_model(
    factory: Callable[[], nn.Module],
    mesh: DeviceMesh,
    config: ParallelConfig,
    device: torch.device | str,
    *,
    seed: int,
) -> nn.Module:
    """Build ``factory()`` on ``meta``, parallelise it, materialise it on ``device``, initialise.

    Args:
        factory: builds the unsharded model, e.g.
            ``lambda: TextToVideoModel(config, text_dims)``; called under
            ``torch.device("meta")``, so it allocates nothing.
        mesh: the mesh from :func:`build_mesh`.
        config: the parallel config.
        device: where this rank's shards live (``cuda:<local rank>`` or ``cpu``).
        seed: initialisation seed; see :func:`init_parallel_weights` for the guarantee.

    Returns:
        The sharded, initialised model: each rank holds one FSDP shard of every parameter.
    """
    with torch.device("meta"):
        model = factory()
    parallelize_transformer(model, mesh, config)
    model.to_empty(device=device)
    init_parallel_weights(model, seed)
    return model


# --------------------------------------------------------------------------- frozen


def place_frozen_module(
    module: nn.Module,
    device: torch.device | str,
    *,
    mesh: DeviceMesh | None = None,
    shard_units: Sequence[nn.Module] = (),
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Freeze a module that is not trained (text encoder, TAE) and put it where it runs.

    Without ``mesh`` it is replicated: every rank holds all of it on ``device``
    (right for small encoders). With ``mesh`` (an FSDP mesh, e.g.
    :func:`fsdp_mesh`) it is FSDP2-sharded like the transformer but has no
    gradients and no optimizer state: each of ``shard_units`` (e.g. the
    encoder's layers) and then the rest is all-gathered for its forward and
    freed right after, so a large encoder costs ``1 / size`` of its weights per
    rank plus one unit in flight. Call it under ``torch.no_grad()``.

    Args:
        module: the frozen module, weights already loaded.
        device: its device when replicated (FSDP moves it to the mesh's device).
        mesh: shard over this mesh instead of replicating.
        shard_units: submodules sharded (and gathered) one at a time.
        dtype: cast the weights to this dtype first (e.g. bf16 for a large encoder).

    Returns:
        ``module``, frozen (``requires_grad=False``, eval mode) and placed.
    """
    module.requires_grad_(False)
    module.eval()
    if mesh is None:
        if shard_units:
            raise ValueError("shard_units needs a mesh to shard over")
        return module.to(device=device, dtype=dtype)
    if dtype is not None:
        module.to(dtype=dtype)
    for unit in shard_units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    # Explicit True: the root would otherwise keep its weights gathered after forward.
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module
