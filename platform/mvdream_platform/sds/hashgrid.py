"""Multiresolution hash encoding (Muller et al. 2022, "Instant Neural Graphics Primitives").

Plain PyTorch, so it runs (and is differentiated twice, for analytic normals) on any device
without tiny-cuda-nn. For an input ``x`` in ``[0, 1]^3`` and level ``l``:

    N_l = floor(base_resolution * per_level_scale ** l)      cells per axis
    p   = x * N_l;  c = floor(p) (clamped to N_l - 1);  f = p - c
    feature_l(x) = sum over the 8 corners v in c + {0, 1}^3 of
                   prod_axes(f if v = c + 1 else 1 - f) * table_l[index_l(v)]

``index_l`` is dense row-major indexing ``v_x + v_y (N_l+1) + v_z (N_l+1)^2`` when the level's
``(N_l + 1)^3`` vertices fit in the table (``2^log2_hashmap_size`` entries), else the spatial
hash ``(v_x * 1) xor (v_y * 2654435761) xor (v_z * 805459861) mod 2^log2_hashmap_size``.
Each level has its own table; the encoding concatenates the levels' features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CORNERS", "HASH_PRIMES", "HashGridEncoding", "level_resolutions"]

# The primes of the Instant-NGP paper (the first is 1 for memory coherence along x).
HASH_PRIMES = (1, 2654435761, 805459861)

# Corner k of a cell is the vertex cell + (k >> 2 & 1, k >> 1 & 1, k & 1): x varies slowest,
# the order a (2, 2, 2) broadcast over the axes flattens to.
CORNERS = tuple(((k >> 2) & 1, (k >> 1) & 1, k & 1) for k in range(8))


def level_resolutions(n_levels: int, base_resolution: int, per_level_scale: float) -> list[int]:
    """Cells per axis of each level: ``floor(base_resolution * per_level_scale ** l)``.

    A tiny tolerance absorbs float round-off, so the reference config
    (16 levels, base 16, scale 1.447269237440378) ends at exactly 4096.
    """
    return [int(math.floor(base_resolution * per_level_scale**level + 1e-6))
            for level in range(n_levels)]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class HashGridEncoding(nn.Module):
    """Multiresolution hash-grid encoding of points in the unit cube.

    Args:
        n_levels: number of resolution levels L.
        n_features_per_level: features per table entry F.
        log2_hashmap_size: log2 of the largest table T (entries per level).
        base_resolution: cells per axis of the coarsest level.
        per_level_scale: growth factor of the resolution between levels (>= 1).
        init_scale: table entries start uniform in ``[-init_scale, init_scale]``
            (tiny-cuda-nn's 1e-4, so the encoding starts near zero and the field starts as
            its bias); drawn from torch's global RNG.

    Input ``(P, 3)`` in ``[0, 1]`` (clamped; outside points take the boundary's features and
    no gradient), output ``(P, L * F)``, level-major (level 0's F features first).
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 19, base_resolution: int = 16,
                 per_level_scale: float = 1.447269237440378, init_scale: float = 1e-4):
        super().__init__()
        for name, value in (("n_levels", n_levels), ("n_features_per_level", n_features_per_level),
                            ("log2_hashmap_size", log2_hashmap_size),
                            ("base_resolution", base_resolution)):
            _check_positive_int(name, value)
        if log2_hashmap_size > 30:
            raise ValueError(f"log2_hashmap_size must be <= 30, got {log2_hashmap_size}")
        if not per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1, got {per_level_scale!r}")
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.hashmap_size = 2**log2_hashmap_size

        resolutions = level_resolutions(n_levels, base_resolution, per_level_scale)
        # A level is stored densely when all its (N+1)^3 vertices fit in a table of T entries:
        # no collisions and no wasted entries; finer levels share T entries through the hash.
        hashed = [(n + 1) ** 3 > self.hashmap_size for n in resolutions]
        sizes = [self.hashmap_size if h else (n + 1) ** 3 for n, h in zip(resolutions, hashed)]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)

        self.resolutions = resolutions
        self.table_sizes = sizes
        self.register_buffer("_resolution", torch.tensor(resolutions, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("is_hashed", torch.tensor(hashed), persistent=False)
        self._n_dense = hashed.count(False)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("_primes", torch.tensor(HASH_PRIMES, dtype=torch.int64),
                             persistent=False)
        # All levels' tables in one parameter (sum of table sizes, F): one gather per call.
        self.embeddings = nn.Parameter(torch.empty(sum(sizes), n_features_per_level))
        nn.init.uniform_(self.embeddings, -init_scale, init_scale)

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def corner_indices_and_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows and trilinear weights of every cell corner at every level.

        Args:
            x: (P, 3) points in [0, 1] (clamped; no gradient flows to clamped coordinates).

        Returns:
            indices: (P, L, 8) int64 rows of ``embeddings`` (level offsets included); corner
                ``k`` is the vertex ``cell + CORNERS[k]``.
            weights: (P, L, 8) in x's dtype, summing to 1 over the corners; differentiable
                (twice) with respect to ``x``.
        """
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"points must have shape (P, 3), got {tuple(x.shape)}")
        res = self._resolution  # (L,)
        pos = x.clamp(0.0, 1.0)[:, None, :] * res[:, None].to(x.dtype)  # (P, L, 3)
        # Clamp the cell so x = 1 lies in the last cell (at its far face, f = 1).
        cell = torch.minimum(pos.detach().floor().long(), (res - 1)[:, None])  # (P, L, 3)
        frac = pos - cell.to(x.dtype)  # (P, L, 3); carries d/dx for analytic normals

        # Everything here is separable over the axes: (P, L, 2) factors per axis (near and far
        # vertex) combined by a (2, 2, 2) broadcast, instead of (P, L, 8, 3) tensors (5x
        # faster on CPU). Weight of a corner: product over axes of f (far) or 1 - f (near).
        weights = _outer3(*(torch.stack([1 - f, f], dim=-1) for f in frac.unbind(-1)),
                          combine=torch.mul)  # (P, L, 8)

        near_far = torch.stack([cell, cell + 1], dim=-1)  # (P, L, 3, 2)
        n_dense = self._n_dense  # dense levels are the coarse ones, first
        parts = []
        if n_dense:
            v = near_far[:, :n_dense]
            side = (res[:n_dense] + 1)[:, None]  # (Ld, 1) vertices per axis
            parts.append(_outer3(v[:, :, 0], side * v[:, :, 1], side * side * v[:, :, 2],
                                 combine=torch.add))
        if n_dense < self.n_levels:
            # int64 products cannot overflow here, and masking keeps their low bits, which
            # equal the low bits of tiny-cuda-nn's wrapping uint32 products.
            v = near_far[:, n_dense:] * self._primes[:, None]
            hashed = _outer3(*v.unbind(2), combine=torch.bitwise_xor)
            parts.append(hashed & (self.hashmap_size - 1))
        local = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (P, L, 8)
        return local + self._offsets[:, None], weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(P, 3) points in [0, 1] -> (P, L * F) features (twice differentiable in x)."""
        indices, weights = self.corner_indices_and_weights(x)
        # Gather each feature plane separately: (P, L, 8) products with no size-F inner
        # dimension vectorise better on CPU; index_select's backward is an index_add.
        flat = indices.reshape(-1)
        features = [(weights * table.index_select(0, flat).view_as(weights)).sum(dim=-1)
                    for table in self.embeddings.unbind(1)]  # F x (P, L)
        return torch.stack(features, dim=-1).reshape(x.shape[0], self.n_output_dims)


def _outer3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, combine) -> torch.Tensor:
    """(..., 2) x3 -> (..., 8): ``combine`` over all (i, j, k), flattened with k fastest."""
    ab = combine(a[..., :, None], b[..., None, :])  # (..., 2, 2)
    abc = combine(ab[..., :, :, None], c[..., None, None, :])  # (..., 2, 2, 2)
    return abc.flatten(-3)
