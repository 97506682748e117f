"""A cache of VAE encodings of input images, reused across a source image's variants.

img2img starts from the VAE encoding of its input. Augmentation runs ask for many variants of
one source (prompts × strengths × seeds); each would encode the same pixels again. The cache
keeps the encoder's output *distribution* (mean and log-variance) per (VAE, pixels), bounded by
bytes, least recently used out first.

What diffusers does with an input, and so what this must reproduce exactly:
``latent_dist.sample(generator)`` with the job's generator (which consumes the generator's first
numbers), scaled as the family's ``prepare_latents`` scales it (``scaling_factor``; SDXL's optional
latents mean and std and its float32 encode; SD3's and Flux's ``shift_factor``: the family module's
``scale_latents``); the pipeline accepts the result as ``image`` (as many channels as the VAE's latents:
used as the initial latents as-is) and draws its noise from the same generator next. So a cached
encoding gives the same image as a fresh one, bit for bit, in every family.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

    from .families.base import FamilyCall

__all__ = ["LatentCache", "pixel_digest"]


def pixel_digest(image: Image) -> str:
    """A digest of an image's decoded pixels, size and mode (what the VAE would see)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class LatentCache:
    """VAE encodings by (VAE module, pixel digest), at most ``max_bytes`` of tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, str], tuple[weakref.ref[Any], Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def initial_latents(self, pipeline: Any, images: Sequence[Image], digests: Sequence[str | None],
                        generators: Sequence[Any], family: FamilyCall) -> Any:
        """The scaled initial latents of each image, sampled with its generator (one per image)."""
        import torch

        vae = pipeline.vae
        device = pipeline._execution_device
        encoder = pipeline.text_encoder if pipeline.text_encoder is not None else None
        dtype = encoder.dtype if encoder is not None else (pipeline.unet if hasattr(pipeline, "unet")
                                                           else pipeline.transformer).dtype
        samples = []
        with torch.no_grad():
            for image, digest, generator in zip(images, digests, generators, strict=True):
                dist = self._get(vae, digest)
                if dist is None:
                    dist = self._encode(pipeline, image, family, device, dtype)
                    self._put(vae, digest, dist)
                samples.append(dist.sample(generator=generator))
            return family.scale_latents(vae, torch.cat(samples, dim=0), dtype)

    @staticmethod
    def _encode(pipeline: Any, image: Image, family: FamilyCall, device: Any, dtype: Any) -> Any:
        """The VAE's latent distribution of ``image``, encoded as the family's pipeline encodes it."""
        import torch

        vae = pipeline.vae
        pixels = pipeline.image_processor.preprocess(image, **family.encode_size(image.size))
        pixels = pixels.to(device=device, dtype=dtype)
        upcast = family.upcast_vae and getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32
        if not upcast:
            return vae.encode(pixels).latent_dist
        vae.to(dtype=torch.float32)  # as the pipeline does: the VAE overflows in float16
        try:
            return vae.encode(pixels.float()).latent_dist
        finally:
            vae.to(dtype)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _get(self, vae: Any, digest: str | None) -> Any | None:
        if digest is None or self.max_bytes <= 0:
            return None
        with self._lock:
            entry = self._entries.get((id(vae), digest))
            if entry is not None and entry[0]() is vae:
                self._entries.move_to_end((id(vae), digest))
                self.hits += 1
                return entry[1]
            self.misses += 1
            return None

    def _put(self, vae: Any, digest: str | None, dist: Any) -> None:
        size = _dist_bytes(dist)
        if digest is None or size > self.max_bytes:
            return
        with self._lock:
            key = (id(vae), digest)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._entries[key] = (weakref.ref(vae), dist, size)
            self._bytes += size
            while self._bytes > self.max_bytes or self._dead_first():
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def _dead_first(self) -> bool:
        """Is the oldest entry of a VAE that no longer exists (its model was evicted)?"""
        if not self._entries:
            return False
        ref = next(iter(self._entries.values()))[0]
        return ref() is None


def _dist_bytes(dist: Any) -> int:
    tensors = [getattr(dist, name, None) for name in ("parameters", "mean", "logvar", "std", "var")]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))
