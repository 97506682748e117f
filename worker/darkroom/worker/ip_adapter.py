"""IP-Adapter: an image prompt beside the text prompt, for models whose registry entry names one.

**Loading** (:func:`load_ip_adapter`, once, with the model, before the worker's pipeline settings
apply): the CLIP image encoder (``CLIPVisionModelWithProjection``, local files, safetensors unless
pickles are allowed) is registered as the pipeline's ``image_encoder``, then diffusers'
``load_ip_adapter`` puts the adapter's projections into the UNet's cross-attention layers. The
scale then rests at 0: a call that does not set it is the base model's.

**Per call** (engine thread): :func:`ip_adapter_scaled` sets the scale for the call (the batch's, or
0 for a call without image prompts) and puts it back to 0 afterwards; :func:`ip_adapter_inputs`
builds the call's ``ip_adapter_image_embeds``: each job's image encoded with diffusers'
``encode_image``, one row per sample (zeros as the unconditional rows, as diffusers makes them).
A UNet with IP layers needs image embeddings in every call, so a call without image prompts gets
zeros and scale 0, with which diffusers skips the IP attention entirely: bit-identical to the base
model.

**Per-sample images.** diffusers broadcasts one image prompt to the whole batch: its
``prepare_ip_adapter_image_embeds`` repeats whatever embeddings it gets ``batch size`` times (a list
of images is read as one image per IP-Adapter, or as several images for every sample; diffusers issue
#9813). So a pipeline loaded here takes ``ip_adapter_image_embeds`` as already one row per sample
(negatives first under classifier-free guidance): for one sample that is diffusers' own reading, and
for a batch each job keeps its own image prompt.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ErrorCode, JobError

if TYPE_CHECKING:
    from .inference.call import WorkItem

__all__ = ["IPAdapterFiles", "has_ip_adapter", "ip_adapter_inputs", "ip_adapter_scaled", "load_ip_adapter"]

_PREFIXES = ("image_proj.", "ip_adapter.")


@dataclass(frozen=True)
class IPAdapterFiles:
    """A model's IP-Adapter on local disk: the weights file and the image encoder folder."""

    weights: Path
    image_encoder: Path


def load_ip_adapter(pipe: Any, files: IPAdapterFiles, *, allow_pickle: bool = False) -> None:
    """Load the image encoder and the adapter into ``pipe`` (offline); the scale rests at 0.

    Raises ``ValueError`` (the model then fails to load) for files that are not a plain IP-Adapter for
    this UNet, with what was wrong.
    """
    from transformers import CLIPVisionModelWithProjection

    weights = files.weights
    if weights.suffix != ".safetensors" and not allow_pickle:
        raise ValueError(f"IP-Adapter weights {weights.name} is a pickle file, which can run code when loaded; "
                         "convert it to .safetensors, or set DARKROOM_ALLOW_PICKLE_WEIGHTS=true if you trust it")
    if weights.suffix == ".safetensors":
        _check_layout(weights)
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(files.image_encoder), dtype=pipe.dtype, local_files_only=True,
            use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"IP-Adapter image encoder {files.image_encoder}: {exc}") from exc
    pipe.register_modules(image_encoder=encoder)
    try:
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None,
                             local_files_only=True)
    except (KeyError, RuntimeError) as exc:  # a missing layer key, a shape that does not fit this UNet
        raise ValueError(f"IP-Adapter {weights.name} does not fit this model's UNet: {exc}") from exc
    pipe.prepare_ip_adapter_image_embeds = types.MethodType(_per_sample_embeds, pipe)
    pipe.set_ip_adapter_scale(0.0)


def _check_layout(weights: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device="cpu") as handle:
        keys = list(handle.keys())
    if not all(any(k.startswith(p) for k in keys) for p in _PREFIXES):
        raise ValueError(f"IP-Adapter {weights.name} holds no image_proj.* and ip_adapter.* tensors; it is not an "
                         "IP-Adapter in the original layout (e.g. h94/IP-Adapter's ip-adapter_sd15.safetensors)")
    if any("lora" in k for k in keys):
        raise ValueError(f"IP-Adapter {weights.name} carries LoRA weights (an IP-Adapter FaceID variant), which "
                         "this worker does not support")


def _per_sample_embeds(self: Any, ip_adapter_image: Any, ip_adapter_image_embeds: Any, device: Any,
                       num_images_per_prompt: int, do_classifier_free_guidance: bool) -> list[Any]:
    """``prepare_ip_adapter_image_embeds`` for embeddings that are already one row per sample (see above)."""
    if ip_adapter_image_embeds is None:
        prepared: list[Any] = type(self).prepare_ip_adapter_image_embeds(
            self, ip_adapter_image, None, device, num_images_per_prompt, do_classifier_free_guidance)
        return prepared
    rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
    for embeds in ip_adapter_image_embeds:
        if embeds.shape[0] != rows:
            raise ValueError(f"ip_adapter_image_embeds has {embeds.shape[0]} rows; this call needs one per sample "
                             f"({rows}, negatives first under classifier-free guidance)")
    return [embeds.to(device=device) for embeds in ip_adapter_image_embeds]


def has_ip_adapter(pipe: Any) -> bool:
    """Whether ``pipe``'s UNet carries IP-Adapter layers."""
    unet = getattr(pipe, "unet", None)
    return getattr(getattr(unet, "config", None), "encoder_hid_dim_type", None) == "ip_image_proj"


@contextlib.contextmanager
def ip_adapter_scaled(pipe: Any, scale: float | None) -> Iterator[None]:
    """``scale`` on ``pipe``'s IP-Adapter for one call (None: a call without image prompts, scale 0)."""
    if not has_ip_adapter(pipe):
        if scale is not None:
            raise JobError(ErrorCode.INVALID_JOB, "ip_adapter_image needs a model with an IP-Adapter; this one has "
                                                  "none configured")
        yield
        return
    pipe.set_ip_adapter_scale(0.0 if scale is None else scale)
    try:
        yield
    finally:
        pipe.set_ip_adapter_scale(0.0)


def ip_adapter_inputs(pipe: Any, items: Sequence[WorkItem], guidance_scale: float) -> dict[str, Any]:
    """The call's ``ip_adapter_image_embeds``, one row per sample; nothing for a model without an IP-Adapter."""
    import torch

    if not has_ip_adapter(pipe):
        if any(item.ip_adapter_image is not None for item in items):
            raise JobError(ErrorCode.INVALID_JOB, "ip_adapter_image needs a model with an IP-Adapter; this one has "
                                                  "none configured")
        return {}
    device = pipe._execution_device
    guided = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # diffusers' rule
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise ValueError(f"this model carries {len(layers)} IP-Adapters; Darkroom loads exactly one")
    hidden_states = type(layers[0]).__name__ != "ImageProjection"  # diffusers' rule: Plus variants read them
    positives: list[Any] = []
    negatives: list[Any] = []
    encoded: dict[int, tuple[Any, Any]] = {}
    with torch.no_grad():
        for item in items:
            image = item.ip_adapter_image
            if image is None:
                pair = _null_embeds(pipe, hidden_states)
            elif id(image) in encoded:
                pair = encoded[id(image)]
            else:
                pair = encoded[id(image)] = pipe.encode_image(image, device, 1, hidden_states)
            positives += [pair[0][None]] * len(item.seeds)
            negatives += [pair[1][None]] * len(item.seeds)
    embeds = torch.cat(negatives + positives if guided else positives)
    return {"ip_adapter_image_embeds": [embeds]}


def _null_embeds(pipe: Any, hidden_states: bool) -> tuple[Any, Any]:
    """Zero image embeddings of the encoder's output shape, for calls whose scale is 0 (never attended to)."""
    import torch

    config = pipe.image_encoder.config
    shape = ((1, (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size) if hidden_states
             else (1, config.projection_dim))
    zeros = torch.zeros(shape, dtype=pipe.image_encoder.dtype, device=pipe._execution_device)
    return zeros, zeros
