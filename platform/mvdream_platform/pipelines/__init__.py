"""Pipelines: MVDreamPipeline and the loader that builds it from a model description."""

from .pipeline_mvdream import MVDreamPipeline, MVDreamPipelineOutput

__all__ = ["MVDreamPipeline", "MVDreamPipelineOutput"]
