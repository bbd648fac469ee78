"""The NeRF field optimised by score distillation: hash grid -> density and albedo.

As in MVDream-threestudio's ``implicit-volume`` geometry (the paper's text-to-3D config):

    x_n     = (x / radius + 1) / 2                       world box [-r, r]^3 -> [0, 1]^3
    h       = HashGrid(x_n)                               (L * F,)
    sigma   = softplus(MLP_sigma(h) + blob(x))            blob(x) = s * (1 - |x| / std)
    albedo  = sigmoid(MLP_albedo(h))                      (3,) in (0, 1)
    normal  = -grad_x sigma / |grad_x sigma|              analytic, or central differences

The "blob_magic3d" bias (s = 10, std = 0.5) makes a soft ball of density at the origin
from the first step (raw density +10 at the centre, 0 at |x| = 0.5, -10 at |x| = 1), so the
optimisation starts from an object in the middle instead of floaters anywhere.

The MLPs have no biases, like tiny-cuda-nn's fused MLPs the reference uses: with the grid
initialised near zero the field starts as exactly its blob and a mid-grey albedo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mvdream_platform.sds.hashgrid import HashGridEncoding

__all__ = [
    "DENSITY_BIASES",
    "NORMAL_TYPES",
    "FieldConfig",
    "FieldOutput",
    "NeRFField",
    "analytic_normals",
    "finite_difference_normals",
]

NORMAL_TYPES = ("analytic", "finite_difference")
DENSITY_BIASES = ("blob_magic3d", "none")

DensityFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FieldConfig:
    """Field hyper-parameters; defaults are the reference (MVDream-threestudio) ones.

    radius: the scene is the box [-radius, radius]^3 (the renderer samples its inscribed
        sphere).
    n_levels ... per_level_scale: hash grid (16 levels x 2 features, 2^19 entries per level,
        16 to 4096 cells per axis).
    hidden_dim, n_hidden_layers: each of the density and albedo MLPs (ReLU, no biases).
    density_bias: "blob_magic3d" (blob_scale * (1 - |x| / blob_std) added before the
        softplus) or "none".
    normal_type: "analytic" (autograd gradient, trainable through) or "finite_difference"
        (central differences with step finite_difference_eps, in world units).
    """

    radius: float = 1.0
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    density_bias: str = "blob_magic3d"
    blob_scale: float = 10.0
    blob_std: float = 0.5
    normal_type: str = "analytic"
    finite_difference_eps: float = 0.01

    @classmethod
    def tiny(cls, **overrides) -> FieldConfig:
        """A CPU-sized field: 6 levels, 4..30 cells per axis, 2^12 entries, 16-wide MLPs."""
        values = dict(n_levels=6, log2_hashmap_size=12, base_resolution=4,
                      per_level_scale=1.5, hidden_dim=16)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {self.radius!r}")
        if self.normal_type not in NORMAL_TYPES:
            raise ValueError(f"normal_type must be one of {NORMAL_TYPES}, got "
                             f"{self.normal_type!r}")
        if self.density_bias not in DENSITY_BIASES:
            raise ValueError(f"density_bias must be one of {DENSITY_BIASES}, got "
                             f"{self.density_bias!r}")
        if not self.blob_std > 0:
            raise ValueError(f"blob_std must be > 0, got {self.blob_std!r}")
        if not self.finite_difference_eps > 0:
            raise ValueError(f"finite_difference_eps must be > 0, got "
                             f"{self.finite_difference_eps!r}")
        for name in ("hidden_dim", "n_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class FieldOutput:
    """What the field says about P points.

    density: (P,) >= 0, per unit length in world units.
    albedo: (P, 3) in (0, 1).
    normal: (P, 3) unit world-space normals pointing out of the density (or zero where the
        density is flat), or None when not asked for.
    """

    density: torch.Tensor
    albedo: torch.Tensor
    normal: torch.Tensor | None = None


def _mlp(in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.ReLU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


def _check_points(points: torch.Tensor) -> None:
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (P, 3), got {tuple(points.shape)}")


def analytic_normals(density_fn: DensityFn, points: torch.Tensor,
                     create_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals as the negative normalised gradient of a density, by autograd.

    Args:
        density_fn: (P, 3) -> (P,) density.
        points: (P, 3) world points.
        create_graph: keep the gradient's graph so a loss on the normals trains the field
            (default: whenever grad mode is on outside this call). Without it the normals are
            detached.

    Returns:
        density: (P,) (differentiable as density_fn made it).
        normal: (P, 3) unit vectors, zero where the gradient vanishes.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # Differentiate w.r.t. the caller's points when they already carry a graph, so the
        # caller keeps its own gradient path; otherwise w.r.t. a fresh leaf.
        x = points if points.requires_grad else points.detach().requires_grad_(True)
        density = density_fn(x)
        (grad,) = torch.autograd.grad(density, x, torch.ones_like(density),
                                      create_graph=create_graph)
    normal = nn.functional.normalize(-grad, dim=-1)
    if not create_graph:
        density, normal = density.detach(), normal.detach()
    return density, normal


def finite_difference_normals(density_fn: DensityFn, points: torch.Tensor,
                              eps: float) -> torch.Tensor:
    """Normals from central differences: -normalise((s(x + eps e_i) - s(x - eps e_i)) / 2 eps).

    Args:
        density_fn: (P, 3) -> (P,) density.
        points: (P, 3) world points.
        eps: step in world units.

    Returns:
        (P, 3) unit vectors (differentiable w.r.t. the field's parameters).
    """
    offsets = eps * torch.eye(3, dtype=points.dtype, device=points.device)  # (3, 3)
    probes = torch.cat([points[:, None, :] + offsets, points[:, None, :] - offsets], dim=1)
    density = density_fn(probes.reshape(-1, 3)).reshape(-1, 6)  # (P, [+x, +y, +z, -x, -y, -z])
    grad = (density[:, :3] - density[:, 3:]) / (2 * eps)
    return nn.functional.normalize(-grad, dim=-1)


class NeRFField(nn.Module):
    """Density + albedo field on a hash grid (see the module docstring).

    Parameters are initialised from torch's global RNG: seed it for reproducible fields.
    Whoever renders it only needs ``density``, ``forward`` and the parameters' device.
    """

    def __init__(self, config: FieldConfig | None = None):
        super().__init__()
        config = FieldConfig() if config is None else config
        self.config = config
        self.encoding = HashGridEncoding(
            n_levels=config.n_levels, n_features_per_level=config.n_features_per_level,
            log2_hashmap_size=config.log2_hashmap_size,
            base_resolution=config.base_resolution, per_level_scale=config.per_level_scale)
        dim = self.encoding.n_output_dims
        self.density_mlp = _mlp(dim, config.hidden_dim, config.n_hidden_layers, 1)
        self.albedo_mlp = _mlp(dim, config.hidden_dim, config.n_hidden_layers, 3)

    # ------------------------------------------------------------------ pieces
    def _encode(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) world -> (P, L * F) features of the points mapped to the unit cube."""
        return self.encoding((points / self.config.radius + 1.0) * 0.5)

    def density_bias(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) world -> (P,) pre-activation bias (the blob), 0 for ``density_bias="none"``."""
        if self.config.density_bias == "none":
            return points.new_zeros(points.shape[0])
        distance = torch.linalg.vector_norm(points, dim=-1)
        return self.config.blob_scale * (1.0 - distance / self.config.blob_std)

    def _density_from(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        raw = self.density_mlp(features)[:, 0] + self.density_bias(points)
        return nn.functional.softplus(raw)

    # ------------------------------------------------------------------ public
    def density(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) world points -> (P,) density (the cheap query for occupancy/pruning)."""
        _check_points(points)
        return self._density_from(self._encode(points), points)

    def forward(self, points: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        """Density, albedo and (optionally) normals at (P, 3) world points.

        Analytic normals keep their graph whenever grad mode is on, so losses on shading or
        orientation train the density through them (a second backward through the grid).
        """
        _check_points(points)
        features: dict[str, torch.Tensor] = {}

        def density_fn(x: torch.Tensor) -> torch.Tensor:
            features["h"] = self._encode(x)  # reused for the albedo: one grid lookup
            return self._density_from(features["h"], x)

        normal = None
        if with_normals and self.config.normal_type == "analytic":
            density, normal = analytic_normals(density_fn, points)
            if not torch.is_grad_enabled():
                features["h"] = features["h"].detach()
        else:
            density = density_fn(points)
            if with_normals:
                normal = finite_difference_normals(self.density, points,
                                                   self.config.finite_difference_eps)
        albedo = torch.sigmoid(self.albedo_mlp(features["h"]))
        return FieldOutput(density=density, albedo=albedo, normal=normal)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoding": hash tables, "mlp": density + albedo MLPs} (reference lr 1e-2 / 1e-3)."""
        return {
            "encoding": list(self.encoding.parameters()),
            "mlp": list(self.density_mlp.parameters()) + list(self.albedo_mlp.parameters()),
        }
