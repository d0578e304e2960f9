"""The report's figures as PNG files, drawn with matplotlib's object API (no pyplot, no global state).

Images are ``[H, W]`` or ``[H, W, 3]`` arrays in ``[0, 1]``; boxes ``[n, 4]`` xyxy in their pixels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .probes import SampledQueries

DPI = 100
COLOURS = {"ct": "red", "pos": "limegreen"}
QUERY_NAMES = {"ct": "content queries", "pos": "positional queries"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _show_image(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _boxes(ax, boxes: np.ndarray, colour: str, texts: list[str] | None = None, style: str = "-") -> None:
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5,
                               linestyle=style))
        if texts:
            ax.text(x0, y0, texts[i], color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})


def map_bars(labels: list[str], metrics: list[dict[str, float]], path: Path) -> Path:
    """AP and AP50 (in %) of each model, side by side."""
    fig = Figure(figsize=(1.4 * len(labels) + 2, 3.2))
    ax = fig.subplots()
    x = np.arange(len(labels))
    for offset, key, alpha in ((-0.2, "AP", 1.0), (0.2, "AP50", 0.45)):
        values = [100 * m[key] for m in metrics]
        bars = ax.bar(x + offset, values, width=0.4, alpha=alpha, color="tab:blue", label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("val COCO AP (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def training_curves(series: list[tuple[str, list[int], list[float], list[float] | None]], path: Path) -> Path:
    """Per student ``(label, steps, detection loss, KD loss or None)``: one panel of each loss against the step."""
    fig = Figure(figsize=(10, 3.4))
    det, kd = fig.subplots(1, 2)
    for label, steps, det_loss, kd_loss in series:
        det.plot(steps, det_loss, marker="." if len(steps) < 3 else None, label=label)
        if kd_loss is not None:
            kd.plot(steps, kd_loss, marker="." if len(steps) < 3 else None, label=label)
    det.set_title("detection loss")
    kd.set_title("KD loss (as weighted in training)")
    for ax in (det, kd):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def activation_grid(images: list[np.ndarray], rows: list[tuple[str, list[dict[int, np.ndarray]]]],
                    path: Path) -> Path:
    """Fig. 1: for each image, one row per model ``(label, per image {stride: map})``: the image, then the
    model's map at each stride any model has (blank where it has none), each map scaled to its own range."""
    strides = sorted({s for _, maps in rows for m in maps for s in m})
    n_rows, n_cols = len(images) * len(rows), len(strides) + 1
    fig = Figure(figsize=(1.5 * n_cols, 1.5 * n_rows))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        for r, (label, maps) in enumerate(rows):
            row = axes[i * len(rows) + r]
            _show_image(row[0], image)
            row[0].set_ylabel(label, fontsize=8)
            for ax, stride in zip(row[1:], strides):
                ax.set_axis_off()
                if stride in maps[i]:
                    level = maps[i][stride]  # cells of stride px from the top-left corner
                    ax.imshow(level, cmap="viridis", extent=(0, level.shape[1] * stride, level.shape[0] * stride, 0))
                    ax.set_xlim(0, w)
                    ax.set_ylim(h, 0)
    for ax, stride in zip(axes[0, 1:], strides):
        ax.set_title(f"P{int(math.log2(stride))} (stride {stride})", fontsize=8)
    fig.suptitle("channel mean of |F| per FPN level", fontsize=10)
    return _save(fig, path)


def sampling_points(images: list[np.ndarray], queries: list[dict[str, SampledQueries]], path: Path) -> Path:
    """Fig. 4: per image, the content queries (red) and the positional queries (green) with their boxes and the
    points where ``f_e`` samples for them, each dot's area proportional to its attention weight."""
    kinds = [k for k in ("ct", "pos") if any(k in q for q in queries)]
    fig = Figure(figsize=(3.2 * len(kinds), 3.2 * len(images)))
    axes = np.asarray(fig.subplots(len(images), len(kinds), squeeze=False))
    for row, image, sampled in zip(axes, images, queries):
        h, w = image.shape[:2]
        for ax, kind in zip(row, kinds):
            _show_image(ax, image)
            q = sampled[kind]
            points = q.points.reshape(-1, 2)
            ax.scatter(points[:, 0], points[:, 1], s=300 * q.weights.reshape(-1), c=COLOURS[kind], alpha=0.6,
                       linewidths=0)
            _boxes(ax, q.boxes, COLOURS[kind], style="--" if kind == "ct" else "-")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
    for ax, kind in zip(axes[0], kinds):
        ax.set_title(QUERY_NAMES[kind], fontsize=9)
    return _save(fig, path)


def detection_grid(images: list[np.ndarray], truths: list[dict[str, np.ndarray]],
                   columns: list[tuple[str, list[dict[str, np.ndarray]]]], class_names: list[str],
                   path: Path) -> Path:
    """One row per image: the ground truth, then each model's detections ``(label, per image {boxes, labels,
    scores})``."""
    fig = Figure(figsize=(2.6 * (len(columns) + 1), 2.6 * len(images)))
    axes = np.asarray(fig.subplots(len(images), len(columns) + 1, squeeze=False))
    for i, (row, image, truth) in enumerate(zip(axes, images, truths)):
        _show_image(row[0], image)
        _boxes(row[0], truth["boxes"], "gold", [class_names[c] for c in truth["labels"]])
        for ax, (_, per_image) in zip(row[1:], columns):
            _show_image(ax, image)
            d = per_image[i]
            _boxes(ax, d["boxes"], "deepskyblue",
                   [f"{class_names[c]} {s:.2f}" for c, s in zip(d["labels"], d["scores"])])
    for ax, title in zip(axes[0], ["ground truth", *(label for label, _ in columns)]):
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
