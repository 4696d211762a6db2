"""The repeated transformer block: self-attention -> cross-attention -> SwiGLU FFN.

LLaMa-3 style (RMSNorm, SwiGLU, no biases, no GQA), non-causal, with
adaLN-single timestep modulation (PixArt-alpha): the model computes one
``(B, 6, D)`` modulation from the timestep for all blocks, and each block adds
its own learned ``(6, D)`` table to it to get shift, scale and gate for its
self-attention and its FFN. Cross-attention is not modulated: it has a plain
pre-norm (RMSNorm with a learned weight) and a plain residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moviegen.transformer.config import TransformerConfig

__all__ = [
    "NUM_MODULATIONS",
    "Attention",
    "AttentionFn",
    "FeedForward",
    "TransformerBlock",
    "modulate",
    "trunc_normal",
]

# Shift, scale and gate for self-attention, then for the FFN.
NUM_MODULATIONS = 6
# Standard deviation of the (truncated normal) weights of all block linears.
INIT_STD = 0.02
# Truncated normals are cut at this many standard deviations.
TRUNCATION = 2.0

# ``fn(q, k, v, attn_mask=None) -> out``: queries ``(B, H, N, hd)``, keys and
# values ``(B, H, L, hd)``, a bool mask broadcastable to ``(B, H, N, L)`` (True =
# attend) or None; output ``(B, H, N, hd)``. ``F.scaled_dot_product_attention``
# is one; context parallel (moviegen.distributed) installs a distributed one.
AttentionFn = Callable[..., torch.Tensor]


def trunc_normal(weight: torch.Tensor, std: float) -> None:
    """Normal init truncated to ``TRUNCATION`` standard deviations, by inverting the CDF.

    Unlike rejection sampling (``nn.init.trunc_normal_`` in recent PyTorch),
    this costs a fixed handful of elementwise ops; it is a no-op on ``meta``.
    """
    # Uniform between the CDF values of the bounds, mapped back through erfinv.
    bound = math.erf(TRUNCATION / math.sqrt(2))
    with torch.no_grad():
        weight.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; ``x`` ``(B, N, D)``, shift/scale ``(B, 1, D)``."""
    return torch.addcmul(shift, x, 1 + scale)


class Attention(nn.Module):
    """Multi-head attention of query tokens ``x`` over ``source`` tokens.

    Self-attention passes ``source = x``. Keys are masked with a boolean
    ``key_mask`` broadcastable to ``(B, heads, N, L)`` (True = attend), never
    queries: padded queries produce outputs that nobody reads.

    ``attention_fn`` (an :data:`AttentionFn`, default SDPA) computes attention
    from the projected heads; it is the hook through which context parallel
    swaps in an attention that communicates, without this module knowing.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        dim = config.dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attention_fn: AttentionFn = F.scaled_dot_product_attention

    def init_weights(self, out_std: float) -> None:
        for layer in (self.wq, self.wk, self.wv):
            trunc_normal(layer.weight, INIT_STD)
        if out_std == 0:
            nn.init.zeros_(self.wo.weight)
        else:
            trunc_normal(self.wo.weight, out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # x: (B, N, D), source: (B, L, D) -> (B, N, D)
        q = self.wq(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, N, hd)
        k = self.wk(source).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, hd)
        v = self.wv(source).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attention_fn(q, k, v, attn_mask=key_mask)  # (B, H, N, hd)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, N, D)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def init_weights(self, out_std: float) -> None:
        trunc_normal(self.w1.weight, INIT_STD)
        trunc_normal(self.w3.weight, INIT_STD)
        trunc_normal(self.w2.weight, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, N, D)


class TransformerBlock(nn.Module):
    """One Movie Gen block on video tokens ``(B, N, D)`` with text context ``(B, L, D)``.

    ``x + gate1 * SelfAttn(mod(norm(x)))`` -> ``x + CrossAttn(norm(x), text)``
    -> ``x + gate2 * FFN(mod(norm(x)))``. The modulated norms have no weight of
    their own (the modulation's scale plays that role).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_layers = config.num_layers
        self.self_norm = nn.RMSNorm(config.dim, eps=config.norm_eps, elementwise_affine=False)
        self.self_attn = Attention(config)
        self.cross_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.cross_attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps, elementwise_affine=False)
        self.ffn = FeedForward(config)
        # adaLN-single: this block's learned offsets to the shared timestep modulation.
        self.modulation = nn.Parameter(torch.empty(NUM_MODULATIONS, config.dim))

    def init_weights(self) -> None:
        """Identity at init: zero gates and a zero cross-attention output projection.

        Residual output projections are otherwise scaled by ``1 / sqrt(2 L)``
        (GPT-2), so that the residual stream's variance does not grow with depth.
        """
        out_std = INIT_STD / math.sqrt(2 * self.num_layers)
        self.self_attn.init_weights(out_std)
        self.cross_attn.init_weights(out_std=0.0)
        self.ffn.init_weights(out_std)
        for norm in (self.self_norm, self.cross_norm, self.ffn_norm):
            norm.reset_parameters()
        # Zero shift, scale and gate: with the model's shared modulation also
        # zero at init, both modulated branches start switched off.
        nn.init.zeros_(self.modulation)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        context: torch.Tensor,
        self_mask: torch.Tensor | None,
        cross_mask: torch.Tensor,
        has_context: torch.Tensor,
    ) -> torch.Tensor:
        """One block.

        Args:
            x: video tokens ``(B, N, D)`` (position embedding already added);
                under context parallel, this device's slice of them.
            modulation: shared timestep modulation ``(B, 6, D)``.
            context: text tokens ``(B, L, D)``.
            self_mask: ``(B, 1, 1, N)`` bool, True for real video keys, or None;
                always over the whole sequence, for ``self_attn.attention_fn``.
            cross_mask: ``(B, 1, 1, L)`` bool, True for text keys to attend to.
            has_context: ``(B, 1, 1)`` in x's dtype; 0 zeroes the cross-attention
                output of samples without any real text key.

        Returns:
            ``(B, N, D)``.
        """
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (modulation + self.modulation).unsqueeze(2).unbind(1)
        )  # each (B, 1, D)
        h = modulate(self.self_norm(x), shift_sa, scale_sa)
        x = x + gate_sa * self.self_attn(h, h, self_mask)
        x = x + has_context * self.cross_attn(self.cross_norm(x), context, cross_mask)
        h = modulate(self.ffn_norm(x), shift_ff, scale_ff)
        return x + gate_ff * self.ffn(h)  # (B, N, D)
