"""Figures: image grids, training curves, and a few plot helpers every notebook shares."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .artifacts import atomic_write_file


def to_numpy_images(images) -> np.ndarray:
    """uint8 `[N, 3, H, W]`, float `[N, 3, H, W]` in [-1, 1], or a list of those -> uint8 `[N, H, W, 3]`."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(i) for i in images])
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def show_images(images, nrow: int | None = None, titles=None, size: float = 1.4, title: str | None = None,
                fontsize: int = 7, axes=None):
    """A grid of images with optional per-image titles; returns the figure."""
    arr = to_numpy_images(images)
    n = len(arr)
    nrow = nrow or min(n, 8)
    rows = math.ceil(n / nrow)
    if axes is None:
        fig, axes = plt.subplots(rows, nrow, figsize=(size * nrow, size * rows + (0.3 if title else 0)),
                                 squeeze=False)
    else:
        fig = axes.flat[0].figure
    axes = np.asarray(axes).reshape(-1)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=fontsize + 3)
    fig.tight_layout()
    return fig


def image_rows(rows: dict, size: float = 1.4, fontsize: int = 8):
    """One labelled row per entry of `rows` ({label: images [N, 3, H, W]}); returns the figure."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + 1.2, size * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        arr = to_numpy_images(imgs)
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(arr):
                ax.imshow(arr[c], interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)
    fig.tight_layout()
    return fig


def plot_history(history: dict, title: str = "training loss", ax=None, smooth: int = 1, label=None):
    """Loss against step (and seconds on a twin axis label) from a `Trainer` history."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3))
    steps, loss = np.asarray(history["step"]), np.asarray(history["loss"], dtype=float)
    if smooth > 1 and len(loss) > smooth:
        loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
        steps = steps[smooth - 1:]
    ax.plot(steps, loss, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    secs = history.get("seconds") or [0]
    ax.set_title(f"{title} ({history['step'][-1] if history['step'] else 0} steps, {secs[-1]:.0f} s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return ax.figure


def bar(ax, labels, values, title=None, fmt="{:.2f}", ylim=None, color=None):
    """A labelled bar chart with the values written on the bars."""
    bars = ax.bar(range(len(values)), values, color=color)
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), fmt.format(v), ha="center", va="bottom",
                fontsize=8)
    if title:
        ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    return ax


def caption_grid(images, captions, ncol: int | None = None, scale: float = 1.0, fontsize: int = 9):
    """Images with their captions under them, at their own pixel size (x `scale`); returns the figure.

    images: `[N, 3, S, S]`; captions: N strings (wrapped at word boundaries to the image's width).
    """
    arr = to_numpy_images(images)
    n, side = len(arr), arr.shape[1]
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions: pass one caption per image")
    ncol = ncol or min(n, 4)
    rows, dpi, gap = math.ceil(n / ncol), 100, 0.04               # gap between images, inches
    w = max(side * scale, 96) / dpi                               # one image's side, inches (at least ~1 inch)
    chars = max(12, int(w * 72 / (0.55 * fontsize)))              # characters per caption line at this width
    wrapped = [textwrap.fill(c, chars) for c in captions]
    lines = max(s.count("\n") + 1 for s in wrapped)
    text = (lines * fontsize * 1.3 + 8) / 72                      # the caption band under each row, inches
    width, height = ncol * w + (ncol - 1) * gap, rows * (w + text)
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    for i in range(n):
        r, c = divmod(i, ncol)
        left, top = c * (w + gap), r * (w + text)                  # inches from the top-left corner
        ax = fig.add_axes([left / width, 1 - (top + w) / height, w / width, w / height])
        ax.imshow(arr[i], interpolation="nearest")
        ax.axis("off")
        fig.text((left + w / 2) / width, 1 - (top + w + 3 / 72) / height, wrapped[i], ha="center", va="top",
                 fontsize=fontsize)
    return fig


def save_png(fig, path) -> Path:
    """Write a figure as a PNG atomically (a temporary file, then renamed): no half-written image is left."""
    return atomic_write_file(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))
