"""Models for the benchmarks: the tiny test model, or the real SD 1.5 architecture with random weights.

The full-size model has Stable Diffusion 1.5's shapes (UNet 860 M parameters, the 4-level VAE, a
12-layer 768-wide CLIP text encoder) and random weights, so it costs what SD 1.5 costs without a
download. Its tokenizer is the tiny model's byte-level one (no hub files needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
}


def make_full_size_model(path: Path, *, dtype: str = "float16", device: str = "cpu", seed: int = 0) -> Path:
    """Write an SD-1.5-architecture img2img model with random weights to ``path`` (once)."""
    if (path / "model_index.json").exists():
        return path
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from darkroom.dev.tiny import _build_tokenizer

    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        ))
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def make_model(path: Path, *, full_size: bool, device: str, family: str = "sd") -> Path:
    if full_size:
        if family != "sd":
            raise SystemExit(f"--full-size builds SD 1.5's architecture only, not {family}")
        return make_full_size_model(path, device=device)
    from darkroom.dev.tiny import make_tiny_model

    return make_tiny_model(path, family=family)


LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}


def make_random_loras(model_dir: Path, folder: Path, count: int, *, rank: int = 4, text_encoder_every: int = 3,
                      seed: int = 100) -> list[Path]:
    """Write ``count`` LoRAs with random weights for the model in ``model_dir`` (any size: the tiny one or SD 1.5
    shapes) as ``folder/lora{i}.safetensors``; every ``text_encoder_every``-th also adapts the text encoder.

    The UNet and text encoder are loaded once (CPU) to learn the LoRA layers' shapes; each file then gets its
    own random A and B (small, so fp16 stays finite), which is all a benchmark needs.
    """
    import math

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        module = cls.from_pretrained(str(model_dir / component))
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS[component]), module)
        shapes[component] = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(module).items()}
        del module
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(count):
        layers = {}
        for component in ("unet", "text_encoder") if index % text_encoder_every == 0 else ("unet",):
            state = {key: torch.randn(shape, generator=generator) / math.sqrt(shape[1]) * (0.3 if "lora_B" in key else 1)
                     for key, shape in shapes[component].items()}
            layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
        StableDiffusionImg2ImgPipeline.save_lora_weights(str(folder), weight_name=f"lora{index}.safetensors",
                                                         safe_serialization=True, **layers)
        paths.append(folder / f"lora{index}.safetensors")
    return paths
