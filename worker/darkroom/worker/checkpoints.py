"""Single-file checkpoints: loading them offline, and writing one in the original (LDM) layout.

A single-file Stable Diffusion checkpoint (``model.safetensors``, or a pickle
``.ckpt``) holds the UNet, VAE and text encoder under the original CompVis/LDM
key names (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). diffusers' ``from_single_file`` converts
them; what it cannot find in the file (every component's config, the tokenizer,
the scheduler) it reads from ``config``: a local diffusers folder, of which only
the JSON configs and tokenizer files are used. With that folder nothing is
fetched from the Hugging Face hub.

:func:`ldm_state_dict` is the inverse conversion (diffusers -> LDM names), used
to write the tiny model as a single file for tests; diffusers' own conversion
reads it back to the identical tensors.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SINGLE_FILE_SUFFIXES", "PICKLE_SUFFIXES", "is_single_file", "load_single_file", "ldm_state_dict",
           "ldm_unet_state_dict", "ldm_vae_state_dict", "copy_config_folder"]

#: Files diffusers reads as one whole-pipeline checkpoint.
SINGLE_FILE_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
#: Of those, the ones that are Python pickles (arbitrary code on load in general; refused by default).
PICKLE_SUFFIXES = SINGLE_FILE_SUFFIXES - {".safetensors"}
#: Files of a diffusers folder that ``config`` needs: configs, tokenizer, scheduler (no weights).
CONFIG_PATTERNS = ("model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*", "feature_extractor/*")


def is_single_file(source: str) -> bool:
    """Whether a model source names one checkpoint file (local path or ``s3://`` object) rather than a folder."""
    return Path(source.rstrip("/")).suffix.lower() in SINGLE_FILE_SUFFIXES


def load_single_file(file: Path, config: Path, dtype: Any, components: dict[str, Any] | None = None,
                     pipeline_class: str = "StableDiffusionImg2ImgPipeline") -> Any:
    """``<pipeline_class>.from_single_file`` (the family's img2img pipeline) with every config from the local
    folder ``config``."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if not (config / "model_index.json").is_file():
        raise ValueError(f"config folder {config} holds no model_index.json (a diffusers folder is needed for "
                         "the component configs, tokenizer and scheduler)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            extra = {"safety_checker": None, "requires_safety_checker": False} \
                if pipeline_class == "StableDiffusionImg2ImgPipeline" else {}
            pipe = getattr(diffusers, pipeline_class).from_single_file(
                str(file), config=str(config), local_files_only=True, torch_dtype=dtype, **extra,
                **(components or {}),
            )
    except (SingleFileComponentError, KeyError, RuntimeError, NotImplementedError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise ValueError(f"{file.name} does not fit the architecture of {config}: {message.splitlines()[0]}") from exc
    for component in pipe.components.values():  # diffusers leaves a T5 read from the file in training mode
        if hasattr(component, "eval"):  # (dropout on): every model serves in eval mode, as from_pretrained's do
            component.eval()
    return pipe


def copy_config_folder(model_dir: Path, dest: Path) -> Path:
    """Copy a diffusers folder's configs and tokenizer (no weights) to ``dest``: a ``config`` for single files."""
    import shutil

    model_dir = Path(model_dir)
    for pattern in CONFIG_PATTERNS:
        for file in model_dir.glob(pattern):
            if file.is_file():
                target = Path(dest) / file.relative_to(model_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
    return Path(dest)


# -- diffusers -> LDM key names ---------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_state_dict(pipeline: Any) -> dict[str, Any]:
    """The pipeline's UNet, VAE and CLIP text encoder weights under the original LDM key names.

    Covers the SD 1.x layout (cross-attention UNet with conv projections, a KL VAE, a CLIP text encoder).
    """
    out = {"model.diffusion_model." + k: v for k, v in ldm_unet_state_dict(pipeline.unet).items()}
    out.update({"first_stage_model." + k: v for k, v in ldm_vae_state_dict(pipeline.vae).items()})
    for key, tensor in pipeline.text_encoder.state_dict().items():
        inner = key if key.startswith("text_model.") else "text_model." + key  # transformers >= 5.6 is flattened
        out["cond_stage_model.transformer." + inner] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def ldm_unet_state_dict(unet: Any) -> dict[str, Any]:
    """A diffusers UNet's weights under LDM names (no prefix); SDXL's ``add_embedding`` included."""
    rename = _unet_keys(dict(unet.config))
    return {rename(key): tensor for key, tensor in unet.state_dict().items()}


def ldm_vae_state_dict(vae: Any) -> dict[str, Any]:
    """A diffusers KL VAE's weights under LDM names (no prefix)."""
    rename = _vae_keys(len(vae.config.up_block_types))
    out = {}
    for key, tensor in vae.state_dict().items():
        new = rename(key)
        if ".mid.attn_1." in new and tensor.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
            tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def _unet_keys(config: dict[str, Any]) -> Callable[[str], str]:
    stride = int(config["layers_per_block"]) + 1  # LDM blocks per level: the layers, then the down/upsampler
    cross = ["CrossAttn" in name for name in config["up_block_types"]]

    def rename(key: str) -> str:
        for old, new in _UNET_FIXED.items():
            if key.startswith(old + "."):
                return new + key[len(old):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            index = 1 + int(m[1]) * stride + int(m[3])
            return f"input_blocks.{index}." + _part(m[2], m[4])
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            return f"input_blocks.{1 + int(m[1]) * stride + stride - 1}.0.op.{m[2]}"
        if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            index = 2 * int(m[2]) if m[1] == "resnets" else 1  # resnet, attention, resnet: no inner index
            return f"middle_block.{index}." + _part(m[1], m[3]).partition(".")[2]
        if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            return f"output_blocks.{int(m[1]) * stride + int(m[3])}." + _part(m[2], m[4])
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            return f"output_blocks.{block * stride + stride - 1}.{2 if cross[block] else 1}.conv.{m[2]}"
        raise ValueError(f"no LDM name for UNet weight {key!r}")

    return rename


def _part(kind: str, rest: str) -> str:
    """Inside an LDM block: ``0.<resnet layer>`` or ``1.<attention layer>`` (attention names are unchanged)."""
    if kind == "attentions":
        return "1." + rest
    layer, _, leaf = rest.partition(".")
    return "0." + _RESNET.get(layer, layer) + "." + leaf


def _vae_keys(levels: int) -> Callable[[str], str]:
    def rename(key: str) -> str:
        key = key.replace(".conv_norm_out.", ".norm_out.")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}." + m[3].replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            return f"encoder.down.{m[1]}.downsample.{m[2]}"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}." + m[3].replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}." + m[3].replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
        return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names

    return rename
