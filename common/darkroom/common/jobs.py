"""The job contract: what a producer may ask a worker to do.

:class:`Img2ImgJob` is validated on both sides: at submit time (so a bad value
never reaches a queue) and again by the worker (so a message from an older or
foreign producer cannot crash it). Unknown fields and non-finite numbers are
refused; every refusal names the field, the value and what is allowed.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from typing import Annotated, Any, Self

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen, MultipleOf
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .errors import DarkroomError, FieldError, InvalidJobError, shown
from .events import EventType
from .redaction import URL_FIELDS, redact_url
from .safety import SafetyPolicy
from .schedulers import ACCEPTS_ETA, ACCEPTS_SIGMAS, ACCEPTS_TIMESTEPS, SchedulerName
from .storage import InvalidUri, S3Uri

__all__ = ["AdapterRef", "JobOutputRef", "valid_id", "FreeU", "TextualInversion", "Img2ImgJob", "OutputFormat", "Priority", "ResizeMode", "MAX_SEED", "MESSAGE_SCHEMA_VERSION", "MAX_ADAPTERS",
           "MAX_SIDE", "validate_job", "reference_errors",
           "allowed_range"]

MAX_SEED = 2**63 - 1
MESSAGE_SCHEMA_VERSION = 1
"""Version of the task message (the job as one JSON object, plus ``schema_version``) this code writes and reads;
a worker keeps only the fields it knows of a message with a higher version."""
MAX_ADAPTERS = 8
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # always fullmatch: "$" admits a final "\n"
_TOKEN = re.compile(r"\S{1,64}")
MAX_TEXTUAL_INVERSIONS = 8
ID_ALLOWED = "1..128 letters, digits, '_', '.', '-', starting alphanumeric"
MAX_IMAGES = 16
MAX_TIMESTEP = 999
MAX_SIDE = 4096  # pixels; width and height of the working image
MAX_IP_ADAPTER_SCALE = 2.0
_ONE, _PER_IMAGE = "one", "per_image"  # union tags; never shown in error locations


def _side_allowed(side: str) -> str:
    return f"a multiple of 8, 8 <= {side} <= {MAX_SIDE}; only with resize_mode resize, crop_resize or resize_fill"


def _one_or_per_image(value: Any) -> str:
    return _PER_IMAGE if isinstance(value, list) else _ONE


_Seed = Annotated[int, Ge(0), Le(MAX_SEED)]
_Text = Annotated[str, MaxLen(4000)]
SeedValue = Annotated[
    Annotated[_Seed, Tag(_ONE)] | Annotated[list[_Seed], MinLen(1), MaxLen(MAX_IMAGES), Tag(_PER_IMAGE)],
    Discriminator(_one_or_per_image),
]
TextValue = Annotated[
    Annotated[_Text, Tag(_ONE)] | Annotated[list[_Text], MinLen(1), MaxLen(MAX_IMAGES), Tag(_PER_IMAGE)],
    Discriminator(_one_or_per_image),
]


class CrossFieldError(DarkroomError, ValueError):
    """Raised by a job validator when a field is wrong given another field; names the field."""

    def __init__(self, field: str, value: Any, message: str, allowed: str) -> None:
        super().__init__(f"{field}={shown(value)}: {message}; allowed: {allowed}")
        self.field, self.value, self.message, self.allowed = field, value, message, allowed


class ResizeMode(StrEnum):
    """How the decoded input becomes the image the pipeline works on (the A1111 img2img resize modes).

    ``keep`` is diffusers' own behaviour: the image as sent, each side rounded down to a multiple of 8
    by diffusers' image processor (a Lanczos resize, not a crop). The others produce exactly the
    target size: ``resize`` stretches ("just resize"), ``crop_resize`` scales to cover the target and
    crops the overflow around the center ("crop and resize"), ``resize_fill`` scales to fit inside it
    and fills the two bands with the image's stretched edge rows or columns ("resize and fill").
    """

    KEEP = "keep"
    RESIZE = "resize"
    CROP_RESIZE = "crop_resize"
    RESIZE_FILL = "resize_fill"


class OutputFormat(StrEnum):
    """Encoding of the output images."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class Priority(StrEnum):
    """Interactive jobs go before bulk jobs in every queue."""

    INTERACTIVE = "interactive"
    BULK = "bulk"

    @property
    def broker_priority(self) -> int:
        """Celery-on-Redis priority: 0 is served first."""
        return 0 if self is Priority.INTERACTIVE else 6


class AdapterRef(BaseModel):
    """A LoRA adapter for one job: a registry id or an ``s3://`` ``.safetensors`` file, and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    uri: str = Field(description="Adapter id from the registry, or s3://bucket/key.safetensors.")
    weight: Annotated[float, Ge(-4.0), Le(4.0)] = Field(1.0, description="Adapter scale; several blend.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if v.startswith("s3://"):
            S3Uri.parse(v, strict=False)  # strictly in validate_job (a stored record stays readable)
            if not v.endswith(".safetensors"):
                raise ValueError("adapter files must be .safetensors (pickle formats are refused)")
        elif not _ID.fullmatch(v):
            raise ValueError("must be a registry adapter id or an s3://....safetensors URI")
        return v


def valid_id(value: str) -> bool:
    """Whether ``value`` is a job, producer, model or adapter id (the whole string; a final newline fails)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def checked_id(value: str) -> str:
    """``value`` when it is a valid id (:func:`valid_id`), else ValueError naming what ids may hold."""
    if not valid_id(value):
        raise ValueError(f"must be {ID_ALLOWED}")
    return value


def _safetensors_uri(value: str) -> str:
    S3Uri.parse(value, strict=False)
    if not value.endswith(".safetensors"):
        raise ValueError("must be an s3://....safetensors object (pickle formats are refused)")
    return value


class TextualInversion(BaseModel):
    """A textual-inversion embedding for one job: an ``s3://`` ``.safetensors`` file and the token it defines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(description="s3://bucket/key.safetensors holding one embedding (one or more vectors).")
    token: str = Field(description="The token the prompt uses for it, e.g. <cat-toy>.",
                       json_schema_extra={"allowed": "1..64 characters, no whitespace"})

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _safetensors_uri(v)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN.fullmatch(v):
            raise ValueError("must be 1..64 characters without whitespace, e.g. <cat-toy>")
        return v


class FreeU(BaseModel):
    """FreeU factors (Si et al. 2023): skip-feature (s) and backbone (b) scales of the UNet's up blocks.

    Defaults are the values the FreeU authors suggest for Stable Diffusion 1.5.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    s1: Annotated[float, Ge(0.0), Le(10.0)] = Field(0.9, description="Skip-feature scale of the first up stage.")
    s2: Annotated[float, Ge(0.0), Le(10.0)] = Field(0.2, description="Skip-feature scale of the second up stage.")
    b1: Annotated[float, Ge(0.0), Le(10.0)] = Field(1.5, description="Backbone scale of the first up stage.")
    b2: Annotated[float, Ge(0.0), Le(10.0)] = Field(1.6, description="Backbone scale of the second up stage.")


class JobOutputRef(BaseModel):
    """One output image of another job, as a job's input: ``{"job": ID, "index": i}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(description="The upstream job's id.")
    index: Annotated[int, Ge(0), Lt(MAX_IMAGES)] = Field(0, description="Which of its output images (0 first).")
    latents: bool = Field(
        False, description="Take that image's final latents instead of the decoded image (the upstream job sets "
                           "output_latents): an SDXL base with denoising_end, then the refiner with denoising_start, "
                           "diffusers' ensemble of expert denoisers across workers.",
    )

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        return checked_id(v)


class Img2ImgJob(BaseModel):
    """One SDEdit image-to-image request. Defaults follow diffusers' img2img pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_strip_whitespace=False)

    job_id: str | None = Field(
        None,
        description="Unique id; assigned at submit when omitted. Letters, digits, '_', '.', '-' (1..128).",
    )
    model: str = Field(description="Model id from the workers' model registry.")
    image: str | JobOutputRef = Field(
        description="Input image as s3://bucket/key (PNG, JPEG, WebP...), or another job's output, "
                    "{\"job\": ID, \"index\": i}: the job then runs once that one succeeds (a chain).",
    )
    resize_mode: ResizeMode = Field(
        ResizeMode.KEEP, description="How the input becomes the working image (see \"Input images\"): keep (as "
                                     "sent; sides rounded down to multiples of 8), resize, crop_resize, resize_fill.",
    )
    width: Annotated[int, Ge(8), Le(MAX_SIDE), MultipleOf(8)] | None = Field(
        None, description="Working width in pixels; with height unset, height follows the input's aspect ratio.",
        json_schema_extra={"allowed": _side_allowed("width")},
    )
    height: Annotated[int, Ge(8), Le(MAX_SIDE), MultipleOf(8)] | None = Field(
        None, description="Working height in pixels; with width unset, width follows the input's aspect ratio.",
        json_schema_extra={"allowed": _side_allowed("height")},
    )
    max_pixels: Annotated[int, Ge(64), Le(MAX_SIDE * MAX_SIDE)] | None = Field(
        None, description="Without width and height: the input's size scaled down (never up) to at most this many "
                          "pixels, aspect ratio kept, sides rounded down to multiples of 8.",
        json_schema_extra={"allowed": f"64 <= max_pixels <= {MAX_SIDE * MAX_SIDE}; not with resize_mode keep, "
                                      "width or height"},
    )
    prompt: TextValue | None = Field(
        None, description="Text guiding the generation; or a list, one per image. Required unless prompt_embeds.",
        json_schema_extra={"allowed": "at most 4000 characters; a list has one per image"},
    )
    negative_prompt: TextValue | None = Field(
        None, description="Text to steer away from (needs guidance_scale > 1); or a list, one per image.",
        json_schema_extra={"allowed": "at most 4000 characters; a list has one per image"},
    )
    strength: Annotated[float, Ge(0.0), Le(1.0)] = Field(
        0.8, description="How much the input is transformed: 0 keeps it, 1 ignores it."
    )
    num_inference_steps: Annotated[int, Ge(1), Le(1000)] = Field(
        50, description="Denoising steps for strength 1; int(steps * strength) actually run (PNDM: one more)."
    )
    guidance_scale: Annotated[float, Ge(0.0), Le(100.0)] = Field(
        7.5, description="Classifier-free guidance; on when > 1."
    )
    seed: SeedValue | None = Field(
        None, description="Seed of image 0 (image i uses seed + i), or a list, one per image; drawn at submit "
                          "when omitted.",
        json_schema_extra={"allowed": f"0 <= seed <= {MAX_SEED}"},
    )
    num_images_per_prompt: Annotated[int, Ge(1), Le(MAX_IMAGES)] = Field(1, description="Images to make.")
    scheduler: SchedulerName | None = Field(
        None, description="Denoising scheduler, built from the model's scheduler config (see \"Schedulers\"); "
                          "the model's default when omitted.",
    )
    eta: Annotated[float, Ge(0.0), Le(1.0)] | None = Field(
        None, description="DDIM eta: 0 is deterministic DDIM, 1 adds DDPM-like noise; needs a scheduler that "
                          "takes it (ddim); diffusers' 0.0 when omitted.",
    )
    clip_skip: Annotated[int, Ge(1), Le(24)] | None = Field(
        None, description="Final CLIP text-encoder layers to skip for the prompt embedding (must be below the "
                          "model's layer count); none skipped when omitted.",
    )
    timesteps: Annotated[list[Annotated[int, Ge(0), Le(MAX_TIMESTEP)]], MinLen(1), MaxLen(1000)] | None = Field(
        None, description="Explicit timesteps instead of num_inference_steps (euler, dpmpp_2m, lcm); "
                          "int(len(timesteps) * strength) of them run.",
        json_schema_extra={"allowed": f"strictly descending integers in 0..{MAX_TIMESTEP}, 1..1000 of them; "
                                      f"scheduler one of {', '.join(sorted(ACCEPTS_TIMESTEPS))} (or a model "
                                      "default that takes timesteps)"},
    )
    sigmas: Annotated[list[Annotated[float, Gt(0.0), Le(1000.0)]], MinLen(1), MaxLen(1000)] | None = Field(
        None, description="Explicit noise levels instead of num_inference_steps (euler); "
                          "int(len(sigmas) * strength) of them run.",
        json_schema_extra={"allowed": f"strictly descending numbers in (0, 1000], 1..1000 of them; not with "
                                      f"timesteps; scheduler one of {', '.join(sorted(ACCEPTS_SIGMAS))} (or a model "
                                      "default that takes sigmas)"},
    )
    adapters: Annotated[list[AdapterRef], MaxLen(MAX_ADAPTERS)] = Field(
        default_factory=list, description="LoRA adapters with weights (several blend); none = the base model."
    )
    prompt_embeds: str | None = Field(
        None, description="Precomputed prompt embeddings instead of prompt: an s3://....safetensors with one tensor "
                          "(prompt_embeds) of shape [1 or num_images_per_prompt, tokens, text hidden size].",
    )
    negative_prompt_embeds: str | None = Field(
        None, description="Precomputed negative embeddings (same shape as prompt_embeds); only with prompt_embeds.",
    )
    textual_inversions: Annotated[list[TextualInversion], MaxLen(MAX_TEXTUAL_INVERSIONS)] = Field(
        default_factory=list, description="Textual-inversion embeddings loaded for this job only (token + "
                                          "s3:// file); the prompt uses their tokens.",
    )
    freeu: FreeU | None = Field(
        None, description="FreeU for this job only: {s1, s2, b1, b2} (SD 1.5 defaults 0.9, 0.2, 1.5, 1.6); off "
                          "when omitted.",
    )
    ip_adapter_image: str | None = Field(
        None, description="Image prompt as s3://bucket/key for the model's IP-Adapter (see \"IP-Adapter\"); the "
                          "model must have one in the workers' registry.",
    )
    ip_adapter_scale: Annotated[float, Ge(0.0), Le(MAX_IP_ADAPTER_SCALE)] | None = Field(
        None, description="How strongly ip_adapter_image steers the output (0: not at all); the model's registry "
                          "scale (1.0 unless set) when omitted.",
        json_schema_extra={"allowed": f"0.0 <= ip_adapter_scale <= {MAX_IP_ADAPTER_SCALE}; only with ip_adapter_image"},
    )
    output_latents: bool = Field(
        False, description="Also store each image's final latents (before the VAE decode) as "
                           "NNN.latents.safetensors beside it.",
    )
    # -- fields of some model families only (darkroom.common.families: which family takes which) --
    prompt_2: _Text | None = Field(
        None, description="SDXL and SD3: the prompt for the second text encoder; Flux: for T5. Default: prompt.",
    )
    negative_prompt_2: _Text | None = Field(
        None, description="SDXL and SD3: the negative prompt for the second text encoder. Default: negative_prompt.",
    )
    prompt_3: _Text | None = Field(None, description="SD3: the prompt for the T5 text encoder. Default: prompt.")
    negative_prompt_3: _Text | None = Field(
        None, description="SD3: the negative prompt for the T5 text encoder. Default: negative_prompt.",
    )
    original_size: tuple[Annotated[int, Ge(1), Le(16384)], Annotated[int, Ge(1), Le(16384)]] | None = Field(
        None, description="SDXL micro-conditioning: the (height, width) the picture is said to come from. "
                          "Default: the output size.",
    )
    target_size: tuple[Annotated[int, Ge(1), Le(16384)], Annotated[int, Ge(1), Le(16384)]] | None = Field(
        None, description="SDXL micro-conditioning: the (height, width) aimed at. Default: the output size.",
    )
    crops_coords_top_left: tuple[Annotated[int, Ge(0), Le(16384)], Annotated[int, Ge(0), Le(16384)]] | None = Field(
        None, description="SDXL micro-conditioning: the (top, left) crop said to be taken. Default: (0, 0).",
    )
    aesthetic_score: Annotated[float, Ge(0.0), Le(10.0)] | None = Field(
        None, description="SDXL refiner: the aesthetic score conditioned on. Default: 6.0.",
    )
    negative_aesthetic_score: Annotated[float, Ge(0.0), Le(10.0)] | None = Field(
        None, description="SDXL refiner: the aesthetic score of the negative conditioning. Default: 2.5.",
    )
    denoising_start: Annotated[float, Gt(0.0), Lt(1.0)] | None = Field(
        None, description="SDXL: skip this fraction of the schedule (the refiner's half of an ensemble of expert "
                          "denoisers); strength is then ignored.",
    )
    denoising_end: Annotated[float, Gt(0.0), Lt(1.0)] | None = Field(
        None, description="SDXL: stop after this fraction of the schedule (the base's half of an ensemble).",
    )
    max_sequence_length: Annotated[int, Ge(1), Le(512)] | None = Field(
        None, description="SD3 and Flux: tokens of the T5 prompt. Default: 256 (SD3), 512 (Flux).",
    )
    priority: Priority = Field(Priority.INTERACTIVE, description="interactive jobs go before bulk ones.")
    output_prefix: str | None = Field(
        None, description="s3:// prefix for outputs; the producer's default when omitted."
    )
    output_format: OutputFormat = Field(OutputFormat.PNG, description="png, jpeg or webp.")
    output_quality: Annotated[int, Ge(1), Le(100)] = Field(
        95, description="JPEG/WebP quality (ignored for PNG)."
    )
    callback_url: Annotated[str, MinLen(1), MaxLen(2048)] | None = Field(
        None, description="http(s):// URL that receives signed status webhooks (public addresses only by default)."
    )
    webhook_events: list[EventType] | None = Field(
        None, description="Which events to send to callback_url; every status change when omitted "
        "(progress only when listed)."
    )
    producer: str | None = Field(
        None, description="Producer id (selects the webhook signing secret); the client's setting when omitted."
    )
    safety_policy: SafetyPolicy | None = Field(
        None, description="What to do with a flagged output: flag, blur or block; the worker's default when omitted."
    )
    safety_threshold: Annotated[float, Ge(0.0), Le(1.0)] | None = Field(
        None, description="Score at or above which an image is flagged (0 flags all, 1 none); the worker's default "
                          "when omitted; workers refuse values outside their operator's limits.",
    )
    precheck_input: bool = Field(
        False, description="Score the input image first; a flagged input fails the job (input_flagged) before "
                           "any denoising.",
    )

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        if v is not None and not _ID.fullmatch(v):
            raise ValueError(f"must be {ID_ALLOWED}")
        return v

    @field_validator("producer")
    @classmethod
    def _producer(cls, v: str | None) -> str | None:
        if v is not None and not _ID.fullmatch(v):
            raise ValueError(f"must be {ID_ALLOWED}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return checked_id(v)

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | JobOutputRef) -> str | JobOutputRef:
        if isinstance(v, str):
            S3Uri.parse(v, strict=False)
        return v

    @property
    def upstream(self) -> JobOutputRef | None:
        """The job whose output this one takes as its input (a chain), if any."""
        return self.image if isinstance(self.image, JobOutputRef) else None

    @field_validator("ip_adapter_image")
    @classmethod
    def _ip_adapter_image(cls, v: str | None) -> str | None:
        if v is not None:
            S3Uri.parse(v, strict=False)
        return v

    @model_validator(mode="after")
    def _ip_adapter_scale_needs_image(self) -> Self:
        if self.ip_adapter_scale is not None and self.ip_adapter_image is None:
            raise CrossFieldError("ip_adapter_scale", self.ip_adapter_scale, "the job has no ip_adapter_image",
                                  "ip_adapter_scale only with ip_adapter_image")
        return self

    @field_validator("output_prefix")
    @classmethod
    def _output_prefix(cls, v: str | None) -> str | None:
        if v is not None:
            S3Uri.parse(v, allow_empty_key=True, strict=False)
            return v.rstrip("/")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+\S*", v):
            raise ValueError("must be an http(s):// URL")
        return v

    @field_validator("sigmas")
    @classmethod
    def _descending_sigmas(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for i, (a, b) in enumerate(zip(v, v[1:], strict=False)):
                if a <= b:
                    raise ValueError(f"must be strictly descending, but sigmas[{i}]={a} <= sigmas[{i + 1}]={b}")
        return v

    @field_validator("timesteps")
    @classmethod
    def _descending(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            for i, (a, b) in enumerate(zip(v, v[1:], strict=False)):
                if a <= b:
                    raise ValueError(f"must be strictly descending, but timesteps[{i}]={a} <= timesteps[{i + 1}]={b}")
        return v

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, v: list[AdapterRef]) -> list[AdapterRef]:
        uris = [a.uri for a in v]
        if len(set(uris)) != len(uris):
            raise ValueError("an adapter is listed twice; give each adapter once with its weight")
        return v

    @model_validator(mode="after")
    def _runs_at_least_one_step(self) -> Self:
        if self.timesteps is not None and self.sigmas is not None:
            raise CrossFieldError("sigmas", self.sigmas, "timesteps are given as well",
                                  "one of timesteps and sigmas")
        if self.sigmas and self.steps_to_run < 1:
            raise CrossFieldError("sigmas", self.sigmas, f"with strength {self.strength} no step runs",
                                  "int(len(sigmas) * strength) >= 1")
        if self.timesteps and self.steps_to_run < 1:
            raise CrossFieldError("timesteps", self.timesteps,
                                  f"with strength {self.strength} no timestep runs",
                                  "int(len(timesteps) * strength) >= 1")
        if not self.timesteps and not self.sigmas and int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"strength × num_inference_steps = {self.strength} × {self.num_inference_steps} "
                "runs no denoising step; raise strength or num_inference_steps so that "
                "int(num_inference_steps * strength) >= 1"
            )
        return self

    @model_validator(mode="after")
    def _one_per_image(self) -> Self:
        for name in ("seed", "prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_images_per_prompt:
                raise CrossFieldError(
                    name, value, f"has {len(value)} items for {self.num_images_per_prompt} images",
                    f"one per image: len({name}) == num_images_per_prompt ({self.num_images_per_prompt})",
                )
        return self

    @field_validator("prompt_embeds", "negative_prompt_embeds")
    @classmethod
    def _embeds_uri(cls, v: str | None) -> str | None:
        return None if v is None else _safetensors_uri(v)

    @model_validator(mode="after")
    def _prompt_or_embeddings(self) -> Self:
        if self.prompt is None and self.prompt_embeds is None:
            raise CrossFieldError("prompt", None, "a job needs a prompt or prompt_embeds",
                                  "exactly one of prompt and prompt_embeds")
        if self.prompt is not None and self.prompt_embeds is not None:
            raise CrossFieldError("prompt_embeds", self.prompt_embeds, "prompt is set as well",
                                  "exactly one of prompt and prompt_embeds")
        if self.negative_prompt_embeds is not None and self.prompt_embeds is None:
            raise CrossFieldError("negative_prompt_embeds", self.negative_prompt_embeds, "prompt_embeds is not set",
                                  "negative_prompt_embeds only with prompt_embeds")
        if self.negative_prompt_embeds is not None and self.negative_prompt is not None:
            raise CrossFieldError("negative_prompt_embeds", self.negative_prompt_embeds,
                                  "negative_prompt is set as well", "one of negative_prompt and negative_prompt_embeds")
        if self.prompt_embeds is not None:
            for name in ("clip_skip", "textual_inversions"):
                if getattr(self, name):
                    raise CrossFieldError(name, getattr(self, name), "it changes how prompt text is encoded, and "
                                          "this job sends embeddings", f"{name} only with prompt (not prompt_embeds)")
        tokens = [t.token for t in self.textual_inversions]
        if len(set(tokens)) != len(tokens):
            raise CrossFieldError("textual_inversions", tokens, "a token is defined twice", "distinct tokens")
        return self

    @model_validator(mode="after")
    def _scheduler_takes_options(self) -> Self:
        if self.scheduler is None:
            return self  # the model's default scheduler is known only to the worker, which checks it
        if self.eta is not None and self.scheduler not in ACCEPTS_ETA:
            raise CrossFieldError("eta", self.eta, f"scheduler {self.scheduler.value} ignores eta",
                                  f"eta only with scheduler {', '.join(sorted(ACCEPTS_ETA))}")
        if self.sigmas is not None and self.scheduler not in ACCEPTS_SIGMAS:
            raise CrossFieldError("sigmas", self.sigmas,
                                  f"scheduler {self.scheduler.value} does not accept explicit sigmas",
                                  f"sigmas only with scheduler {', '.join(sorted(ACCEPTS_SIGMAS))}")
        if self.timesteps is not None and self.scheduler not in ACCEPTS_TIMESTEPS:
            raise CrossFieldError("timesteps", self.timesteps,
                                  f"scheduler {self.scheduler.value} does not accept explicit timesteps",
                                  f"timesteps only with scheduler {', '.join(sorted(ACCEPTS_TIMESTEPS))}")
        return self

    @model_validator(mode="after")
    def _resize_options(self) -> Self:
        sizes = {"width": self.width, "height": self.height, "max_pixels": self.max_pixels}
        if self.resize_mode is ResizeMode.KEEP:
            for name, value in sizes.items():
                if value is not None:
                    raise CrossFieldError(name, value, "resize_mode keep does not resize the input",
                                          f"{name} only with resize_mode resize, crop_resize or resize_fill")
        if self.max_pixels is not None and (self.width is not None or self.height is not None):
            raise CrossFieldError("max_pixels", self.max_pixels, "width/height already fix the working size",
                                  "max_pixels only without width and height")
        return self

    @property
    def steps_to_run(self) -> int:
        """Denoising steps diffusers actually runs: ``int(num_inference_steps * strength)``
        (``len(timesteps)`` or ``len(sigmas)`` in place of ``num_inference_steps`` when given)."""
        explicit = self.timesteps or self.sigmas
        steps = len(explicit) if explicit else self.num_inference_steps
        return int(steps * self.strength)

    def seeded(self) -> Img2ImgJob:
        """This job with a random seed when it names none (the submitter draws it; a worker does for a job that
        reached it without one). Leaves room for ``seed + i`` per image."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1 - 64)})

    def seeds(self) -> list[int]:
        """One seed per output image (the list, or ``seed + i``); requires ``seed`` to be set."""
        if self.seed is None:
            raise ValueError("seed is not set")
        if isinstance(self.seed, list):
            return list(self.seed)
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images_per_prompt)]

    def prompts(self) -> list[str]:
        """One prompt per output image ("" each when the job sends prompt_embeds)."""
        return _per_image_texts(self.prompt if self.prompt is not None else "", self.num_images_per_prompt)

    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per output image, or None when the job has none."""
        if self.negative_prompt is None:
            return None
        return _per_image_texts(self.negative_prompt, self.num_images_per_prompt)


def _per_image_texts(value: str | list[str], count: int) -> list[str]:
    return list(value) if isinstance(value, list) else [value] * count


def allowed_range(model: type[BaseModel], field: str) -> str | None:
    """Describe a field's constraints for humans, e.g. ``0.0 <= strength <= 1.0``."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    override = info.json_schema_extra.get("allowed") if isinstance(info.json_schema_extra, dict) else None
    if isinstance(override, str):
        return override
    low: Any = None
    high: Any = None
    low_op, high_op = "<=", "<="
    max_len = None
    for meta in info.metadata:
        if isinstance(meta, Ge):
            low = meta.ge
        elif isinstance(meta, Gt):
            low, low_op = meta.gt, "<"
        elif isinstance(meta, Le):
            high = meta.le
        elif isinstance(meta, Lt):
            high, high_op = meta.lt, "<"
        elif isinstance(meta, MaxLen):
            max_len = meta.max_length
    annotation = info.annotation
    for arg in getattr(annotation, "__args__", ()):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Ge):
                low = meta.ge
            elif isinstance(meta, Le):
                high = meta.le
            elif isinstance(meta, MaxLen):
                max_len = meta.max_length
    enum = next((a for a in (annotation, *getattr(annotation, "__args__", ())) if _is_enum(a)), None)
    if enum is not None:
        return "one of " + ", ".join(m.value for m in enum)
    if max_len is not None and _is_list(annotation):
        return f"at most {max_len} items"
    if low is not None and high is not None:
        return f"{low} {low_op} {field} {high_op} {high}"
    if low is not None:
        return f"{field} >= {low}" if low_op == "<=" else f"{field} > {low}"
    if high is not None:
        return f"{field} <= {high}" if high_op == "<=" else f"{field} < {high}"
    if max_len is not None:
        return f"at most {max_len} characters"
    return None


def _is_enum(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, StrEnum)


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list or any(
        getattr(a, "__origin__", None) is list for a in getattr(annotation, "__args__", ())
    )


def _leaf(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[type[BaseModel], str]:
    """The (sub)model and field name an error location points at, e.g. adapters.1.weight -> AdapterRef.weight."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            continue
        if name:
            inner = _submodel(model.model_fields[name].annotation) if name in model.model_fields else None
            if inner is None:
                break
            model = inner
        name = part
    return model, name


def _submodel(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        for inner in (candidate, *getattr(candidate, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def field_errors(model: type[BaseModel], exc: ValidationError) -> list[FieldError]:
    """Turn a pydantic error into field-level messages with allowed ranges."""
    out = []
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, CrossFieldError):
            out.append(FieldError(cause.field, cause.value, cause.message, cause.allowed))
            continue
        loc = ".".join(str(p) for p in err["loc"] if p not in (_ONE, _PER_IMAGE)) or "(job)"
        if isinstance(cause, InvalidUri):
            out.append(FieldError(loc, cause.value, cause.reason, cause.allowed))
            continue
        owner, name = _leaf(model, tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; known fields: {', '.join(owner.model_fields)}"
        allowed = allowed_range(owner, name) if name in owner.model_fields else None
        value = err.get("input")
        if loc in URL_FIELDS and isinstance(value, str):  # a refused job's message is stored and shown
            value = redact_url(value)
        out.append(FieldError(loc, value, msg, allowed))
    return out


def validate_job(data: Img2ImgJob | dict[str, Any]) -> Img2ImgJob:
    """Validate a job or a JSON-like mapping; raise :class:`InvalidJobError` listing every bad field."""
    if isinstance(data, Img2ImgJob):
        data = data.model_dump(mode="json", exclude_unset=True)
    try:
        job = Img2ImgJob.model_validate(data)
    except ValidationError as exc:
        raise InvalidJobError(field_errors(Img2ImgJob, exc)) from None
    errors = reference_errors(job)
    if errors:
        raise InvalidJobError(errors)
    return job


def reference_errors(job: Img2ImgJob) -> list[FieldError]:
    """Every ``s3://`` reference of ``job`` through the strict parser (the model itself parses them leniently,
    so that records stored before the strict rules stay readable); one error per refused field."""
    from .boundaries import named_references  # boundaries reads jobs' types; imported here, not at the top

    errors = []
    for field, value, prefix in named_references(job):
        try:
            S3Uri.parse(value, allow_empty_key=prefix)
        except InvalidUri as exc:
            errors.append(FieldError(field, exc.value, exc.reason, exc.allowed))
    return errors
