"""The per-image geometry of a padded batch (unikd.pyramid) and the attention helpers that use it."""
from __future__ import annotations

import math

import pytest
import torch

from unikd.pyramid import Pyramid
from unikd.transformer import DeformableEncoderLayer, Memory, encoder_reference_points, sine_position_embedding


def padded_pair() -> Pyramid:
    """Two images, 40×64 and 64×24 (h×w), padded to 64×64, on levels of stride 8 and 32."""
    levels = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2)]
    return Pyramid(levels, [8, 32], [(40, 64), (64, 24)])


def test_valid_cells_ratios_and_masks_follow_each_images_own_size():
    p = padded_pair()
    assert p.valid_cells() == [[(5, 8), (2, 2)], [(8, 3), (2, 1)]]  # ceil(size / stride)
    ratios = p.valid_ratios()
    assert ratios.shape == (2, 2, 2)
    torch.testing.assert_close(ratios[0, 0], torch.tensor([64 / 64, 40 / 64]))  # (x, y) = (w, h) / (stride * size)
    torch.testing.assert_close(ratios[1, 0], torch.tensor([24 / 64, 64 / 64]))
    torch.testing.assert_close(ratios[1, 1], torch.tensor([24 / 64, 64 / 64]))
    masks = p.padding_masks()
    assert [tuple(m.shape) for m in masks] == [(2, 8, 8), (2, 2, 2)]
    for b, level_cells in enumerate(p.valid_cells()):
        for mask, (rows, cols) in zip(masks, level_cells):
            expected = torch.ones_like(mask[b])
            expected[:rows, :cols] = False
            assert torch.equal(mask[b], expected)
    memory = p.memory()
    assert memory.tokens.shape == (2, 64 + 4, 3)
    assert torch.equal(memory.padding_mask, torch.cat([m.flatten(1) for m in masks], 1))


def test_ratios_and_masks_are_made_on_the_levels_device_in_fixed_dtypes():
    # On the meta device a tensor made on the CPU inside raises; a one-level pyramid has no level 1.
    meta = Pyramid([torch.zeros(2, 3, 4, 4, device="meta")], [8], [(32, 20), (12, 32)])
    assert meta.valid_ratios().device.type == "meta"
    assert [m.device.type for m in meta.padding_masks()] == ["meta"]
    one = Pyramid([torch.zeros(2, 3, 4, 4)], [8], [(32, 20), (12, 32)])
    torch.testing.assert_close(one.valid_ratios(), torch.tensor([[[20 / 32, 1.0]], [[1.0, 12 / 32]]]))
    assert one.padding_masks()[0].sum(dim=(1, 2)).tolist() == [4, 8]  # image 0: 1 column, image 1: 2 rows
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert one.valid_ratios().dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_pyramid_checks_its_parts_and_scales_levels():
    with pytest.raises(ValueError, match="strides"):
        Pyramid([torch.zeros(1, 1, 2, 2)], [8, 16], [(16, 16)])
    with pytest.raises(ValueError, match="image_sizes"):
        Pyramid([torch.zeros(2, 1, 2, 2)], [8], [(16, 16)])
    p = padded_pair()
    scaled = p.scaled(torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(scaled.levels[0], p.levels[0] / 2)
    torch.testing.assert_close(scaled.levels[1], p.levels[1] / 4)
    assert scaled.image_sizes == p.image_sizes and scaled.strides == p.strides


def test_level_reference_puts_image_coordinates_on_each_level():
    p = padded_pair()
    memory = p.memory()
    points = torch.tensor([[[0.5, 0.5]], [[1.0, 0.25]]])  # [B, Q=1, 2]
    on_levels = memory.level_reference(points)
    assert on_levels.shape == (2, 1, 2, 2)
    # image 1 (64×24): x = 1.0 is its right edge, pixel 24 = 24 / 64 of the level's width
    torch.testing.assert_close(on_levels[1, 0, 0], torch.tensor([24 / 64, 0.25]))
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]], [[0.5, 0.5, 1.0, 1.0]]])
    torch.testing.assert_close(memory.level_reference(boxes)[0, 0, 0], torch.tensor([0.5, 0.5 * 40 / 64, 0.2,
                                                                                     0.4 * 40 / 64]))
    unpadded = Memory.from_levels(p.levels)
    assert torch.equal(unpadded.level_reference(points), points[:, :, None].expand(-1, -1, 2, -1))


def test_token_positions_are_over_the_images_own_region():
    p = padded_pair()
    memory = p.memory()
    ref = encoder_reference_points(memory.spatial_shapes, 2, valid_ratios=memory.valid_ratios)
    assert ref.shape == (2, 68, 2, 2)
    # image 1, level 0, token (row 2, col 1): pixel centre (12, 20) of a 24-wide, 64-high image
    token = 2 * 8 + 1
    centre = torch.tensor([12 / 24, 20 / 64])
    torch.testing.assert_close(ref[1, token, 0], centre * memory.valid_ratios[1, 0])
    torch.testing.assert_close(ref[1, token, 1], centre * memory.valid_ratios[1, 1])
    emb = sine_position_embedding(memory.spatial_shapes, 4, valid_ratios=memory.valid_ratios)
    assert emb.shape == (2, 68, 4)
    # channel 0 is sin(2 pi y), channel 2 sin(2 pi x), over the image's own height and width
    assert emb[1, token, 0].item() == pytest.approx(math.sin(2 * math.pi * 20 / 64), abs=1e-6)
    assert emb[1, token, 2].item() == pytest.approx(math.sin(2 * math.pi * 12 / 24), abs=1e-6)


def test_encoder_output_on_an_image_ignores_the_padding():
    """A padded image's tokens come out as the unpadded image's, whatever the padding holds."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(d_model=8, n_levels=2, n_heads=2, n_points=3, d_ffn=16)
    with torch.no_grad():
        layer.self_attn.sampling_offsets.weight.normal_(std=0.5)
        layer.self_attn.attention_weights.weight.normal_()
    alone = [torch.randn(1, 8, 5, 3), torch.randn(1, 8, 2, 1)]  # a 40×24 image at strides 8 and 32
    padded = [torch.randn(1, 8, 8, 8) * 100, torch.randn(1, 8, 2, 2) * 100]
    for a, p in zip(alone, padded):
        p[..., :a.shape[-2], :a.shape[-1]] = a
    outputs = []
    for levels in (alone, padded):
        memory = Pyramid(levels, [8, 32], [(40, 24)]).memory()
        pos = sine_position_embedding(memory.spatial_shapes, 8, valid_ratios=memory.valid_ratios)
        out = layer(memory.tokens, pos, memory.spatial_shapes, memory.padding_mask, memory.valid_ratios)
        outputs.append(out)
    mask = Pyramid(padded, [8, 32], [(40, 24)]).memory().padding_mask[0]
    torch.testing.assert_close(outputs[1][0, ~mask], outputs[0][0], atol=1e-5, rtol=1e-5)
