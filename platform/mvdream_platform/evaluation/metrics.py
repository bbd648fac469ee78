"""Image metrics shared by every evaluation: palette colours, foreground masks, IoU.

Small pure functions over numpy arrays (images (H, W, 3) in [0, 1], masks (H, W) bool).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def shaded_palette(ambient: float = 0.35, diffuse: float = 0.65, levels: int = 8) -> tuple[np.ndarray, list[str]]:
    """(K * levels, 3) palette colours in [0, 1] at shading factors ambient..ambient+diffuse."""
    from ..data.shapes import COLOURS

    names, samples = [], []
    for name, rgb in COLOURS.items():
        for s in np.linspace(ambient, ambient + diffuse, levels):
            samples.append(np.asarray(rgb, dtype=np.float64) / 255 * s)
            names.append(name)
    return np.stack(samples), names


def classify_colour(pixels: np.ndarray, palette: tuple[np.ndarray, list[str]]) -> str | None:
    """Majority palette colour of foreground pixels (P, 3) in [0, 1]; None without pixels."""
    if len(pixels) == 0:
        return None
    samples, names = palette
    distances = ((pixels[:, None, :] - samples[None]) ** 2).sum(-1)  # (P, K*levels)
    votes = np.asarray(names)[distances.argmin(1)]
    values, counts = np.unique(votes, return_counts=True)
    return str(values[counts.argmax()])


def foreground_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) bool: pixels far from the background colour.

    The background (a flat grey in training) is estimated as the median of the border pixels.
    """
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(image - background, axis=-1) > threshold * math.sqrt(3)


def aligned_iou(a: np.ndarray, b: np.ndarray, size: int = 64) -> float:
    """IoU of two (H, W) masks after cropping each to its bounding box and resizing to size^2."""
    if not a.any() or not b.any():
        return float(a.any() == b.any() and not a.any())
    return raw_iou(_crop_resize(a, size), _crop_resize(b, size))


def _crop_resize(mask: np.ndarray, size: int) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].astype(np.float32)
    # Pad to a square around the centre so the aspect ratio survives the resize.
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    tensor = torch.from_numpy(square)[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy() > 0.5


def raw_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) boolean masks as they lie (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def object_present(mask: np.ndarray, min_fraction: float = 0.02, min_component_share: float = 0.5) -> bool:
    """Whether a (H, W) foreground mask shows one object rather than scattered noise.

    An undertrained model samples speckle: many pixels differ from the background, but no
    connected shape holds them. A view counts as showing an object when the foreground covers
    at least ``min_fraction`` of the image and its largest 4-connected component holds at least
    ``min_component_share`` of the foreground pixels. (Measured: sampled noise 0.07-0.3,
    object views 0.9-1.0.)
    """
    from scipy import ndimage

    if mask.mean() < min_fraction:
        return False
    labels, count = ndimage.label(mask)  # 4-connected: dense speckle percolates far later
    return bool(count) and np.bincount(labels.ravel())[1:].max() >= min_component_share * mask.sum()
