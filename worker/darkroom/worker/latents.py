"""A cache of VAE encodings of input images, reused across a source image's variants.

img2img starts from the VAE encoding of its input. Augmentation runs ask for many variants of
one source (prompts × strengths × seeds); each would encode the same pixels again. The cache
keeps the encoder's output *distribution* (mean and log-variance) per (VAE, pixels), bounded by
bytes, least recently used out first.

What diffusers does with an input, and so what this must reproduce exactly:
``latent_dist.sample(generator)`` with the job's generator (which consumes the generator's first
numbers), times ``vae.config.scaling_factor``; the pipeline accepts the result as ``image``
(4 channels: used as the initial latents as-is) and draws its noise from the same generator next.
So a cached encoding gives the same image as a fresh one, bit for bit.
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
                        generators: Sequence[Any]) -> Any:
        """The scaled initial latents of each image, sampled with its generator (one per image)."""
        import torch

        vae = pipeline.vae
        device = pipeline._execution_device
        dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else pipeline.unet.dtype
        samples = []
        with torch.no_grad():
            for image, digest, generator in zip(images, digests, generators, strict=True):
                dist = self._get(vae, digest)
                if dist is None:
                    pixels = pipeline.image_processor.preprocess(image).to(device=device, dtype=dtype)
                    dist = vae.encode(pixels).latent_dist
                    self._put(vae, digest, dist)
                samples.append(dist.sample(generator=generator))
            return vae.config.scaling_factor * torch.cat(samples, dim=0)

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
