import math
import warnings

import pytest
import torch

from unikd.transformer import (
    DeformableDecoderLayer,
    DeformableEncoderLayer,
    MSDeformAttn,
    encoder_reference_points,
    flatten_levels,
    ms_deform_attn,
    sine_position_embedding,
    unflatten_levels,
)

SHAPES = torch.tensor([[5, 7], [3, 3], [1, 2]])  # levels of unrelated sizes
S = int(SHAPES.prod(1).sum())


def loop_reference(value, shapes, locations, weights):
    """Multi-scale deformable attention one sample at a time: explicit 4-neighbour bilinear interpolation with
    ``align_corners=False`` (pixel x = loc_x * W - 0.5) and zeros outside the map."""
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, M * D, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for l, (h, w) in enumerate(shapes):
                    for p in range(P):
                        px = locations[b, q, m, l, p, 0].item() * w - 0.5
                        py = locations[b, q, m, l, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        sample = torch.zeros(D, dtype=value.dtype)
                        for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                            for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                                if 0 <= xi < w and 0 <= yi < h:
                                    sample += wx * wy * value[b, starts[l] + yi * w + xi, m]
                        out[b, q, m * D:(m + 1) * D] += weights[b, q, m, l, p] * sample
    return out


def off_grid_locations(B, Q, M, shapes, P, generator):
    """Locations ``[B, Q, M, L, P, 2]`` whose pixel coordinates are at least 0.1 px from integers (so bilinear
    interpolation is differentiable there), some partly or wholly off the map."""
    per_level = []
    for h, w in shapes:
        size = torch.tensor([w, h], dtype=torch.float64)
        whole = torch.floor(torch.rand(B, Q, M, P, 2, generator=generator, dtype=torch.float64) * (size + 1)) - 1
        pixel = whole + 0.1 + 0.8 * torch.rand(B, Q, M, P, 2, generator=generator, dtype=torch.float64)
        per_level.append((pixel + 0.5) / size)
    return torch.stack(per_level, dim=3)


def test_core_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    B, Q, M, D, P = 1, 2, 2, 2, 2
    value = torch.randn(B, 16, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    locations = off_grid_locations(B, Q, M, shapes, P, g).requires_grad_()
    weights = torch.rand(B, Q, M, 2, P, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, torch.tensor(shapes), loc, w), (value, locations, weights))


def test_core_matches_per_point_bilinear_loops():
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (2, 2), (1, 3)]
    B, Q, M, D, P = 2, 3, 2, 3, 2
    value = torch.randn(B, 19, M, D, generator=g, dtype=torch.float64)
    locations = torch.rand(B, Q, M, 3, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, 3, P, generator=g, dtype=torch.float64)
    out = ms_deform_attn(value, torch.tensor(shapes), locations, weights)
    assert out.shape == (B, Q, M * D)
    torch.testing.assert_close(out, loop_reference(value, shapes, locations, weights))


def test_points_off_the_map_read_zero_and_border_points_only_in_map_neighbours():
    value = torch.arange(1.0, 7.0).view(1, 6, 1, 1)  # one 2x3 map: rows [1, 2, 3], [4, 5, 6]
    shapes = torch.tensor([[2, 3]])
    weights = torch.ones(1, 1, 1, 1, 1)

    def sample(x, y):
        return ms_deform_attn(value, shapes, torch.tensor([x, y]).view(1, 1, 1, 1, 1, 2), weights).item()

    assert sample(1.7, -0.4) == 0.0
    assert sample(0.5, 1.0 + 1.0 / 2) == 0.0  # pixel y = 2.5: a whole pixel below the map
    assert sample(0.5, 0.5) == pytest.approx(0.5 * 2 + 0.5 * 5)  # centre of the map: inside, for contrast
    # pixel (-0.25, 0.5): column -1 (weight 0.25) is off the map, column 0 (0.75) mixes rows 0 and 1 evenly
    assert sample(0.25 / 3, 0.5) == pytest.approx(0.75 * (0.5 * 1 + 0.5 * 4))
    # pixel (2.25, -0.5): only the corner pixel (row 0, column 2) is on the map, weight 0.75 * 0.5
    assert sample(2.75 / 3, 0.0) == pytest.approx(0.75 * 0.5 * 3)

    # an off-map point contributes exactly nothing next to an in-map one
    locations = torch.tensor([[1.7, -0.4], [0.4, 0.6]]).view(1, 1, 1, 1, 2, 2)
    both = ms_deform_attn(value, shapes, locations, torch.tensor([0.3, 0.7]).view(1, 1, 1, 1, 2))
    inside_only = ms_deform_attn(value, shapes, locations, torch.tensor([0.0, 0.7]).view(1, 1, 1, 1, 2))
    assert torch.equal(both, inside_only) and inside_only.item() != 0.0


def test_core_rejects_a_level_count_mismatch_and_runs_without_warnings():
    value, weights = torch.randn(1, S, 1, 2), torch.ones(1, 1, 1, 3, 1) / 3
    locations = torch.rand(1, 1, 1, 3, 1, 2)
    with pytest.raises(ValueError, match="spatial_shapes has 2 levels but sampling_locations has 3"):
        ms_deform_attn(value[:, :35 + 9], SHAPES[:2], locations, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. grid_sample's warning when align_corners is left unset
        assert ms_deform_attn(value, SHAPES, locations, weights).shape == (1, 1, 2)


def attention(d_model=16, n_heads=2, n_points=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MSDeformAttn(d_model, n_levels=3, n_heads=n_heads, n_points=n_points, **kwargs)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_levels_of_any_size(ref_dim):
    attn = attention()
    g = torch.Generator().manual_seed(2)
    query, value = torch.randn(2, 4, 16, generator=g), torch.randn(2, S, 16, generator=g)
    reference = torch.rand(2, 4, ref_dim, generator=g) * 0.5 + 0.25
    out = attn(query, reference, value, SHAPES)
    assert out.shape == (2, 4, 16)
    per_level = attn(query, reference[:, :, None].expand(-1, -1, 3, -1), value, SHAPES)
    torch.testing.assert_close(out, per_level)
    assert not torch.allclose(out, attn(query, reference, value + 1, SHAPES))  # it reads the value


def test_padding_mask_hides_padded_values():
    attn = attention()
    g = torch.Generator().manual_seed(3)
    query, value = torch.randn(2, 6, 16, generator=g), torch.randn(2, S, 16, generator=g)
    reference = torch.rand(2, 6, 3, 2, generator=g)
    mask = torch.rand(2, S, generator=g) < 0.4
    changed = torch.where(mask[..., None], torch.randn(2, S, 16, generator=g) * 10, value)
    out = attn(query, reference, value, SHAPES, padding_mask=mask)
    assert torch.equal(out, attn(query, reference, changed, SHAPES, padding_mask=mask))
    assert not torch.allclose(attn(query, reference, value, SHAPES), attn(query, reference, changed, SHAPES))


def expected_output(attn, query, locations, value):
    """The module's output recomputed by the core at explicit ``locations`` ``[B, Q, M, L, P, 2]``."""
    B, Q, _ = query.shape
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    weights = attn.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
    projected = attn.value_proj(value).view(B, value.shape[1], M, -1)
    return attn.output_proj(ms_deform_attn(projected, SHAPES, locations, weights))


def set_random_offsets_and_weights(attn, g):
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.randn(attn.sampling_offsets.bias.shape, generator=g) * 2)
        attn.attention_weights.weight.normal_(generator=g)
        attn.attention_weights.bias.normal_(generator=g)
    return attn.sampling_offsets.bias.detach().view(attn.n_heads, attn.n_levels, attn.n_points, 2)


def test_box_reference_scales_offsets_by_half_its_size_over_points():
    attn = attention()
    g = torch.Generator().manual_seed(4)
    offsets = set_random_offsets_and_weights(attn, g)  # sampling_offsets.weight stays 0: offset = bias
    query, value = torch.randn(2, 4, 16, generator=g), torch.randn(2, S, 16, generator=g)
    boxes = torch.cat([torch.rand(2, 4, 2, generator=g) * 0.6 + 0.2, torch.rand(2, 4, 2, generator=g) * 0.5], -1)
    locations = torch.empty(2, 4, 2, 3, 3, 2)
    for b in range(2):
        for q in range(4):
            cx, cy, w, h = boxes[b, q].tolist()
            locations[b, q, ..., 0] = cx + offsets[..., 0] / 3 * w / 2
            locations[b, q, ..., 1] = cy + offsets[..., 1] / 3 * h / 2
    torch.testing.assert_close(attn(query, boxes, value, SHAPES), expected_output(attn, query, locations, value))


def test_point_reference_offsets_are_in_pixels_of_each_level():
    attn = attention()
    g = torch.Generator().manual_seed(5)
    offsets = set_random_offsets_and_weights(attn, g)
    query, value = torch.randn(2, 4, 16, generator=g), torch.randn(2, S, 16, generator=g)
    points = torch.rand(2, 4, 3, 2, generator=g)
    locations = torch.empty(2, 4, 2, 3, 3, 2)
    for l, (h, w) in enumerate(SHAPES.tolist()):
        locations[:, :, :, l, :, 0] = points[:, :, None, l, None, 0] + offsets[:, l, :, 0] / w
        locations[:, :, :, l, :, 1] = points[:, :, None, l, None, 1] + offsets[:, l, :, 1] / h
    torch.testing.assert_close(attn(query, points, value, SHAPES), expected_output(attn, query, locations, value))


def test_initial_offsets_point_outwards_per_head_at_growing_radius():
    offsets = attention(n_heads=4, n_points=2).sampling_offsets.bias.detach().view(4, 3, 2, 2)
    torch.testing.assert_close(offsets[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(offsets[1, 2], torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    torch.testing.assert_close(offsets[:, :, 1], 2 * offsets[:, :, 0])


def test_defaults_are_deformable_detrs():
    attn = MSDeformAttn()
    assert (attn.d_model, attn.n_levels, attn.n_heads, attn.n_points) == (256, 4, 8, 4)
    assert attn.sampling_offsets.out_features == 8 * 4 * 4 * 2 and attn.attention_weights.out_features == 8 * 4 * 4
    assert attn.value_proj.in_features == 256


def test_initial_diagonal_offsets_are_scaled_to_a_unit_larger_side():
    offsets = attention(n_heads=8, n_points=2).sampling_offsets.bias.detach().view(8, 3, 2, 2)
    torch.testing.assert_close(offsets[1, 0], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # 45 degrees
    torch.testing.assert_close(offsets[3, 2], torch.tensor([[-1.0, 1.0], [-2.0, 2.0]]))  # 135 degrees
    torch.testing.assert_close(offsets[4, 1], torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]))  # 180 degrees


def test_fully_padded_value_reads_zero():
    attn = attention()
    g = torch.Generator().manual_seed(8)
    set_random_offsets_and_weights(attn, g)
    with torch.no_grad():
        attn.value_proj.bias.normal_(generator=g)
        attn.output_proj.bias.normal_(generator=g)
    query, value = torch.randn(2, 4, 16, generator=g), torch.randn(2, S, 16, generator=g)
    reference = torch.rand(2, 4, 2, generator=g) * 0.5 + 0.25
    out = attn(query, reference, value, SHAPES, padding_mask=torch.ones(2, S, dtype=torch.bool))
    torch.testing.assert_close(out, attn.output_proj.bias.detach().expand(2, 4, 16))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_spatial_shapes_may_stay_on_the_cpu_while_the_data_are_elsewhere(ref_dim):
    # the meta device stands in for a GPU: spatial_shapes stays on the CPU (flatten_levels makes it there)
    attn = attention().to("meta")
    query, value = torch.empty(2, 4, 16, device="meta"), torch.empty(2, S, 16, device="meta")
    out = attn(query, torch.empty(2, 4, ref_dim, device="meta"), value, SHAPES)
    assert out.device.type == "meta" and out.shape == (2, 4, 16)


def test_bad_inputs_raise_clear_errors():
    attn = attention()
    query, value, reference = torch.randn(1, 2, 16), torch.randn(1, S, 16), torch.rand(1, 2, 2)
    with pytest.raises(ValueError, match="levels"):
        attn(query, reference, value, SHAPES[:2])
    with pytest.raises(ValueError, match="tokens"):
        attn(query, reference, value[:, :-1], SHAPES)
    with pytest.raises(ValueError, match="reference"):
        attn(query, torch.rand(1, 2, 3), value, SHAPES)
    with pytest.raises(ValueError, match="reference"):
        attn(query, torch.rand(1, 2, 2, 2), value, SHAPES)
    with pytest.raises(ValueError, match=r"d_model \(16\) must be divisible by n_heads \(3\)"):
        MSDeformAttn(16, n_levels=3, n_heads=3)


def test_dropout_reaches_every_block_of_both_layers():
    dec = DeformableDecoderLayer(d_model=8, n_levels=2, n_heads=2, n_points=2, d_ffn=16, dropout=0.3)
    enc = DeformableEncoderLayer(d_model=8, n_levels=2, n_heads=2, n_points=2, d_ffn=16, dropout=0.3)
    assert dec.self_attn.dropout == 0.3 and dec.dropout.p == 0.3
    for layer in (dec, enc):
        assert [m.p for m in layer.ffn.modules() if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3]
    assert [m.p for m in enc.modules() if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3, 0.3]
    ffn, x = enc.ffn.eval(), torch.randn(3, 8)  # the FFN: two linear layers with a ReLU between
    lin = [m for m in ffn.ffn if isinstance(m, torch.nn.Linear)]
    torch.testing.assert_close(ffn(x), ffn.norm(x + lin[1](lin[0](x).relu())))


def test_decoder_layer_is_self_attention_cross_attention_then_ffn_each_with_a_residual_and_norm():
    torch.manual_seed(9)
    layer = DeformableDecoderLayer(d_model=8, n_levels=3, n_heads=2, n_points=2, d_ffn=16, d_value=12)
    with torch.no_grad():  # let the query steer the sampling (zero at init)
        layer.cross_attn.sampling_offsets.weight.normal_(std=0.3)
        layer.cross_attn.attention_weights.weight.normal_()
    tgt, pos, memory = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, S, 12)
    boxes = torch.cat([torch.rand(2, 5, 2) * 0.6 + 0.2, torch.rand(2, 5, 2) * 0.4], -1)
    q = tgt + pos  # the position goes to the queries and keys of the self-attention, and to the cross-attention's query
    x = layer.norm1(tgt + layer.self_attn(q, q, tgt)[0])
    x = layer.norm2(x + layer.cross_attn(x + pos, boxes, memory, SHAPES))
    torch.testing.assert_close(layer(tgt, pos, boxes, memory, SHAPES), layer.ffn(x))
    x = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt)[0])  # without positions
    x = layer.norm2(x + layer.cross_attn(x, boxes, memory, SHAPES))
    torch.testing.assert_close(layer(tgt, None, boxes, memory, SHAPES), layer.ffn(x))


def test_decoder_layer_shapes_and_gradients_with_other_value_channels():
    torch.manual_seed(6)
    layer = DeformableDecoderLayer(d_model=32, n_levels=3, n_heads=4, n_points=2, d_ffn=64, d_value=48)
    tgt = torch.randn(2, 5, 32, requires_grad=True)
    memory = torch.randn(2, S, 48, requires_grad=True)
    boxes = torch.cat([torch.rand(2, 5, 2) * 0.6 + 0.2, torch.rand(2, 5, 2) * 0.4], -1)
    out = layer(tgt, torch.randn(2, 5, 32), boxes, memory, SHAPES)
    assert out.shape == (2, 5, 32)
    out.square().sum().backward()
    assert memory.grad.abs().sum() > 0 and tgt.grad.abs().sum() > 0
    assert layer.cross_attn.sampling_offsets.weight.grad.abs().sum() > 0  # gradients reach the locations
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[:, -2:] = True
    assert layer(tgt, None, torch.rand(2, 5, 3, 2), memory, SHAPES, mask).shape == (2, 5, 32)


def test_encoder_layer_shapes_positions_and_gradients():
    torch.manual_seed(7)
    layer = DeformableEncoderLayer(d_model=16, n_levels=3, n_heads=2, n_points=2, d_ffn=32)
    with torch.no_grad():  # at init the query moves nothing; let it steer the sampling
        layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
        layer.self_attn.attention_weights.weight.normal_()
    features = [torch.randn(2, 16, h, w) for h, w in SHAPES.tolist()]
    src, shapes = flatten_levels(features)
    src.requires_grad_()
    pos = sine_position_embedding(shapes, 16)
    out = layer(src, pos, shapes)
    assert out.shape == (2, S, 16)
    torch.testing.assert_close(out, layer(src, pos.expand(2, -1, -1), shapes))
    assert not torch.allclose(out, layer(src, None, shapes))
    out.square().sum().backward()
    assert src.grad.abs().sum() > 0
    assert layer.self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    # the whole layer runs in float64
    double = layer.double()(src.detach().double(), pos.double(), shapes)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), out.detach(), atol=1e-4, rtol=1e-4)


def test_flatten_unflatten_round_trip():
    features = [torch.randn(2, 3, h, w) for h, w in [(5, 7), (3, 3), (1, 2)]]
    tokens, shapes = flatten_levels(features)
    assert tokens.shape == (2, S, 3)
    assert shapes.dtype == torch.int64 and shapes.tolist() == SHAPES.tolist()
    torch.testing.assert_close(tokens[:, 7 + 2], features[0][:, :, 1, 2])  # row-major within a level
    torch.testing.assert_close(tokens[:, 35], features[1][:, :, 0, 0])  # levels in order
    for back, original in zip(unflatten_levels(tokens, shapes), features):
        assert torch.equal(back, original)


def test_sine_embedding_shape_layout_and_distinct_tokens():
    shapes = torch.tensor([[4, 4], [2, 3]])
    emb = sine_position_embedding(shapes, 8)
    assert emb.shape == (22, 8)
    assert torch.cdist(emb, emb).add(torch.eye(22) * 1e3).min() > 1e-3  # every token distinct
    # channel 0 is sin(2 pi y), channel 5 cos(2 pi x): token (row 1, col 2) of the 4x4 level
    assert emb[6, 0].item() == pytest.approx(math.sin(2 * math.pi * 1.5 / 4))
    assert emb[6, 5].item() == pytest.approx(math.cos(2 * math.pi * 2.5 / 4))
    torch.testing.assert_close(emb[4, :4], emb[7, :4])  # same row, same y half
    # every channel against DETR's formula, with 6 frequencies per coordinate: channel k of a half is
    # sin (k even) or cos (k odd) of 2 pi c / 10000 ** (2 (k // 2) / 6), y in the first half and x in the second
    wide = sine_position_embedding(shapes, 12)
    for token, (level, i, j) in enumerate([(0, i, j) for i in range(4) for j in range(4)] +
                                          [(1, i, j) for i in range(2) for j in range(3)]):
        h, w = shapes[level].tolist()
        for half, c in enumerate(((i + 0.5) / h, (j + 0.5) / w)):
            for k in range(6):
                angle = 2 * math.pi * c / 10000 ** (2 * (k // 2) / 6)
                expected = math.sin(angle) if k % 2 == 0 else math.cos(angle)
                assert wide[token, 6 * half + k].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        sine_position_embedding(shapes, 7)


def test_encoder_reference_points_are_pixel_centres():
    ref = encoder_reference_points(torch.tensor([[2, 4], [1, 2]]), n_levels=2)
    assert ref.shape == (10, 2, 2)
    torch.testing.assert_close(ref[:, 0], ref[:, 1])
    torch.testing.assert_close(ref[5, 0], torch.tensor([1.5 / 4, 1.5 / 2]))
    torch.testing.assert_close(ref[9, 0], torch.tensor([1.5 / 2, 0.5]))


def test_encoder_layer_is_attention_then_ffn_each_with_a_residual_and_norm():
    torch.manual_seed(8)
    layer = DeformableEncoderLayer(d_model=8, n_levels=2, n_heads=2, n_points=2, d_ffn=16)
    with torch.no_grad():  # let the query steer the sampling (zero at init)
        layer.self_attn.sampling_offsets.weight.normal_(std=0.3)
        layer.self_attn.attention_weights.weight.normal_()
    shapes = torch.tensor([[4, 4], [2, 2]])
    src, pos = torch.randn(2, 20, 8), torch.randn(20, 8)
    reference = encoder_reference_points(shapes, 2).expand(2, -1, -1, -1)
    x = layer.norm1(src + layer.self_attn(src + pos, reference, src, shapes))  # the position goes to the query only
    torch.testing.assert_close(layer(src, pos, shapes), layer.ffn.norm(x + layer.ffn.ffn(x)))
