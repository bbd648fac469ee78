"""Text-to-3D by multi-view score distillation (SDS) into a NeRF.

Import the submodules directly (``from mvdream_platform.sds.render import VolumeRenderer``);
this package imports nothing at load time, so importing one part never pulls in the others
(nor nerfacc, nor a diffusion model). The entry point is also reachable lazily here:
``from mvdream_platform.sds import run_text_to_3d, TextTo3DResult, FinishedRun, Scorer``
(:mod:`.pipeline`).

Evaluation is not part of this package: nothing here imports :mod:`mvdream_platform.evaluation`;
a caller that wants scores injects a scorer into :func:`.pipeline.run_text_to_3d`.
"""

_PIPELINE = ("FinishedRun", "Scorer", "TextTo3DResult", "run_text_to_3d")

__all__ = list(_PIPELINE)


def __getattr__(name: str):
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
