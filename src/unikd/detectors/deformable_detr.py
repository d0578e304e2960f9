"""Deformable DETR (Zhu et al., ICLR 2021) on the project's own transformer blocks (:mod:`unikd.transformer`),
the ones the AKEs and the adaptor use.

- :class:`DETRBackbone`: the backbone's C3-C5 and one extra level (a 3x3 stride-2 convolution on C5), each projected
  to ``d_model`` channels with GroupNorm: four levels, strides 8, 16, 32, 64; no FPN.
- :class:`DeformableDETR`: the detectors' transform (normalise, pad, never resize), the backbone, the deformable encoder, N object
  queries through the deformable decoder (iterative box refinement as an option), a class and a box head on every
  decoder layer, the Hungarian loss on every layer (the last one's under the plain names, the others' as auxiliary
  losses ``<name>_<layer>``), and top-k post-processing of the last layer for inference.
- :class:`DeformableDETRAdapter`: the family ``deformable_detr``. Its features for distillation are the encoder's
  output memory, level by level (the paper, §4.1: "the features after the encoder are used as the input to AKE
  modules"), the very tensors its decoder reads.

Every geometric quantity is per image: boxes are normalised by each image's own size, reference points are placed
on the levels by the valid ratios, and padded tokens are masked out of every deformable attention, so an image's
transformer outputs and loss terms do not depend on its batch-mates' padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from unikd.config import ConfigError, DetectorConfig
from unikd.detectors.backbone import frozen_batch_norm, trunk
from unikd.detectors.base import DetectorAdapter, input_sizes
from unikd.detectors.heads import prior_bias
from unikd.detectors.registry import register_family
from unikd.detectors.transform import PadOnlyTransform
from unikd.engine import distributed as D
from unikd.pyramid import Pyramid
from unikd.transformer import (DeformableDecoder, DeformableEncoder, HungarianMatcher, refine_boxes, set_loss,
                               topk_detections, unflatten_levels)

STRIDES = [8, 16, 32, 64]


def projection(in_channels: int, d_model: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv (Xavier-uniform weights, zero bias) + GroupNorm(32):
    ``[B, in, H, W] -> [B, d_model, H / stride, W / stride]``."""
    conv = nn.Conv2d(in_channels, d_model, kernel, stride=stride, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, d_model))


class DETRBackbone(nn.Module):
    """A backbone trunk's C3, C4, C5 (``body``, any :mod:`~unikd.detectors.backbone`), each projected to ``d_model``,
    and a fourth level from a 3x3 stride-2 convolution on C5 (``input_proj``).

    ``[B, 3, H, W]`` (H, W multiples of 32) -> 4 maps ``[B, d_model, H / s, W / s]``, ``s`` = 8, 16, 32, 64
    (rounded up).
    """

    def __init__(self, name: str, trainable_layers: int, d_model: int, frozen_bn: bool = False):
        super().__init__()
        self.body = trunk(name, dict(zip(("c3", "c4", "c5"), STRIDES)), trainable_layers, frozen_bn)
        channels = self.body.channels
        self.input_proj = nn.ModuleList([*(projection(c, d_model) for c in channels),
                                         projection(channels[-1], d_model, kernel=3, stride=2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        c3, c4, c5 = self.body(x).values()
        return [proj(c) for proj, c in zip(self.input_proj, (c3, c4, c5, c5))]


class BoxMLP(nn.Sequential):
    """The box head: 3-layer MLP ``[..., d] -> [..., 4]`` box deltas (:func:`refine_boxes`), its last layer zero
    so that the first boxes are the references (a point reference gets width and height ``sigmoid(wh_bias)``)."""

    def __init__(self, d_model: int, wh_bias: float):
        super().__init__(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                         nn.Linear(d_model, 4))
        nn.init.zeros_(self[-1].weight)
        with torch.no_grad():
            self[-1].bias.copy_(torch.tensor([0.0, 0.0, wh_bias, wh_bias]))


@dataclass
class SetPredictions:
    """Every decoder layer's predictions, the last layer last.

    Attributes:
        logits: ``[D, B, N, K]`` sigmoid class logits.
        boxes: ``[D, B, N, 4]`` normalised ``cxcywh`` over each image's own region.
        references: D references the layers read (``[B, N, 2]`` points or ``[B, N, 4]`` boxes).
    """

    logits: Tensor
    boxes: Tensor
    references: list[Tensor]


def normalised_targets(targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Targets (``boxes`` xyxy in pixels) as the matcher and the set loss take them: ``boxes`` normalised
    ``cxcywh`` over each image's own ``(h, w)``, ``labels`` unchanged."""
    out = []
    for t, (h, w) in zip(targets, image_sizes):
        xyxy = t["boxes"].float() / t["boxes"].new_tensor([w, h, w, h], dtype=torch.float32)
        out.append({"labels": t["labels"], "boxes": box_convert(xyxy, "xyxy", "cxcywh")})
    return out


class DeformableDETR(nn.Module):
    """The whole detector (see the module docstring); ``cfg.fpn_channels`` is ``d_model``.

    ``forward(images, targets)`` in train mode gives ``(losses, memory)``; in eval mode ``forward(images)`` gives
    per image the top ``detections_per_img`` detections (boxes xyxy in input pixels, labels ``0..K-1``).
    """

    def __init__(self, cfg: DetectorConfig, num_classes: int):
        super().__init__()
        d = cfg.fpn_channels
        self.transform = PadOnlyTransform()
        self.backbone = DETRBackbone(cfg.backbone, cfg.trainable_layers, d, frozen_batch_norm(cfg))
        attention = dict(d_model=d, n_levels=len(STRIDES), n_heads=cfg.attention_heads,
                         n_points=cfg.attention_points, d_ffn=cfg.ffn_channels)
        self.encoder = DeformableEncoder(**attention, layers=cfg.encoder_layers)
        self.decoder = DeformableDecoder(**attention, layers=cfg.decoder_layers)
        self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # (query_pos, tgt) per query
        self.reference_point = nn.Linear(d, 2)
        nn.init.xavier_uniform_(self.reference_point.weight)
        nn.init.zeros_(self.reference_point.bias)
        # One head per decoder layer under box refinement, else one shared by all (as Deformable DETR).
        heads = cfg.decoder_layers if cfg.box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(heads))
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior_bias(0.01))
        # The first (or only) box head starts at the reference points with w = h = sigmoid(-2); under refinement
        # the later ones start as the identity on the box they refine.
        self.bbox_embed = nn.ModuleList(BoxMLP(d, -2.0 if i == 0 else 0.0) for i in range(heads))
        self.box_refine = cfg.box_refine
        self.matcher = HungarianMatcher()
        self.detections_per_img = cfg.detections_per_img

    def features(self, images: list[Tensor]) -> Pyramid:
        """Transform, backbone, encoder: the encoder's output memory as a :class:`Pyramid` (4 maps
        ``[B, d_model, H_l, W_l]``, strides 8-64, each image's size).

        images: B tensors ``[3, H, W]`` in ``[0, 1]``, of any size (the transform pads only).
        """
        batch, _ = self.transform(images)
        sizes = input_sizes(type(self).__name__, images, batch.image_sizes)
        return self.encode(Pyramid(self.backbone(batch.tensors), STRIDES, sizes))

    def encode(self, inputs: Pyramid) -> Pyramid:
        """The encoder on the projected levels ``inputs`` (4 maps ``[B, d_model, H_l, W_l]``): the output memory,
        level by level, with the same geometry."""
        memory = inputs.memory()
        return inputs.with_levels(unflatten_levels(self.encoder(memory), memory.spatial_shapes))

    def decode(self, memory: Pyramid) -> SetPredictions:
        """The object queries through the decoder on ``memory``; class logits and boxes of every layer."""
        batch = len(memory.image_sizes)
        query_pos, tgt = self.query_embed.weight.chunk(2, dim=-1)
        query_pos, tgt = query_pos.expand(batch, -1, -1), tgt.expand(batch, -1, -1)
        reference = self.reference_point(query_pos).sigmoid()  # [B, N, 2]
        hs, references = self.decoder(tgt, query_pos, reference, memory.memory(),
                                      self.bbox_embed if self.box_refine else None)
        per_layer = range(len(hs)) if self.box_refine else [0] * len(hs)
        logits = torch.stack([self.class_embed[h](x) for h, x in zip(per_layer, hs)])
        boxes = torch.stack([refine_boxes(self.bbox_embed[h](x), ref) for h, x, ref in zip(per_layer, hs, references)])
        return SetPredictions(logits, boxes, references)

    def loss(self, predictions: SetPredictions, targets: list[dict[str, Tensor]],
             image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The Hungarian loss (focal class 2, L1 5, GIoU 2, :func:`~unikd.transformer.set_loss`) of every decoder
        layer, each matched on its own; all normalised by the number of boxes (averaged over DDP ranks).
        The last layer's are ``loss_class``, ``loss_l1``, ``loss_giou``; layer ``l``'s ``loss_class_l``..."""
        gts = normalised_targets(targets, image_sizes)
        logits, boxes = predictions.logits.float(), predictions.boxes.float()  # float32 under mixed precision
        num_boxes = D.mean_over_ranks(sum(len(t["labels"]) for t in gts), logits.device)
        last = len(logits) - 1
        losses = {}
        for layer, (layer_logits, layer_boxes) in enumerate(zip(logits, boxes)):
            indices = self.matcher(layer_logits, layer_boxes, gts)
            suffix = "" if layer == last else f"_{layer}"
            for name, value in set_loss(layer_logits, layer_boxes, gts, indices, num_boxes).items():
                losses[name + suffix] = value
        return losses

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        memory = self.features(images)
        predictions = self.decode(memory)
        if self.training:
            return self.loss(predictions, targets, memory.image_sizes), memory
        return topk_detections(predictions.logits[-1], predictions.boxes[-1], memory.image_sizes,
                               self.detections_per_img)


@register_family("deformable_detr")
class DeformableDETRAdapter(DetectorAdapter):
    """Deformable DETR; ``model.fpn_channels`` is its width ``d_model``, the layer and query counts are the
    ``model`` keys ``encoder_layers``, ``decoder_layers``, ``num_queries``, ``attention_heads``,
    ``attention_points``, ``ffn_channels``, ``box_refine``. It has no anchors (``model.anchor_sizes`` is unused).

    Its :class:`~unikd.pyramid.Pyramid` is the encoder's output memory (4 levels, strides 8-64, ``d_model``
    channels), from the same pass as the losses.
    """

    feature_strides = STRIDES
    has_anchors = False

    def build_model(self, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        if cfg.fpn_channels % 32 or cfg.fpn_channels % cfg.attention_heads:
            raise ConfigError(f"model.fpn_channels: Deformable DETR's width d_model ({cfg.fpn_channels}) must be a "
                              f"multiple of 32 (GroupNorm) and of model.attention_heads ({cfg.attention_heads})")
        return DeformableDETR(cfg, num_classes)

    def training_pass(self, images: list[Tensor],
                      targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Pyramid]:
        return self.model(images, targets)

    def extract_features(self, images: list[Tensor]) -> Pyramid:
        return self.model.features(images)
