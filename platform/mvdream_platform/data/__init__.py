"""Training data: procedural objects, the mesh renderer, datasets and the 3D/2D mixture.

Heavy submodules (the renderer needs Embree) are imported on first use, so
``from mvdream_platform.data import MultiViewDataset`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MultiViewDataset": "datasets",
    "TextImageDataset": "datasets",
    "validate_multiview": "datasets",
    "validate_text_images": "datasets",
    "MixtureLoader": "mixture",
    "ObjectRecord": "layout",
    "ProceduralObject": "shapes",
    "make_object": "shapes",
    "generate_objects": "shapes",
    "render_views": "render",
    "load_normalized_mesh": "render",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
