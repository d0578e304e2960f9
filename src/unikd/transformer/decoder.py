"""Deformable DETR's decoder: object queries read a multi-level memory layer after layer, each layer around a
reference point (or, with iterative box refinement, around the box the previous layer predicted)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unikd.transformer.layers import DeformableDecoderLayer, Memory


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Boxes ``sigmoid(delta + logit(reference))``, normalised ``cxcywh`` ``[..., 4]``.

    ``delta`` ``[..., 4]``; ``reference`` ``[..., 2]`` (a point: it offsets the centre only) or ``[..., 4]`` (a
    box: all four). Deformable DETR's box prediction relative to its reference.
    """
    ref = torch.logit(reference.clamp(1e-5, 1 - 1e-5))
    if reference.shape[-1] == 2:
        return torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1).sigmoid()
    return (delta + ref).sigmoid()


class DeformableDecoder(nn.Module):
    """``layers`` :class:`DeformableDecoderLayer` (self-attention among the queries, deformable cross-attention
    on the memory, FFN)."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int, layers: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout)
                                    for _ in range(layers))

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Memory,
                box_heads: nn.ModuleList | None = None) -> tuple[Tensor, list[Tensor]]:
        """Decode the queries layer after layer.

        Args:
            tgt: ``[B, Q, C]`` content queries; query_pos: ``[B, Q, C]`` their positional embedding.
            reference: ``[B, Q, 2]`` reference points, normalised ``(x, y)`` over each image's own region.
            memory: tokens ``[B, S, C]`` with spatial shapes, valid ratios and padding mask.
            box_heads: None, or one module per layer giving box deltas ``[B, Q, 4]`` from that layer's output:
                iterative box refinement, where layer ``l + 1`` reads around the box of layer ``l``
                (:func:`refine_boxes`, detached as in Deformable DETR).
        Returns:
            ``hs`` ``[D, B, Q, C]``: every layer's output; and the D references each layer read (``[B, Q, 2]``
            points, or ``[B, Q, 4]`` boxes after the first layer under refinement).
        """
        outputs, references = [], []
        for index, layer in enumerate(self.layers):
            references.append(reference)
            tgt = layer(tgt, query_pos, memory.level_reference(reference), memory.tokens, memory.spatial_shapes,
                        memory.padding_mask)
            outputs.append(tgt)
            if box_heads is not None:
                reference = refine_boxes(box_heads[index](tgt), reference).detach()
        return torch.stack(outputs), references
