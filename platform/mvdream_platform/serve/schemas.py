"""Request and response bodies of the HTTP API, built from the configured :class:`Limits`.

The limits live in the pydantic models themselves (``le=``, ``max_length=``, ``Literal`` choices),
so FastAPI both enforces them and publishes them in the OpenAPI document; a violation becomes a
422 naming the field and the allowed range (see :func:`validation_errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model

from ..sds.config import GUIDANCE_KINDS
from .settings import RESPONSE_FORMATS, Limits

# An unknown (e.g. misspelt) field is an error, not ignored; numbers must be JSON numbers
# ("5" and true are refused; an integer is fine where a float is asked for).
STRICT = ConfigDict(extra="forbid", strict=True)


def _integer(value: Any) -> Any:
    """Literal choices compare with ==, which lets true (== 1) and 4.0 (== 4) through."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {type(value).__name__}")
    return value


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(MultiViewRequest, TextTo3DRequest) for these limits."""
    prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                              max_length=limits.max_prompt_chars)]
    prompts = Annotated[list[prompt], Field(min_length=1, max_length=limits.max_prompts_per_request,
                                            description="one object per prompt")]
    negative = Annotated[str, StringConstraints(max_length=limits.max_prompt_chars)]
    seed = Annotated[int, Field(ge=0, le=limits.max_seed)]
    lo, hi = limits.guidance_scale_range
    guidance_scale = Annotated[float | None, Field(ge=lo, le=hi, description="null: the model's recommendation")]
    views = tuple(limits.view_choices)
    multiview = create_model(
        "MultiViewRequest",
        __config__=STRICT,
        prompts=(prompts, ...),
        negative_prompt=(negative, ""),
        num_views=(Annotated[Literal[views], BeforeValidator(_integer)], 4 if 4 in views else views[-1]),
        elevation=(Annotated[float, Field(ge=limits.elevation_range[0], le=limits.elevation_range[1])], 15.0),
        azimuth_start=(Annotated[float, Field(ge=-360.0, le=360.0)], 0.0),
        steps=(Annotated[int | None, Field(ge=1, le=limits.max_sampling_steps,
                                           description="DDIM steps; null: the server default")], None),
        guidance_scale=(guidance_scale, None),
        guidance_rescale=(Annotated[float, Field(ge=0.0, le=1.0)], 0.0),
        seed=(seed, Field(0, description="prompt i uses seed + i")),
        resolution=(Annotated[Literal[tuple(limits.resolution_choices)] | None,
                              BeforeValidator(lambda v: v if v is None else _integer(v))], None),
        response_format=(Literal[RESPONSE_FORMATS], "base64"),
    )
    text_to_3d = create_model(
        "TextTo3DRequest",
        __config__=STRICT,
        prompts=(prompts, ...),
        steps=(Annotated[int | None, Field(ge=1, le=limits.max_sds_steps,
                                           description="SDS steps; null: the server default")], None),
        seed=(seed, 0),
        guidance=(Literal[GUIDANCE_KINDS], "mvdream"),
        guidance_scale=(guidance_scale, None),
        negative_prompt=(Annotated[str | None, StringConstraints(max_length=limits.max_prompt_chars)], None),
        cfg_rescale=(Annotated[float | None, Field(ge=0.0, le=1.0,
                                                   description="x0 std rescale; null: server's sds config")], None),
    )
    return multiview, text_to_3d


class MultiViewResult(BaseModel):
    prompt: str
    seed: int
    images: list[str] = Field(description="base64 PNGs (response_format=base64) or URLs (url)")
    cameras: list[list[float]] = Field(description="(F, 16) camera-to-world, row-major")
    batch_size: int = Field(description="requests sampled together in this one batch")
    seconds: float


class MultiViewResponse(BaseModel):
    id: str
    model: str
    results: list[MultiViewResult]
    seconds: float


class JobLink(BaseModel):
    id: str
    prompt: str
    status_url: str


class JobsAccepted(BaseModel):
    jobs: list[JobLink]


class JobView(BaseModel):
    id: str
    prompt: str
    status: str = Field(description="queued | running | retrying (its worker died; `error` says why) | "
                                    "cancelling | succeeded | failed | cancelled")
    options: dict[str, Any]
    attempts: int = Field(description="runs a worker started: 1, plus one for each worker that died holding it")
    created: float
    finished: float | None = None
    error: str | None = None
    progress: dict[str, Any] | None = None
    assets: list[str] = Field(default_factory=list)
    asset_urls: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=",
               "max_length": "length <=", "expected": "one of"}


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic errors -> [{field, message, allowed}] (``allowed`` from the violated bound)."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        ctx = e.get("ctx") or {}
        allowed = ", ".join(f"{word} {ctx[key]}" for key, word in BOUND_WORDS.items() if key in ctx) or None
        out.append({"field": ".".join(loc) or "body", "message": e.get("msg", "invalid"),
                    "type": e.get("type"), "allowed": allowed})
    return out
