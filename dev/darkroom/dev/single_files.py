"""Write a diffusers model folder as one checkpoint file in its family's original key layout (for tests).

Single-file checkpoints as people download them: SD 1.x/2.x and SDXL in the LDM/SGM layout
(``model.diffusion_model.*``, ``first_stage_model.*``; SDXL's CLIP-L under ``conditioner.embedders.0.transformer.*``
and its OpenCLIP-G under ``conditioner.embedders.{0,1}.model.*``), SD3 in Stability's layout (MMDiT
``joint_blocks.*`` under ``model.diffusion_model.*``, ``first_stage_model.*`` and ``text_encoders.{clip_l,clip_g,
t5xxl}.transformer.*``). These are the inverses of diffusers' single-file converters; a file written here loads
back through ``from_single_file`` to exactly the folder's weights. Flux has no writer: the worker refuses
single-file Flux checkpoints (see :mod:`darkroom.worker.families.flux`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["original_state_dict", "make_single_file"]


def make_single_file(path: Path, model_dir: Path) -> Path:
    """Write ``model_dir`` (a diffusers folder of the sd, sdxl or sd3 family) to ``path`` (``.safetensors``) in
    its family's original layout. Load it with ``config`` = a copy of the folder's configs (no weights needed)."""
    import diffusers
    from safetensors.torch import save_file

    from darkroom.common.families import family_of_class, img2img_class

    family = family_of_class(json.loads((Path(model_dir) / "model_index.json").read_text())["_class_name"])
    if family is None:
        raise ValueError(f"{model_dir}: not a model of a known family")
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.value == "sd" else {}
    pipe = getattr(diffusers, img2img_class(family)).from_pretrained(str(model_dir), **extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_state_dict(pipe), str(path), metadata={"format": "pt"})
    return path


def original_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's weights under its family's original single-file key names."""
    from darkroom.worker.checkpoints import ldm_state_dict

    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        out = _unet_and_vae(pipe)
        if pipe.text_encoder is not None:  # the base: CLIP-L, then OpenCLIP-G; the refiner has OpenCLIP-G only
            out.update(_prefixed(_clip(pipe.text_encoder), "conditioner.embedders.0.transformer."))
            out.update(_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
        else:
            out.update(_open_clip(pipe.text_encoder_2, "conditioner.embedders.0.model."))
    elif name.startswith("StableDiffusion3"):
        out = _prefixed(_mmdit(pipe.transformer), "model.diffusion_model.")
        out.update(_prefixed(_vae(pipe), "first_stage_model."))
        out.update(_prefixed(_clip(pipe.text_encoder), "text_encoders.clip_l.transformer."))
        out.update(_prefixed(_clip(pipe.text_encoder_2), "text_encoders.clip_g.transformer."))
        out.update(_prefixed(dict(pipe.text_encoder_3.state_dict()), "text_encoders.t5xxl.transformer."))
    elif name.startswith("StableDiffusion"):
        out = ldm_state_dict(pipe)
    else:
        raise ValueError(f"no original single-file layout is written for {name}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}  # copies: tied weights share memory


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in state.items()}


def _unet_and_vae(pipe: Any) -> dict[str, Any]:
    from darkroom.worker.checkpoints import ldm_unet_state_dict

    out = _prefixed(ldm_unet_state_dict(pipe.unet), "model.diffusion_model.")
    out.update(_prefixed(_vae(pipe), "first_stage_model."))
    return out


def _vae(pipe: Any) -> dict[str, Any]:
    from darkroom.worker.checkpoints import ldm_vae_state_dict

    return ldm_vae_state_dict(pipe.vae)


def _clip(model: Any) -> dict[str, Any]:
    """A transformers CLIP text model's weights, ``text_model.``-prefixed as before transformers 5.6 flattened it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


_OPEN_CLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _open_clip(model: Any, prefix: str) -> dict[str, Any]:
    """A CLIP text model with projection in OpenCLIP's layout (fused ``in_proj``, transposed ``text_projection``)."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in _clip(model).items():
        if key in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)$", key):
            rest = m[2]
            for old, new in _OPEN_CLIP_LAYER:
                rest = rest.replace(old, new)
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
    for (layer, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _swap_halves(tensor: Any) -> Any:
    """diffusers' AdaLayerNormContinuous splits (scale, shift); the original splits (shift, scale)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_MMDIT_FIXED = {
    "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
}
_MMDIT_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_MMDIT_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def _mmdit(transformer: Any) -> dict[str, Any]:
    """SD3's transformer in Stability's MMDiT layout (fused qkv; the last block's context norm and the final norm
    with shift and scale swapped)."""
    import torch

    last = transformer.config.num_layers - 1
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, tensor in transformer.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if key.startswith("norm_out.linear."):
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(tensor)
        elif module in _MMDIT_FIXED or key in _MMDIT_FIXED:
            out[_MMDIT_FIXED[key] if key in _MMDIT_FIXED else f"{_MMDIT_FIXED[module]}.{leaf}"] = tensor
        elif m := re.match(r"transformer_blocks\.(\d+)\.(.*)$", module):
            block, part = int(m[1]), m[2]
            if q := re.match(r"(attn2?\.(?:to|add))_([qkv])(?:_proj)?$", part):
                qkv.setdefault(f"joint_blocks.{block}.{_MMDIT_QKV[q[1] + '_']}.{leaf}", {})[q[2]] = tensor
                continue
            if part == "norm1_context.linear" and block == last:
                tensor = _swap_halves(tensor)
            out[f"joint_blocks.{block}.{_MMDIT_BLOCK[part]}.{leaf}"] = tensor
        else:
            raise ValueError(f"no MMDiT name for transformer weight {key!r}")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts[c] for c in "qkv"])
    return out
