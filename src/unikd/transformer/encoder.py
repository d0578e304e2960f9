"""Deformable DETR's encoder: a stack of deformable self-attention layers over all levels' tokens."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.host_copy import to_device
from unikd.transformer.layers import DeformableEncoderLayer, Memory, sine_position_embedding


class DeformableEncoder(nn.Module):
    """``layers`` :class:`DeformableEncoderLayer` over a multi-level memory; the position embedding of a token is
    the sine embedding of its centre in its image's own region (valid ratios) plus a learned embedding of its level.

    Padded tokens are keys of no attention (the memory's padding mask), so a valid token's output does not depend
    on how much padding the batch added.
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int, layers: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout)
                                    for _ in range(layers))
        self.level_embed = nn.Parameter(torch.randn(n_levels, d_model))

    def forward(self, memory: Memory) -> Tensor:
        """``memory`` with tokens ``[B, S, d_model]`` -> encoded tokens ``[B, S, d_model]`` (same layout)."""
        tokens, shapes = memory.tokens, memory.spatial_shapes
        pos = sine_position_embedding(shapes, tokens.shape[-1], tokens.device, memory.valid_ratios)
        sizes = to_device(shapes.prod(1), tokens.device)
        pos = pos + self.level_embed.repeat_interleave(sizes, dim=0, output_size=tokens.shape[1])
        for layer in self.layers:
            tokens = layer(tokens, pos, shapes, memory.padding_mask, memory.valid_ratios)
        return tokens
