"""Per-job pipeline features: prompt embeddings, textual inversions, FreeU and the IP-Adapter scale.

Fetching (embeddings, textual-inversion files) is I/O and runs on the job's task thread with the
input image. Applying them touches the pipeline, so :func:`applied` runs on the engine thread, for
one call only: textual inversions are loaded before the call and unloaded after it, FreeU is
enabled and disabled again, so nothing a job asks for reaches the next job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from darkroom.common.errors import ErrorCode, JobError, ObjectNotFoundError, ObjectTooLargeError, StorageError
from darkroom.common.jobs import FreeU, Img2ImgJob, TextualInversion
from darkroom.common.storage import S3Uri

from .inference.call import LocalEmbedding
from .ip_adapter import ip_adapter_scaled

__all__ = ["MAX_EMBEDDING_BYTES", "applied", "check_embeddings", "fetch_embeddings", "fetch_textual_inversions"]

log = logging.getLogger(__name__)

MAX_EMBEDDING_BYTES = 64 * 1024 * 1024


def fetch_embeddings(store: Any, uri: str, job: Img2ImgJob, field: str) -> Any:
    """Load a prompt-embeddings file into a CPU tensor [images, tokens, hidden] (a batch of 1 is repeated)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = store.get_bytes(S3Uri.parse(uri), max_bytes=MAX_EMBEDDING_BYTES)
    except ObjectNotFoundError:
        raise JobError(ErrorCode.EMBEDDING_NOT_FOUND, f"{field} {uri} does not exist; upload it first") from None
    except ObjectTooLargeError as exc:
        raise JobError(ErrorCode.EMBEDDING_INVALID, f"{field}: {exc}") from None
    except StorageError as exc:
        raise JobError(ErrorCode.EMBEDDING_NOT_FOUND, f"cannot read {field} {uri}: {exc}") from None
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise JobError(ErrorCode.EMBEDDING_INVALID, f"{field} {uri} is not a readable safetensors file: {exc}") \
            from None
    tensor = tensors.get(field, tensors.get("prompt_embeds"))
    if tensor is None and len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    if tensor is None:
        raise JobError(ErrorCode.EMBEDDING_INVALID, f"{field} {uri} holds {sorted(tensors)}; put one tensor in it, "
                                                    f"named {field!r}")
    images = job.num_images_per_prompt
    if tensor.ndim != 3 or tensor.shape[0] not in (1, images) or not tensor.is_floating_point():
        raise JobError(ErrorCode.EMBEDDING_INVALID,
                       f"{field} has shape {tuple(tensor.shape)} ({tensor.dtype}); expected floats of shape "
                       f"[1 or {images}, tokens, hidden size]")
    return tensor.float().expand(images, -1, -1).contiguous()


def check_embeddings(item: Any, pipeline: Any) -> None:
    """Refuse embeddings whose hidden size or token count the model cannot take (job error, not a crash)."""
    if item.prompt_embeds is None:
        return
    hidden = int(getattr(pipeline.unet.config, "cross_attention_dim", 0) or 0)
    if hidden and int(item.prompt_embeds.shape[2]) != hidden:
        raise JobError(ErrorCode.EMBEDDING_INVALID, f"prompt_embeds hidden size {item.prompt_embeds.shape[2]} does "
                                                    f"not match this model's {hidden}")
    negative = item.negative_prompt_embeds
    if negative is not None and tuple(negative.shape) != tuple(item.prompt_embeds.shape):
        raise JobError(ErrorCode.EMBEDDING_INVALID, f"negative_prompt_embeds has shape {tuple(negative.shape)}; it "
                                                    f"must match prompt_embeds {tuple(item.prompt_embeds.shape)}")


def fetch_textual_inversions(files: Any, refs: Sequence[TextualInversion]) -> tuple[LocalEmbedding, ...]:
    """Fetch each textual-inversion file once into the worker's content-addressed cache."""
    out = []
    for ref in refs:
        try:
            path = files.fetch_file(S3Uri.parse(ref.uri), max_bytes=files.max_adapter_bytes)
        except ObjectNotFoundError:
            raise JobError(ErrorCode.EMBEDDING_NOT_FOUND, f"textual inversion {ref.uri} does not exist") from None
        except StorageError as exc:
            raise JobError(ErrorCode.EMBEDDING_INVALID, f"textual inversion {ref.uri}: {exc}") from None
        out.append(LocalEmbedding(path, ref.token, path.parent.name))
    return tuple(out)


@contextlib.contextmanager
def applied(pipeline: Any, textual_inversions: Sequence[LocalEmbedding], freeu: FreeU | None,
            ip_adapter_scale: float | None = None) -> Iterator[None]:
    """The job's textual inversions, FreeU and IP-Adapter scale on ``pipeline`` for the duration of one call
    (a model's IP-Adapter rests at scale 0; see :mod:`.ip_adapter`)."""
    loaded: list[str] = []
    vocabulary = len(pipeline.tokenizer) if textual_inversions else 0
    try:
        for embedding in textual_inversions:
            try:
                pipeline.load_textual_inversion(str(embedding.path), token=embedding.token)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise JobError(ErrorCode.EMBEDDING_INVALID,
                               f"cannot load textual inversion {embedding.path.name} as {embedding.token}: {exc}") \
                    from None
            loaded.append(embedding.token)
        if freeu is not None:
            pipeline.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)
        with ip_adapter_scaled(pipeline, ip_adapter_scale):
            yield
    finally:
        if freeu is not None:
            pipeline.disable_freeu()
        if loaded:
            added = pipeline.tokenizer.convert_ids_to_tokens(list(range(vocabulary, len(pipeline.tokenizer))))
            pipeline.unload_textual_inversion(added)  # every token added, multi-vector ones included
