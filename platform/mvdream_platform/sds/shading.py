"""Shading (materials) and backgrounds for score distillation.

Shading modes of a rendered sample with albedo ``a``, unit normal ``n``, point light at ``p``
(``l = normalise(p - x)``), ambient colour ``k_a`` and diffuse colour ``k_d``:

    "albedo"       rgb = a                                  (no light; the first steps)
    "diffuse"      rgb = a * (k_a + k_d * max(0, n . l))
    "textureless"  rgb =      k_a + k_d * max(0, n . l)     (white albedo: geometry only)

Each training step draws one mode for the whole batch (:func:`sample_shading`), as
MVDream-threestudio's ``diffuse-with-point-light-material`` does: albedo only for the first
``ambient_only_steps``, then with probability ``diffuse_prob`` a lit mode (textureless with
probability ``textureless_prob``, else diffuse), else albedo. Soft shading draws the ambient
level ``k_a = 1 - r, k_d = r`` with ``r ~ U[0, 1)`` per step. Lighting the geometry (and
sometimes removing its texture) keeps the optimisation from painting shape into the albedo.

Backgrounds: :class:`EnvironmentBackground` is a small MLP on the viewing direction (the
reference's "neural environment map"); :func:`random_background_color` replaces it, with
probability 0.5, by one random colour shared by the whole batch, which stops the field from
explaining the background with floaters.

Every random draw comes from a caller-given CPU ``torch.Generator`` in a fixed order, so a
seed reproduces a run whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LIGHT_SAMPLE_STRATEGIES",
    "SHADING_MODES",
    "EnvironmentBackground",
    "Shading",
    "ShadingConfig",
    "check_shading_mode",
    "random_background_color",
    "sample_shading",
    "shade",
    "spherical_harmonics_deg3",
]

SHADING_MODES = ("albedo", "diffuse", "textureless")
LIGHT_SAMPLE_STRATEGIES = ("dreamfusion", "orbit")

Color = Sequence[float] | torch.Tensor


def check_shading_mode(mode: object) -> str:
    """``mode`` if it is one of SHADING_MODES, else a ValueError listing them."""
    if mode not in SHADING_MODES:
        raise ValueError(f"shading must be one of {SHADING_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass
class ShadingConfig:
    """How training steps are shaded; defaults are MVDream-threestudio's shading config.

    ambient_only_steps: steps rendered with albedo only (5000 in the paper's config).
    diffuse_prob: afterwards, probability of a lit mode (threestudio's default 0.75; the
        rest is albedo).
    textureless_prob: probability that a lit step is textureless (white albedo).
    soft_shading: draw the ambient level per step (k_a = 1 - r, k_d = r); otherwise use
        ambient_light_color / diffuse_light_color.
    light_sample_strategy: "dreamfusion" (the reference: the light lies in the direction of
        each view's camera plus a Gaussian perturbation of std light_position_perturb shared
        by the group, at a distance shared by the group) or "orbit" (one world-space light
        per group: azimuth uniform, elevation uniform in light_elevation_range_deg; every view
        of a group sees the same light).
    light_distance_range: distance of the light from the origin (world units).
    """

    ambient_only_steps: int = 5000
    diffuse_prob: float = 0.75
    textureless_prob: float = 0.5
    soft_shading: bool = True
    ambient_light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    diffuse_light_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    light_sample_strategy: str = "dreamfusion"
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    light_position_perturb: float = 1.0
    light_elevation_range_deg: tuple[float, float] = (30.0, 90.0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("diffuse_prob", "textureless_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.ambient_only_steps < 0:
            raise ValueError(f"ambient_only_steps must be >= 0, got {self.ambient_only_steps!r}")
        if self.light_sample_strategy not in LIGHT_SAMPLE_STRATEGIES:
            raise ValueError(f"light_sample_strategy must be one of {LIGHT_SAMPLE_STRATEGIES}, "
                             f"got {self.light_sample_strategy!r}")
        low, high = self.light_distance_range
        if not 0.0 < low <= high:
            raise ValueError(f"light_distance_range must satisfy 0 < low <= high, got "
                             f"{self.light_distance_range!r}")
        low, high = self.light_elevation_range_deg
        if not -90.0 <= low <= high <= 90.0:
            raise ValueError("light_elevation_range_deg must satisfy -90 <= low <= high <= 90, "
                             f"got {self.light_elevation_range_deg!r}")
        for name in ("ambient_light_color", "diffuse_light_color"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")


@dataclass
class Shading:
    """The shading of one render.

    mode: one of SHADING_MODES.
    ambient_color, diffuse_color: RGB light colours (3 numbers or a (3,) tensor); the
        defaults are threestudio's material defaults (0.1 ambient, 0.9 diffuse), good for
        looking at renders.
    light_positions: (N, 3) one point light per view, or (3,) shared, world coordinates;
        None: a light at each camera (a head light). Unused by "albedo".
    """

    mode: str = "albedo"
    ambient_color: Color = (0.1, 0.1, 0.1)
    diffuse_color: Color = (0.9, 0.9, 0.9)
    light_positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_shading_mode(self.mode)

    @property
    def needs_normals(self) -> bool:
        return self.mode != "albedo"


def shade(shading: Shading, albedo: torch.Tensor, normal: torch.Tensor | None,
          points: torch.Tensor, light_positions: torch.Tensor | None) -> torch.Tensor:
    """Colour of P samples under ``shading`` (see the module docstring).

    Args:
        shading: mode and light colours (its light_positions are ignored here).
        albedo: (P, 3) in [0, 1].
        normal: (P, 3) unit normals; required unless the mode is "albedo".
        points: (P, 3) sample positions (world).
        light_positions: (P, 3) the light of each sample's view; required unless "albedo".

    Returns:
        (P, 3) colours (not clipped: k_a + k_d may exceed 1).
    """
    if shading.mode == "albedo":
        return albedo
    if normal is None or light_positions is None:
        raise ValueError(f"shading {shading.mode!r} needs normals and light positions")
    ambient = torch.as_tensor(shading.ambient_color, dtype=albedo.dtype, device=albedo.device)
    diffuse = torch.as_tensor(shading.diffuse_color, dtype=albedo.dtype, device=albedo.device)
    to_light = nn.functional.normalize(light_positions - points, dim=-1)
    lambert = (normal * to_light).sum(dim=-1, keepdim=True).clamp_min(0.0)  # (P, 1)
    light = ambient + diffuse * lambert  # (P, 3): the colour a white surface would have
    return light if shading.mode == "textureless" else albedo * light


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + u * (high - low)


def _sample_light_positions(config: ShadingConfig, camera_positions: torch.Tensor,
                            views_per_group: int, generator: torch.Generator | None
                            ) -> torch.Tensor:
    """(N, 3) camera positions -> (N, 3) light positions, one draw per group.

    Draws the same numbers whatever the strategy (4 uniforms + 3 normals per group).
    """
    n = camera_positions.shape[0]
    groups = n // views_per_group
    u = torch.rand(3, groups, generator=generator, dtype=torch.float64)
    u_dist, u_azim, u_elev = u
    noise = torch.randn(groups, 3, generator=generator, dtype=torch.float64)
    distance = _uniform(u_dist, *config.light_distance_range)  # (G,)

    def per_view(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(views_per_group, dim=0)

    if config.light_sample_strategy == "dreamfusion":
        direction = nn.functional.normalize(
            camera_positions.detach().cpu().double()
            + per_view(noise) * config.light_position_perturb, dim=-1)
        positions = direction * per_view(distance)[:, None]
    else:
        azimuth = torch.deg2rad(_uniform(u_azim, -180.0, 180.0))
        elevation = torch.deg2rad(_uniform(u_elev, *config.light_elevation_range_deg))
        positions = per_view(distance[:, None] * torch.stack(
            [torch.cos(elevation) * torch.cos(azimuth), torch.cos(elevation) * torch.sin(azimuth),
             torch.sin(elevation)], dim=-1))
    return positions.to(device=camera_positions.device, dtype=torch.float32)


def sample_shading(config: ShadingConfig, step: int, camera_positions: torch.Tensor,
                   views_per_group: int = 4, *,
                   generator: torch.Generator | None = None) -> Shading:
    """The shading of one training step (one mode for the whole batch).

    Args:
        config: the shading schedule.
        step: the global training step (albedo only while step < ambient_only_steps).
        camera_positions: (N, 3) camera centres (c2w[:, :3, 3]), N = groups * views_per_group,
            views contiguous per group.
        views_per_group: views sharing one light draw.
        generator: CPU generator for every draw. The same numbers are drawn at every step
            (3 uniforms for mode and soft shading, then the lights), so the stream does not
            depend on which branch was taken.

    Returns:
        Shading with light_positions (N, 3) on camera_positions' device (drawn even in
        albedo steps, where they are unused).
    """
    if camera_positions.ndim != 2 or camera_positions.shape[-1] != 3:
        raise ValueError(f"camera_positions must have shape (N, 3), got "
                         f"{tuple(camera_positions.shape)}")
    if views_per_group < 1 or camera_positions.shape[0] % views_per_group:
        raise ValueError(f"the number of cameras ({camera_positions.shape[0]}) must be a "
                         f"multiple of views_per_group ({views_per_group})")
    u_lit, u_textureless, u_soft = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    lights = _sample_light_positions(config, camera_positions, views_per_group, generator)

    if step < config.ambient_only_steps or u_lit >= config.diffuse_prob:
        mode = "albedo"
    elif u_textureless < config.textureless_prob:
        mode = "textureless"
    else:
        mode = "diffuse"
    if config.soft_shading:
        ambient, diffuse = (1.0 - u_soft,) * 3, (u_soft,) * 3
    else:
        ambient, diffuse = tuple(config.ambient_light_color), tuple(config.diffuse_light_color)
    return Shading(mode=mode, ambient_color=ambient, diffuse_color=diffuse,
                   light_positions=lights)


# ----------------------------------------------------------------------------- backgrounds


def spherical_harmonics_deg3(directions: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 3 of unit directions: (..., 3) -> (..., 16).

    The usual orthonormal real basis (band l has 2l + 1 functions); a smooth, bounded input
    for a background MLP, where a learned map should vary slowly with the direction.
    """
    x, y, z = directions.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * x * y,
        -1.0925484305920792 * y * z,
        0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (yy - 3 * xx),
        2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1 - 5 * zz),
        0.3731763325901154 * z * (5 * zz - 3),
        0.45704579946446572 * x * (1 - 5 * zz),
        1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (3 * yy - xx),
    ], dim=-1)


class EnvironmentBackground(nn.Module):
    """Learned background colour as a function of the viewing direction only.

    rgb = sigmoid(MLP(SH_3(d))): degree-3 spherical harmonics (16 inputs), ``n_hidden_layers``
    ReLU layers of ``hidden_dim`` (reference: 2 x 16), no biases. Initialised from torch's
    global RNG.
    """

    def __init__(self, hidden_dim: int = 16, n_hidden_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        dim = 16
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.ReLU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, 3, bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        """(..., 3) unit view directions (world) -> (..., 3) rgb in (0, 1)."""
        if directions.shape[-1] != 3:
            raise ValueError(f"directions must have shape (..., 3), got "
                             f"{tuple(directions.shape)}")
        return torch.sigmoid(self.mlp(spherical_harmonics_deg3(directions)))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"background": all parameters} (reference lr 1e-3)."""
        return {"background": list(self.parameters())}


def random_background_color(generator: torch.Generator | None = None, prob: float = 0.5,
                            device: torch.device | str | None = None) -> torch.Tensor | None:
    """With probability ``prob`` one random RGB colour for the whole batch, else None.

    Always draws 4 numbers (the coin, then the colour), so the stream does not depend on
    the outcome. Returns a (3,) float32 tensor in [0, 1) on ``device``, or None (use the
    learned background).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    draws = torch.rand(4, generator=generator)
    if draws[0].item() >= prob:
        return None
    return draws[1:].to(device=device, dtype=torch.float32)
