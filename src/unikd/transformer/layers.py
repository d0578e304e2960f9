"""Deformable transformer layers and the multi-level token helpers they work on.

Multi-scale features travel as one token sequence: ``[B, C, H_l, W_l]`` maps are flattened row-major and
concatenated level by level into ``[B, S, C]``, with ``spatial_shapes`` ``[L, 2]`` ``(H_l, W_l)`` to undo it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unikd.host_copy import to_device
from unikd.transformer.msda import MSDeformAttn


def flatten_levels(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``[B, C, H_l, W_l]`` per level -> (tokens ``[B, S, C]``, spatial_shapes ``[L, 2]`` int64 ``(H_l, W_l)``).

    ``spatial_shapes`` stays on the CPU whatever the tokens' device: the attention reads it as Python ints,
    which would otherwise cost a device synchronisation per layer.
    """
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    spatial_shapes = torch.tensor([f.shape[-2:] for f in features], dtype=torch.long)
    return tokens, spatial_shapes


def unflatten_levels(tokens: Tensor, spatial_shapes: Tensor) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: ``[B, S, C]`` -> list of ``[B, C, H_l, W_l]``."""
    shapes = spatial_shapes.tolist()
    levels = tokens.split([h * w for h, w in shapes], dim=1)
    return [t.transpose(1, 2).unflatten(2, (h, w)) for t, (h, w) in zip(levels, shapes)]


def _token_centres(spatial_shapes: Tensor, device=None, valid_ratios: Tensor | None = None) -> Tensor:
    """Each token's pixel centre ``((j + 0.5) / W_l, (i + 0.5) / H_l)`` as normalised ``(x, y)``: ``[S, 2]``.

    With ``valid_ratios`` ``[B, L, 2]`` the centres are normalised by each image's own region instead (its
    width is ``ratio * W_l`` cells of level ``l``): ``[B, S, 2]``; padding tokens get coordinates above 1.
    """
    device = device or spatial_shapes.device
    centres = []
    for h, w in spatial_shapes.tolist():
        y, x = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                              (torch.arange(w, device=device) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], dim=-1))
    out = torch.cat(centres)
    if valid_ratios is None:
        return out
    sizes = to_device(spatial_shapes.prod(1), valid_ratios.device)
    token_ratios = valid_ratios.repeat_interleave(sizes, dim=1, output_size=len(out))  # [B, S, 2]
    return out / token_ratios


def sine_position_embedding(spatial_shapes: Tensor, channels: int, device=None,
                            valid_ratios: Tensor | None = None) -> Tensor:
    """2-d sine/cosine position embedding of every token of every level: ``[S, channels]`` float32, or
    ``[B, S, channels]`` with ``valid_ratios`` ``[B, L, 2]`` (positions over each image's own region, so a
    token's embedding does not depend on the padding).

    The first ``channels / 2`` channels encode y, the rest x, each as DETR does: coordinate ``c`` (the pixel
    centre normalised by its level's size, times ``2 * pi``) over ``10000 ** (2 * (k // 2) / (channels / 2))``,
    sine on even ``k``, cosine on odd ``k``. Tokens at the same normalised position on different levels get the
    same embedding: add a level embedding to tell levels apart.
    """
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    half = channels // 2
    coords = _token_centres(spatial_shapes, device, valid_ratios) * (2 * math.pi)  # [(B,) S, 2] (x, y)
    k = torch.arange(half, device=coords.device)
    freq = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor") / half)
    angles = coords.flip(-1)[..., None] / freq  # [(B,) S, 2 (y, x), half]
    emb = torch.where(k % 2 == 0, angles.sin(), angles.cos())
    return emb.flatten(-2)


def encoder_reference_points(spatial_shapes: Tensor, n_levels: int, device=None,
                             valid_ratios: Tensor | None = None) -> Tensor:
    """``[S, n_levels, 2]``: each token's pixel centre, normalised ``(x, y)`` by its own level's size, repeated
    over the levels. With ``valid_ratios`` ``[B, L, 2]``: ``[B, S, n_levels, 2]``, the centre in its image's
    normalised coordinates, placed on each level by that level's valid ratio (as Deformable DETR does)."""
    centres = _token_centres(spatial_shapes, device, valid_ratios)
    if valid_ratios is None:
        return centres[:, None].expand(-1, n_levels, -1)
    return centres[:, :, None] * valid_ratios[:, None]


@dataclass
class Memory:
    """A multi-level feature pyramid as one token sequence, with each image's own region.

    Attributes:
        tokens: ``[B, S, C]`` (levels flattened row-major and concatenated, see :func:`flatten_levels`).
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``, on the CPU.
        valid_ratios: ``[B, L, 2]`` ``(x, y)``: the image's width and height as fractions of each level's (a
            point at normalised image coordinates ``p`` lies at ``p * ratio`` on the level), or None (all 1).
        padding_mask: ``[B, S]`` bool, True on tokens wholly in the padding, or None (no padding).
    """

    tokens: Tensor
    spatial_shapes: Tensor
    valid_ratios: Tensor | None = None
    padding_mask: Tensor | None = None

    @classmethod
    def from_levels(cls, levels: list[Tensor], valid_ratios: Tensor | None = None,
                    padding_mask: Tensor | None = None) -> Memory:
        tokens, shapes = flatten_levels(levels)
        return cls(tokens, shapes, valid_ratios, padding_mask)

    def level_reference(self, reference: Tensor) -> Tensor:
        """Reference points ``[B, Q, 2]`` or boxes ``[B, Q, 4]`` in normalised image coordinates → on each level
        ``[B, Q, L, 2|4]`` (multiplied by the valid ratios; boxes by ``(rx, ry, rx, ry)``)."""
        levels = len(self.spatial_shapes)
        if self.valid_ratios is None:
            return reference[:, :, None].expand(-1, -1, levels, -1)
        ratios = self.valid_ratios if reference.shape[-1] == 2 else self.valid_ratios.repeat(1, 1, 2)
        return reference[:, :, None] * ratios[:, None]


class _FeedForward(nn.Module):
    """Post-norm FFN block: ``norm(x + Linear(ReLU(Linear(x))))``, ``[..., d_model]`` -> ``[..., d_model]``."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(d_ffn, d_model), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.ffn(x))


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention among the queries, deformable cross-attention on a multi-level
    memory, FFN; each followed by add & norm."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int, dropout: float = 0.0,
                 d_value: int | None = None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, d_value)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = _FeedForward(d_model, d_ffn, dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor | None, reference: Tensor, memory: Tensor,
                spatial_shapes: Tensor, memory_padding_mask: Tensor | None = None) -> Tensor:
        """tgt ``[B, Q, C]``; query_pos ``[B, Q, C]`` or None (added to the self-attention's queries and keys
        and to the cross-attention's query); reference as :class:`MSDeformAttn` (``[B, Q, L, 2|4]`` or
        ``[B, Q, 2|4]``); memory ``[B, S, d_value]``; spatial_shapes ``[L, 2]``; memory_padding_mask ``[B, S]``
        bool, True = padded. Returns ``[B, Q, C]``."""
        q = tgt if query_pos is None else tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        q = tgt if query_pos is None else tgt + query_pos
        attended = self.cross_attn(q, reference, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.ffn(tgt)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels' tokens, FFN; each followed by
    add & norm. Every token attends around its own pixel centre on every level."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int, dropout: float = 0.0):
        super().__init__()
        self.n_levels = n_levels
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = _FeedForward(d_model, d_ffn, dropout)

    def forward(self, src: Tensor, pos: Tensor | None, spatial_shapes: Tensor,
                padding_mask: Tensor | None = None, valid_ratios: Tensor | None = None) -> Tensor:
        """src ``[B, S, C]``; pos ``[S, C]``, ``[B, S, C]`` or None (added to the query only); spatial_shapes
        ``[L, 2]``; padding_mask ``[B, S]`` bool, True = padded; valid_ratios ``[B, L, 2]`` or None (as in
        :class:`Memory`). Returns ``[B, S, C]``."""
        reference = encoder_reference_points(spatial_shapes, self.n_levels, src.device, valid_ratios).to(src.dtype)
        query = src if pos is None else src + pos
        attended = self.self_attn(query, reference.expand(src.shape[0], -1, -1, -1), src, spatial_shapes,
                                  padding_mask)
        src = self.norm1(src + self.dropout(attended))
        return self.ffn(src)
