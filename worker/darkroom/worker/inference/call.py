"""The pipeline call: a *list* of prepared jobs in, a list of images per job out.

Every job is expanded into one sample per output image, each with its own
generator (``seed + i``), so a job's images do not depend on what it is batched
with (diffusers' ``num_images_per_prompt`` pairs images and prompts oddly for
lists, so it stays 1). Generators live on the CPU so a seed means the same noise
on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.families import Family
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.schedulers import SchedulerName

from ..families import CALLS, Row, call_for
from ..ip_adapter import ip_adapter_inputs
from ..schedulers import accepts_eta, accepts_sigmas, accepts_timesteps

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..adapters import AdapterSet
    from ..latents import LatentCache

__all__ = ["WorkItem", "LocalEmbedding", "BatchKey", "decode_latents", "BatchOutput", "batch_key", "check_call_options", "clip_skip_compat", "run_batch"]

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkItem:
    """A job ready for the pipeline: its decoded input and its seeds."""

    job: Img2ImgJob
    image: Image
    seeds: list[int]
    digest: str | None = None  # of the decoded input's pixels: the latent cache's key
    prompt_embeds: Any = None  # CPU tensors [images, tokens, hidden], fetched with the input
    negative_prompt_embeds: Any = None
    textual_inversions: tuple[LocalEmbedding, ...] = ()
    ip_adapter_image: Image | None = None  # the decoded image prompt, fetched with the input
    ip_adapter_scale: float | None = None  # the job's, else the model's; None without an image prompt
    adapters: AdapterSet = ()  # the job's LoRA files (fetched and inspected with the input) and weights
    family: Family | None = None  # of the job's model, when known before it runs (see PipelineCache.family_of)
    latent_input: Any = None  # [1, C, h, w] latents instead of an image (a chain's ensemble handoff)

    @property
    def embeds_shape(self) -> tuple[int, int, bool] | None:
        """(tokens, hidden size, has negative embeddings) when the job sends embeddings."""
        if self.prompt_embeds is None:
            return None
        return (int(self.prompt_embeds.shape[1]), int(self.prompt_embeds.shape[2]),
                self.negative_prompt_embeds is not None)


@dataclass(frozen=True)
class LocalEmbedding:
    """A textual-inversion file fetched to local disk, with the token it defines."""

    path: Path
    token: str
    sha256: str


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys can share one pipeline call.

    Strength enters only through the steps it runs: diffusers starts at timestep index
    ``num_inference_steps - int(num_inference_steps * strength)``, so strengths 0.50 and 0.52 of 20
    steps denoise identically. Prompts, negative prompts, images and seeds may differ.
    """

    model: str
    num_inference_steps: int
    steps_to_run: int
    guidance_scale: float
    size: tuple[int, int]
    scheduler: SchedulerName | None = None
    eta: float | None = None
    clip_skip: int | None = None
    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    adapters: tuple[tuple[str, float], ...] = ()
    embeds: tuple[int, int, bool] | None = None  # (tokens, hidden, negative?) of prompt_embeds jobs
    textual_inversions: tuple[tuple[str, str], ...] = ()  # (token, sha256)
    freeu: tuple[float, float, float, float] | None = None
    ip_adapter_scale: float | None = None  # jobs with an image prompt (any image) share calls at one scale
    family: tuple[Any, ...] = ()  # what the model family's call needs equal (SDXL's size conditioning...)
    latent_input: bool = False  # jobs whose input is latents share calls only with each other


@dataclass(frozen=True)
class BatchOutput:
    """Each job's images in order, and the denoising steps the scheduler really ran.

    ``steps_run`` is usually ``int(num_inference_steps * strength)``; PNDM runs one more.
    """

    images: list[list[Image]]
    steps_run: int
    latents: list[list[Any]] | None = None  # each image's final latents (CPU), when a job asked for them


def batch_key(item: WorkItem, *, mixed_adapters: bool = False) -> BatchKey:
    """The job's batch key; with ``mixed_adapters`` its adapters are left out (:mod:`.mixing` routes them)."""
    job = item.job
    return BatchKey(job.model, job.num_inference_steps, job.steps_to_run, job.guidance_scale, item.image.size,
                    job.scheduler, job.eta, job.clip_skip, None if job.timesteps is None else tuple(job.timesteps),
                    None if job.sigmas is None else tuple(job.sigmas),
                    () if mixed_adapters else tuple((a.uri, a.weight) for a in job.adapters), item.embeds_shape,
                    tuple((e.token, e.sha256) for e in item.textual_inversions),
                    None if job.freeu is None else (job.freeu.s1, job.freeu.s2, job.freeu.b1, job.freeu.b2),
                    ip_adapter_scale=item.ip_adapter_scale, family=family_batch_key(item.family, job),
                    latent_input=item.latent_input is not None)


def family_batch_key(family: Family | None, job: Img2ImgJob) -> tuple[Any, ...]:
    """The family's part of the batch key; for a model whose family is not known yet, every family's (the
    strictest: jobs that could differ in any family never share a call)."""
    if family is not None:
        return (family.value, *CALLS[family].batch_key(job))
    return tuple(part for call in CALLS.values() for part in call.batch_key(job))


def check_call_options(job: Img2ImgJob, pipeline: Any) -> None:
    """Refuse (``invalid_job``) options the pipeline's current scheduler or text encoder cannot honour."""
    scheduler = pipeline.scheduler
    name = type(scheduler).__name__
    if job.eta is not None and not accepts_eta(scheduler):
        raise JobError(ErrorCode.INVALID_JOB, f"eta={job.eta} needs a scheduler whose step takes eta (ddim); "
                                              f"this job runs {name}, which ignores it")
    config = getattr(scheduler, "config", None)
    train = int(getattr(config, "num_train_timesteps", 0) or 0)
    offset = int(getattr(config, "steps_offset", 0) or 0)
    if (job.timesteps is None and job.sigmas is None and train and getattr(config, "timestep_spacing", "leading") == "leading"
            and job.num_inference_steps > train - offset):  # diffusers would index past its noise schedule
        raise JobError(ErrorCode.INVALID_JOB, f"num_inference_steps={job.num_inference_steps} is more than {name} "
                                              f"can run on this model ({train} training timesteps, steps_offset "
                                              f"{offset}): 1 <= num_inference_steps <= {train - offset}")
    if job.sigmas is not None and not accepts_sigmas(scheduler):
        raise JobError(ErrorCode.INVALID_JOB, f"sigmas={job.sigmas} needs a scheduler that accepts explicit sigmas "
                                              f"(euler); this job runs {name}")
    if job.timesteps is not None and not accepts_timesteps(scheduler):
        raise JobError(ErrorCode.INVALID_JOB, f"timesteps={job.timesteps} needs a scheduler that accepts "
                                              f"explicit timesteps (euler, dpmpp_2m, lcm); this job runs {name}")
    if job.clip_skip is None:
        return
    layers = int(getattr(getattr(pipeline.text_encoder, "config", None), "num_hidden_layers", 0) or 0)
    if layers and job.clip_skip >= layers:
        raise JobError(ErrorCode.INVALID_JOB, f"clip_skip={job.clip_skip} must be below this model's "
                                              f"{layers} text-encoder layers: 1 <= clip_skip <= {layers - 1}")
    clip_skip_compat(pipeline.text_encoder)


def clip_skip_compat(text_encoder: Any) -> None:
    """Let diffusers' clip_skip path find ``text_encoder.text_model.final_layer_norm``.

    transformers 5 flattened ``CLIPTextModel`` (``final_layer_norm`` sits on the model itself); diffusers
    0.42 still reaches for ``.text_model``. The alias is a plain attribute, not a registered submodule,
    so parameters, state dicts and adapters see nothing new.
    """
    if not hasattr(text_encoder, "text_model") and hasattr(text_encoder, "final_layer_norm"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


def _call_options(job: Img2ImgJob, scheduler: Any) -> dict[str, Any]:
    """The optional pipeline arguments a job sets; none of them when it leaves them at their defaults."""
    options: dict[str, Any] = {}
    if job.eta is not None and accepts_eta(scheduler):
        options["eta"] = job.eta
    if job.clip_skip is not None:
        options["clip_skip"] = job.clip_skip
    if job.timesteps is not None:
        options["timesteps"] = list(job.timesteps)
    if job.sigmas is not None:
        options["sigmas"] = list(job.sigmas)
    return options


def run_batch(pipeline: Any, items: Sequence[WorkItem], on_step: StepCallback | None = None,
              latents: LatentCache | None = None) -> BatchOutput:
    """Run one pipeline call for batch-compatible ``items``; return each job's images in order.

    With a :class:`~.latents.LatentCache`, each input's VAE encoding is reused across calls and the
    pipeline gets the initial latents (sampled with the job's own generator, as diffusers would).
    """
    import torch

    if not items:
        return BatchOutput([], 0)
    keys = {batch_key(item, mixed_adapters=True) for item in items}  # adapters are set up by the caller
    if len(keys) != 1:
        raise ValueError(f"items are not batch-compatible: {sorted(map(str, keys))}")
    first = items[0].job
    family = call_for(pipeline)
    rows: list[Row] = []
    negatives: list[str] = []
    images: list[Image] = []
    latent_inputs: list[Any] = []
    digests: list[str | None] = []
    generators: list[torch.Generator] = []
    for item in items:
        job_negatives = item.job.negative_prompts() or [""] * len(item.seeds)
        for prompt, negative, seed in zip(item.job.prompts(), job_negatives, item.seeds, strict=True):
            rows.append(Row(item.job, prompt, negative))
            negatives.append(negative)
            images.append(item.image)
            latent_inputs.append(item.latent_input)
            digests.append(item.digest)
            generators.append(torch.Generator("cpu").manual_seed(seed))
    want_latents = any(item.job.output_latents for item in items)
    text = family.text(rows)
    if items[0].prompt_embeds is not None:
        text = _embeddings(pipeline, items, negatives)
    cached = latents is not None and family.latent_cache
    if items[0].latent_input is not None:  # an ensemble's second half: the upstream's latents are the input
        image_argument: Any = torch.cat(latent_inputs).to(pipeline._execution_device)
    elif cached and latents is not None:
        image_argument = latents.initial_latents(pipeline, images, digests, generators, family)
    else:
        image_argument = images
    output = pipeline(
        **text,
        image=image_argument,
        strength=first.strength,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        generator=generators,
        num_images_per_prompt=1,
        output_type="latent" if want_latents else "pil",
        callback_on_step_end=_step_hook(on_step) if on_step else None,
        **_call_options(first, pipeline.scheduler),
        **ip_adapter_inputs(pipeline, items, first.guidance_scale),
        **family.options(first, items[0].image.size),
    )
    final_latents = None
    pictures = output.images
    if want_latents:
        final_latents = output.images
        pictures = decode_latents(pipeline, final_latents, generators)
    results: list[list[Image]] = []
    per_job_latents: list[list[Any]] = []
    cursor = 0
    for item in items:
        count = len(item.seeds)
        results.append(list(pictures[cursor : cursor + count]))
        if final_latents is not None:
            per_job_latents.append([final_latents[i : i + 1].detach().to("cpu") for i in range(cursor, cursor + count)])
        cursor += count
    return BatchOutput(results, int(getattr(pipeline, "num_timesteps", 0) or 0),
                       per_job_latents if final_latents is not None else None)


def decode_latents(pipeline: Any, latents: Any, generators: Any) -> list[Image]:
    """What the pipeline does after its last step for ``output_type="pil"`` (with no safety checker)."""
    import torch

    with torch.no_grad():
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False,
                                      generator=generators)[0]
    images: list[Image] = pipeline.image_processor.postprocess(decoded, output_type="pil",
                                                               do_denormalize=[True] * decoded.shape[0])
    return images


def _embeddings(pipeline: Any, items: Sequence[WorkItem], negatives: list[str]) -> dict[str, Any]:
    """The call's text arguments for jobs that send embeddings (one row per image, in job order)."""
    import torch

    device = pipeline._execution_device
    dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else pipeline.unet.dtype
    text: dict[str, Any] = {
        "prompt_embeds": torch.cat([item.prompt_embeds for item in items]).to(device=device, dtype=dtype)}
    if items[0].negative_prompt_embeds is not None:
        text["negative_prompt_embeds"] = torch.cat([item.negative_prompt_embeds for item in items]).to(
            device=device, dtype=dtype)
    elif any(negatives):
        text["negative_prompt"] = negatives
    return text


def _step_hook(on_step: StepCallback) -> Callable[..., dict[str, Any]]:
    def hook(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0))
        return kwargs

    return hook
