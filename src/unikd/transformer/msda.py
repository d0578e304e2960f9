"""Multi-scale deformable attention (DESIGN §2), in pure PyTorch.

A query with a reference point (or box) samples ``P`` points per head on each of ``L`` feature levels at
learned offsets, bilinearly, and sums them with attention weights normalised over the ``L * P`` samples of
its head. Levels may have any spatial size; only their number is fixed by the weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unikd.host_copy import to_device


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention core.

    value: ``[B, S, M, D]`` (``S = sum_l H_l * W_l``, levels concatenated in order, ``M`` heads, ``D = C / M``)
    spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``
    sampling_locations: ``[B, Q, M, L, P, 2]`` normalised ``(x, y)`` in ``[0, 1]`` image-relative coordinates of
    each level's map (``align_corners=False``: 0 and 1 are the outer edges of the border pixels; samples off
    the map read zeros)
    attention_weights: ``[B, Q, M, L, P]``
    returns ``[B, Q, M * D]`` (head-major channels)
    """
    B, S, M, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    shapes = spatial_shapes.tolist()
    sizes = [h * w for h, w in shapes]
    if len(shapes) != L:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels but sampling_locations has {L}")
    if sum(sizes) != S:
        raise ValueError(f"value has {S} tokens but spatial_shapes {shapes} give {sum(sizes)}")

    # grid_sample wants [-1, 1] coordinates, one batch entry per (image, head). Each level's grid
    # [B*M, Q, P, 2] is its own contiguous copy, as in transformers' version, so that the two run the same
    # operations; a timing of this against a strided view of one grid for all levels could not tell them apart
    # (docs/benchmarks.md, "MSDA core against an independent implementation").
    grids = 2 * sampling_locations - 1
    samples = []
    for level, value_l in enumerate(value.split(sizes, dim=1)):
        h, w = shapes[level]
        value_l = value_l.permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*M, D, Q, P]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (torch.cat(samples, dim=-1) * weights).sum(-1)  # [B*M, D, Q]
    return out.view(B, M * D, Q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (Deformable DETR, Zhu et al. 2021).

    ``d_model`` channels split over ``n_heads`` heads; each head samples ``n_points`` points on each of
    ``n_levels`` levels. ``d_value`` is the channel count of the value input (default ``d_model``):
    ``value_proj`` maps it to ``d_model``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 d_value: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_value or d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start as one direction per head (evenly spread around the circle, scaled so the larger of
        |x|, |y| is 1), point ``p`` at radius ``p + 1``, identical on every level; uniform attention weights."""
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)  # [M, 2]
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * radii[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, spatial_shapes: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
        """query ``[B, Q, d_model]``; reference as in :meth:`sampling_locations`; value ``[B, S, d_value]``;
        spatial_shapes ``[L, 2]`` int64 ``(H_l, W_l)``; padding_mask ``[B, S]`` bool, True = padded key (its
        value is zeroed). Returns ``[B, Q, d_model]``."""
        B = query.shape[0]
        locations, weights = self.sampling_locations(query, reference, spatial_shapes)
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))

    def sampling_locations(self, query: Tensor, reference: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Where each query samples and with what weight.

        query ``[B, Q, d_model]``; reference ``[B, Q, L, 2]`` (points, normalised ``(x, y)``) or ``[B, Q, L, 4]``
        (boxes, normalised ``(cx, cy, w, h)``), or ``[B, Q, 2]`` / ``[B, Q, 4]`` for the same reference on every
        level; spatial_shapes ``[L, 2]`` int64 ``(H_l, W_l)``.

        Point reference: ``loc = ref + offset / (W_l, H_l)`` (offsets in pixels of each level).
        Box reference: ``loc = ref_xy + offset / n_points * ref_wh / 2``.
        Returns locations ``[B, Q, M, L, P, 2]`` (normalised ``(x, y)`` on each level's map) and attention weights
        ``[B, Q, M, L, P]`` (softmax over each head's ``L * P`` samples).
        """
        B, Q, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape != (L, 2):
            raise ValueError(f"spatial_shapes must be [{L}, 2] (n_levels={L}), got {list(spatial_shapes.shape)}")
        if reference.dim() == 3:
            reference = reference[:, :, None].expand(-1, -1, L, -1)
        if reference.dim() != 4 or reference.shape[2] != L or reference.shape[-1] not in (2, 4):
            raise ValueError(f"reference must be [B, Q, {L}, 2|4] or [B, Q, 2|4], got {list(reference.shape)}")
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        ref = reference[:, :, None, :, None]  # [B, Q, 1, L, 1, 2|4]
        if reference.shape[-1] == 2:
            level_size = to_device(spatial_shapes.flip(-1).to(offsets.dtype), offsets.device)  # [L, 2] (W_l, H_l)
            return ref + offsets / level_size[:, None], weights
        return ref[..., :2] + offsets / P * ref[..., 2:] * 0.5, weights
