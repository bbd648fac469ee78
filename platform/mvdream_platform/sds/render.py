"""Volume rendering of a NeRF field for score distillation, with nerfacc.

For every pixel's ray ``r(t) = o + t d`` (``cameras.get_rays``: one ray per pixel centre,
unit ``d``) the renderer integrates the field inside the scene sphere of radius ``radius``:

    w_i = T_i (1 - exp(-sigma_i delta_i)),  T_i = exp(-sum_{j<i} sigma_j delta_j)
    rgb = sum_i w_i c_i + (1 - sum_i w_i) * background(d)

Two sampling paths, chosen by the device of the field's parameters:

* **CUDA**: nerfacc's ``OccGridEstimator`` marches the ray in steps of ``render_step_size``
  (``sqrt(3) * 2 * radius / cuda_samples_per_ray``, the reference's 512 samples) through the
  occupied cells of an occupancy grid, skipping samples with alpha below ``alpha_threshold``;
  samples are *packed* (a flat list with ``ray_indices``) and composited by nerfacc's packed
  functions. Keep the grid current with :meth:`VolumeRenderer.update_occupancy` every step.
* **CPU**: ``num_samples_per_ray`` stratified samples between the ray's entry into and exit
  from the sphere (our own ray-sphere test: nerfacc's ``ray_aabb_intersect`` is CUDA-only),
  composited by nerfacc's *batched* (2-D, no ``ray_indices``) functions, which are pure
  PyTorch. With ``skip_empty_space`` the same occupancy grid is kept on the CPU (nerfacc's
  ``OccGridEstimator`` update is plain torch; only its marching is CUDA): the stratified
  samples that fall in empty cells get density 0 without a field query, and rays with no
  occupied sample count as misses. Only the occupied samples (a fraction after the first
  updates) reach the field, its normals and the backward pass. Nothing on this path touches
  nerfacc's CUDA extension, whose first use would try a JIT build with nvcc.

Only the rays that hit the sphere are sampled; the others get opacity 0 and the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nerfacc
import torch
from torch import nn

from mvdream_platform.cameras import get_rays
from mvdream_platform.sds.field import FieldOutput
from mvdream_platform.sds.shading import SHADING_MODES, Shading, check_shading_mode, shade

__all__ = ["RenderConfig", "RenderOutput", "VolumeRenderer", "ray_sphere_intersect"]


@dataclass
class RenderConfig:
    """Renderer settings.

    radius: the scene sphere (should match the field's radius).
    num_samples_per_ray: samples per ray on the CPU path (stratified in the ray's chord).
    stratified: jitter sample positions while training (evaluation uses bin centres).
    near_plane: no sample closer than this to the camera.
    occ_grid_resolution, occ_grid_levels: the CUDA path's occupancy grid over the box
        [-radius, radius]^3 (the reference: 32^3, one level).
    occ_update_interval, occ_threshold, occ_ema_decay, occ_warmup_steps: its update
        (``OccGridEstimator.update_every_n_steps``): every n steps, cells whose
        density * step size stays above the threshold are kept.
    cuda_samples_per_ray: sets the CUDA path's march step, sqrt(3) * 2 * radius / this.
    alpha_threshold, early_stop_eps: CUDA path pruning of transparent / hidden samples.
    skip_empty_space: CPU path: keep the occupancy grid up to date there too and query the
        field only at samples in occupied cells (level 0 of the grid; on the CPU a cell's
        occupancy is density * the longest chord's bin, 2 radius / num_samples_per_ray).
    eval_chunk_size: under ``torch.no_grad()`` the field is queried this many points at a time
        (big evaluation renders then need little memory); with gradients it is queried at once.
    """

    radius: float = 1.0
    num_samples_per_ray: int = 64
    stratified: bool = True
    near_plane: float = 0.0
    occ_grid_resolution: int = 32
    occ_grid_levels: int = 1
    occ_update_interval: int = 16
    occ_threshold: float = 0.01
    occ_ema_decay: float = 0.95
    occ_warmup_steps: int = 256
    cuda_samples_per_ray: int = 512
    alpha_threshold: float = 0.01
    early_stop_eps: float = 1e-4
    skip_empty_space: bool = True
    eval_chunk_size: int = 65536

    @property
    def render_step_size(self) -> float:
        """The CUDA path's march step in world units (the box diagonal / cuda_samples_per_ray)."""
        return math.sqrt(3.0) * 2.0 * self.radius / self.cuda_samples_per_ray

    @property
    def cpu_step_size(self) -> float:
        """The CPU path's widest bin (the diameter's chord / num_samples_per_ray)."""
        return 2.0 * self.radius / self.num_samples_per_ray

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {self.radius!r}")
        for name in ("num_samples_per_ray", "occ_grid_resolution", "occ_grid_levels",
                     "occ_update_interval", "cuda_samples_per_ray", "eval_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.near_plane < 0:
            raise ValueError(f"near_plane must be >= 0, got {self.near_plane!r}")


def ray_sphere_intersect(origins: torch.Tensor, directions: torch.Tensor, radius: float,
                         near_plane: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where rays enter and leave the sphere of ``radius`` at the origin.

    Solves ``|o + t d|^2 = r^2`` for unit ``d``: ``t = -b -+ sqrt(b^2 - c)`` with ``b = o . d``,
    ``c = |o|^2 - r^2``; the entry is clipped to ``near_plane`` (a camera inside the sphere
    starts at the near plane).

    Args:
        origins: (R, 3) ray origins.
        directions: (R, 3) unit directions.
        radius: sphere radius.
        near_plane: smallest allowed t.

    Returns:
        t_near, t_far: (R,) entry and exit distances (0 where the ray misses).
        hit: (R,) bool, the ray crosses the sphere beyond the near plane.
    """
    b = (origins * directions).sum(dim=-1)
    c = (origins * origins).sum(dim=-1) - radius * radius
    discriminant = b * b - c
    root = discriminant.clamp_min(0.0).sqrt()
    t_near = (-b - root).clamp_min(near_plane)
    t_far = -b + root
    hit = (discriminant > 0) & (t_far > t_near)
    zero = torch.zeros_like(t_near)
    return torch.where(hit, t_near, zero), torch.where(hit, t_far, zero), hit


@dataclass
class _Samples:
    """Ray samples, batched (CPU) or packed (CUDA).

    batched: t_* (M, S) for the M rays ``ray_ids`` (M,); ``occupied`` (M, S) bool marks the
        samples in occupied cells (None: all of them), the only ones the field sees.
    packed: t_* (P,) with ``ray_ids`` (P,) the ray of each sample.
    """

    t_starts: torch.Tensor
    t_ends: torch.Tensor
    t_mid: torch.Tensor  # where the field is queried (inside [t_start, t_end])
    ray_ids: torch.Tensor
    packed: bool
    occupied: torch.Tensor | None = None

    def per_sample(self, per_ray: torch.Tensor) -> torch.Tensor:
        """(R, C) values of the rays -> (n_samples, C), the value of each sample's ray.

        The batched layout gathers M rows and broadcasts them over the S samples (a gather
        per sample would be S times slower on CPU).
        """
        rows = per_ray.index_select(0, self.ray_ids)
        if self.packed:
            return rows
        return rows[:, None, :].expand(*self.t_mid.shape, per_ray.shape[-1]).reshape(
            -1, per_ray.shape[-1])


def _expand_per_view(name: str, value: torch.Tensor, n: int, height: int, width: int,
                     allowed: str) -> torch.Tensor:
    """(3,), (N, 3) or (N, H, W, 3) -> (N, H, W, 3), with a clear error otherwise."""
    if value.ndim == 1 and value.shape[0] == 3:
        return value.expand(n, height, width, 3)
    if value.ndim == 2 and tuple(value.shape) == (n, 3):
        return value[:, None, None, :].expand(n, height, width, 3)
    if value.ndim == 4 and tuple(value.shape) == (n, height, width, 3):
        return value
    raise ValueError(f"{name} must have shape {allowed}, got {tuple(value.shape)}")


@dataclass
class RenderOutput:
    """N rendered views (:meth:`VolumeRenderer.render`).

    Attributes:
        rgb: (N, H, W, 3) foreground over background, rgb_fg + (1 - opacity) * bg.
        opacity: (N, H, W, 1) sum of weights, in [0, 1].
        depth: (N, H, W, 1) sum_i w_i t_i (camera distance along the ray, composited over 0;
            divide by opacity for the surface distance).
        background: (N, H, W, 3) the background colour used.
        normal: (N, H, W, 3) world normals composited over 0, sum_i w_i n_i (length <=
            opacity, in [-1, 1]); None without normals.
        orientation_loss: () DreamFusion's sum_i stopgrad(w_i) relu(n_i . d)^2 summed over each
            ray's samples, averaged over the rays with opacity > 0 (penalises normals facing
            away from the camera); None without normals.
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    background: torch.Tensor
    normal: torch.Tensor | None = None
    orientation_loss: torch.Tensor | None = None


class VolumeRenderer(nn.Module):
    """Renders a field (+ background) from cameras; see the module docstring.

    Args:
        field: a module with ``density((P, 3)) -> (P,)`` and
            ``forward((P, 3), with_normals) -> FieldOutput`` (e.g. ``NeRFField``); the device
            of its parameters picks the sampling path.
        background: maps (..., 3) view directions to (..., 3) rgb (e.g.
            ``EnvironmentBackground``), or None for black (unless ``bg_color`` is given).
        config: RenderConfig.
    """

    def __init__(self, field: nn.Module, background: nn.Module | None = None,
                 config: RenderConfig | None = None):
        super().__init__()
        config = RenderConfig() if config is None else config
        field_radius = getattr(getattr(field, "config", None), "radius", config.radius)
        if field_radius != config.radius:
            raise ValueError(f"RenderConfig.radius ({config.radius}) must equal the field's "
                             f"radius ({field_radius}): the renderer samples the field's sphere")
        self.config = config
        self.field = field
        self.background = background
        r = config.radius
        self.estimator = nerfacc.OccGridEstimator(
            roi_aabb=[-r, -r, -r, r, r, r], resolution=config.occ_grid_resolution,
            levels=config.occ_grid_levels)
        # Every cell occupied until the first update: renders before then are complete (just
        # slower) instead of empty.
        self.estimator.binaries.fill_(True)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.field.parameters()).device

    @property
    def uses_cuda_path(self) -> bool:
        """True when the field lives on a CUDA device (nerfacc's occupancy-grid path)."""
        return self.device.type == "cuda"

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The field's groups ("encoding", "mlp") plus "background" when there is one."""
        groups = dict(self.field.parameter_groups())
        if self.background is not None:
            groups["background"] = list(self.background.parameters())
        return groups

    def _occupancy_fn(self, points: torch.Tensor) -> torch.Tensor:
        # Opacity of one march step, to first order: 1 - exp(-sigma dt) ~ sigma dt.
        return self.field.density(points)[:, None] * self.config.render_step_size

    def _cpu_occupancy_fn(self, points: torch.Tensor) -> torch.Tensor:
        return self.field.density(points)[:, None] * self.config.cpu_step_size

    @property
    def skips_empty_space(self) -> bool:
        """True when renders consult the occupancy grid (always on CUDA; CPU: the config)."""
        return self.uses_cuda_path or self.config.skip_empty_space

    @torch.no_grad()
    def update_occupancy(self, step: int) -> None:
        """Refresh the occupancy grid every ``occ_update_interval`` steps.

        Call once per training step, in training mode; a no-op on the CPU path without
        ``skip_empty_space``. The grid's random cell jitter is drawn from a generator seeded by
        ``step`` (the global RNG is left as it was), so a resumed run updates its grid exactly
        as an uninterrupted one.
        """
        if not self.skips_empty_space:
            return
        if not self.training:
            raise RuntimeError("update_occupancy must be called in training mode "
                               "(renderer.train()); the grid is frozen in evaluation")
        cfg = self.config
        if step % cfg.occ_update_interval:
            return
        self.estimator.to(self.device)
        occupancy_fn = self._occupancy_fn if self.uses_cuda_path else self._cpu_occupancy_fn
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step)
            self.estimator.update_every_n_steps(
                step=step, occ_eval_fn=occupancy_fn, occ_thre=cfg.occ_threshold,
                ema_decay=cfg.occ_ema_decay, warmup_steps=cfg.occ_warmup_steps,
                n=cfg.occ_update_interval)

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 3) world points -> (...) bool: the point's cell of grid level 0 is occupied
        (points outside the grid's box count as empty)."""
        grid = self.estimator.binaries[0].to(points.device)  # (X, Y, Z), indexed [x, y, z]
        r = self.config.radius
        size = torch.tensor(grid.shape, device=points.device)
        cell = ((points + r) / (2 * r) * size).floor().long()
        inside = ((cell >= 0) & (cell < size)).all(dim=-1)
        cell = torch.minimum(cell.clamp_min(0), size - 1)
        return grid[cell[..., 0], cell[..., 1], cell[..., 2]] & inside

    # ------------------------------------------------------------------ sampling
    def _samples_stratified(self, t_near: torch.Tensor, t_far: torch.Tensor,
                            hit: torch.Tensor, generator: torch.Generator | None) -> _Samples:
        """CPU path: S equal bins over each hit ray's chord, one sample per bin.

        Bin i of a ray is [near + i h, near + (i + 1) h], h = (far - near) / S; the sample is
        at its centre (evaluation) or uniformly inside it (training, drawn from
        ``generator`` on the CPU), and represents the whole bin.
        """
        ray_ids = hit.nonzero()[:, 0]
        if ray_ids.numel() == 0:
            # No ray hits: one zero-length interval on ray 0 keeps every shape non-empty.
            ray_ids = torch.zeros(1, dtype=torch.long, device=hit.device)
        near, far = t_near[ray_ids, None], t_far[ray_ids, None]  # (M, 1)
        s = self.config.num_samples_per_ray
        edges = torch.linspace(0.0, 1.0, s + 1, device=near.device)
        t_edges = near + (far - near) * edges  # (M, S + 1)
        if self.training and self.config.stratified:
            u = torch.rand(ray_ids.shape[0], s, generator=generator).to(near.device)
        else:
            u = torch.full((ray_ids.shape[0], s), 0.5, device=near.device)
        t_starts, t_ends = t_edges[:, :-1], t_edges[:, 1:]
        return _Samples(t_starts=t_starts, t_ends=t_ends, t_mid=t_starts + u * (t_ends - t_starts),
                        ray_ids=ray_ids, packed=False)

    def _skip_empty(self, samples: _Samples, origins: torch.Tensor,
                    directions: torch.Tensor) -> _Samples:
        """CPU path: mark the samples in occupied cells; drop rays that have none."""
        points = origins[samples.ray_ids, None] + samples.t_mid[..., None] * directions[samples.ray_ids, None]
        occupied = self.occupied(points)  # (M, S)
        keep = occupied.any(dim=1)
        if not bool(keep.any()):
            keep[0] = True  # one ray keeps every shape non-empty (its samples stay unqueried)
        return _Samples(t_starts=samples.t_starts[keep], t_ends=samples.t_ends[keep],
                        t_mid=samples.t_mid[keep], ray_ids=samples.ray_ids[keep], packed=False,
                        occupied=occupied[keep])

    def _samples_occupancy_grid(self, origins: torch.Tensor, directions: torch.Tensor,
                                t_near: torch.Tensor, t_far: torch.Tensor) -> _Samples:
        """CUDA path: nerfacc's occupancy-grid marching inside the sphere (packed samples)."""

        def sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor,
                     ray_indices: torch.Tensor) -> torch.Tensor:
            t = 0.5 * (t_starts + t_ends)[:, None]
            return self.field.density(origins[ray_indices] + t * directions[ray_indices])

        cfg = self.config
        # Missed rays have t_near = t_far = 0: an empty interval, so no samples.
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins, directions, sigma_fn=sigma_fn, t_min=t_near, t_max=t_far,
            near_plane=cfg.near_plane, render_step_size=cfg.render_step_size,
            alpha_thre=cfg.alpha_threshold, early_stop_eps=cfg.early_stop_eps,
            stratified=self.training and cfg.stratified, cone_angle=0.0)
        if ray_indices.numel() == 0:
            ray_indices = torch.zeros(1, dtype=torch.long, device=origins.device)
            t_starts = t_ends = torch.zeros(1, device=origins.device)
        return _Samples(t_starts=t_starts, t_ends=t_ends, t_mid=0.5 * (t_starts + t_ends),
                        ray_ids=ray_indices.long(), packed=True)

    # ------------------------------------------------------------------ compositing
    def _composite(self, samples: _Samples, density: torch.Tensor,
                   values: dict[str, torch.Tensor | None], n_rays: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weights and per-ray sums of per-sample values.

        Args:
            samples: the samples; density (n_samples,) flat in their order.
            values: name -> (n_samples, C) flat per-sample values, or None for the opacity.
            n_rays: R, the number of rays.

        Returns:
            weights: (n_samples,) flat.
            sums: name -> (R, C): sum_i w_i v_i over each ray (0 for rays without samples).
        """
        if samples.packed:
            weights, _, _ = nerfacc.render_weight_from_density(
                samples.t_starts, samples.t_ends, density, ray_indices=samples.ray_ids,
                n_rays=n_rays)
            sums = {name: nerfacc.accumulate_along_rays(
                weights, values=v, ray_indices=samples.ray_ids, n_rays=n_rays)
                for name, v in values.items()}
            return weights, sums

        m, s = samples.t_starts.shape
        weights, _, _ = nerfacc.render_weight_from_density(
            samples.t_starts, samples.t_ends, density.reshape(m, s))  # (M, S)
        sums = {}
        for name, v in values.items():
            per_ray = nerfacc.accumulate_along_rays(
                weights, values=None if v is None else v.reshape(m, s, -1))  # (M, C)
            # Scatter the hit rays into all R rays (index_copy is differentiable in source).
            sums[name] = per_ray.new_zeros(n_rays, per_ray.shape[-1]).index_copy(
                0, samples.ray_ids, per_ray)
        return weights.reshape(-1), sums

    def _query_field(self, points: torch.Tensor, with_normals: bool) -> FieldOutput:
        """The field at (P, 3) points; in chunks when no graph is being recorded."""
        chunk = self.config.eval_chunk_size
        if torch.is_grad_enabled() or points.shape[0] <= chunk:
            return self.field(points, with_normals=with_normals)
        parts = [self.field(points[i:i + chunk], with_normals=with_normals)
                 for i in range(0, points.shape[0], chunk)]
        return FieldOutput(
            density=torch.cat([p.density for p in parts]),
            albedo=torch.cat([p.albedo for p in parts]),
            normal=torch.cat([p.normal for p in parts]) if with_normals else None)

    # ------------------------------------------------------------------ render
    def _resolve_shading(self, shading: str | Shading, light_positions: torch.Tensor | None,
                         c2w: torch.Tensor) -> tuple[Shading, torch.Tensor | None]:
        """-> (Shading, (N, 3) per-view lights or None for "albedo")."""
        if isinstance(shading, Shading):
            if shading.light_positions is not None and light_positions is not None:
                raise ValueError("give light_positions either in the Shading or as an "
                                 "argument, not both")
            lights = shading.light_positions if light_positions is None else light_positions
        elif isinstance(shading, str):
            shading = Shading(mode=check_shading_mode(shading))
            lights = light_positions
        else:
            raise ValueError(f"shading must be one of {SHADING_MODES} or a Shading, got "
                             f"{shading!r}")
        if not shading.needs_normals:
            return shading, None
        n = c2w.shape[0]
        if lights is None:
            return shading, c2w[:, :3, 3]  # a head light at each camera
        lights = torch.as_tensor(lights, dtype=torch.float32).to(c2w.device)
        if lights.shape == (3,):
            return shading, lights.expand(n, 3)
        if lights.shape != (n, 3):
            raise ValueError(f"light_positions must have shape (N, 3) = ({n}, 3) or (3,), "
                             f"got {tuple(lights.shape)}")
        return shading, lights

    def render(self, c2w: torch.Tensor, fovy_deg: torch.Tensor | float, height: int,
               width: int, *, shading: str | Shading = "albedo",
               light_positions: torch.Tensor | None = None,
               bg_color: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               with_normals: bool = True) -> RenderOutput:
        """Render N views.

        Args:
            c2w: (N, 4, 4) camera-to-world (OpenGL camera axes, z-up world; cameras.py).
            fovy_deg: (N,) or scalar vertical field of view in degrees.
            height, width: image size in pixels.
            shading: "albedo", "diffuse", "textureless" (default light colours) or a
                :class:`Shading` (e.g. from ``sample_shading``).
            light_positions: (N, 3) or (3,) world point lights for a string shading (or a
                Shading without lights); default: a light at each camera.
            bg_color: background instead of the background module: (3,) shared, (N, 3) per
                view or (N, H, W, 3) per pixel, in [0, 1].
            generator: CPU generator for the stratified jitter (CPU path, training mode);
                the CUDA path jitters with nerfacc's own (global) RNG.
            with_normals: compute normals (needed by lit shading and the orientation loss;
                the reference always computes them). False is faster for albedo previews.

        Returns:
            :class:`RenderOutput` (normal and orientation_loss only ``with_normals``).
        """
        if not isinstance(c2w, torch.Tensor) or c2w.ndim != 3 or tuple(c2w.shape[1:]) != (4, 4):
            raise ValueError(f"c2w must be a tensor of shape (N, 4, 4), got "
                             f"{tuple(getattr(c2w, 'shape', ()))}")
        device = self.device
        c2w = c2w.to(device=device, dtype=torch.float32)
        if isinstance(fovy_deg, torch.Tensor):
            fovy_deg = fovy_deg.to(device)
        shading, lights = self._resolve_shading(shading, light_positions, c2w)
        if shading.needs_normals and not with_normals:
            raise ValueError(f"shading {shading.mode!r} needs normals: with_normals must be "
                             "True")
        n = c2w.shape[0]
        if bg_color is not None:
            bg_color = torch.as_tensor(bg_color, dtype=torch.float32).to(device)
            bg_color = _expand_per_view("bg_color", bg_color, n, height, width,
                                        f"(3,), (N, 3) or (N, H, W, 3) = ({n}, {height}, "
                                        f"{width}, 3)")

        origins, directions = get_rays(c2w, fovy_deg, height, width)  # (N, H, W, 3) each
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        n_rays = origins.shape[0]
        t_near, t_far, hit = ray_sphere_intersect(origins, directions, self.config.radius,
                                                  self.config.near_plane)
        if self.uses_cuda_path:
            self.estimator.to(device)
            samples = self._samples_occupancy_grid(origins, directions, t_near, t_far)
        else:
            samples = self._samples_stratified(t_near, t_far, hit, generator)
            if self.config.skip_empty_space:
                samples = self._skip_empty(samples, origins, directions)

        t_mid = samples.t_mid.reshape(-1, 1)  # (n_samples, 1)
        sample_dirs = samples.per_sample(directions)
        points = samples.per_sample(origins) + t_mid * sample_dirs
        sample_lights = None
        if lights is not None:
            # The light of each ray's view (rays are view-major: view = ray // (H W)).
            sample_lights = samples.per_sample(lights.repeat_interleave(height * width, dim=0))
        if samples.occupied is None:
            out = self._query_field(points, with_normals)
            rgb = shade(shading, out.albedo, out.normal, points, sample_lights)
        else:
            # Only occupied samples reach the field; the others keep density 0 (and rgb,
            # normal 0), exactly what compositing makes of a transparent sample.
            index = samples.occupied.reshape(-1).nonzero()[:, 0]
            part = self._query_field(points[index], with_normals)
            part_rgb = shade(shading, part.albedo, part.normal, points[index],
                             None if sample_lights is None else sample_lights[index])

            def scatter(x: torch.Tensor) -> torch.Tensor:
                return x.new_zeros(points.shape[0], *x.shape[1:]).index_copy(0, index, x)

            out = FieldOutput(density=scatter(part.density), albedo=scatter(part.albedo),
                              normal=None if part.normal is None else scatter(part.normal))
            rgb = scatter(part_rgb)

        values: dict[str, torch.Tensor | None] = {"rgb": rgb, "opacity": None, "depth": t_mid}
        if out.normal is not None:
            values["normal"] = out.normal
        weights, sums = self._composite(samples, out.density, values, n_rays)

        if bg_color is not None:
            background = bg_color.reshape(n_rays, 3)
        elif self.background is not None:
            background = self.background(directions)
        else:
            background = torch.zeros_like(directions)
        opacity = sums["opacity"]
        image = sums["rgb"] + (1.0 - opacity) * background

        def view(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n, height, width, x.shape[-1])

        result = RenderOutput(rgb=view(image), opacity=view(opacity), depth=view(sums["depth"]),
                              background=view(background))
        if out.normal is not None:
            result.normal = view(sums["normal"])
            facing_away = (out.normal * sample_dirs).sum(dim=-1).clamp_min(0.0) ** 2
            n_visible = (opacity > 0).sum().clamp_min(1)
            result.orientation_loss = (weights.detach() * facing_away).sum() / n_visible
        return result

    def forward(self, *args, **kwargs) -> RenderOutput:
        """Same as :meth:`render`."""
        return self.render(*args, **kwargs)
