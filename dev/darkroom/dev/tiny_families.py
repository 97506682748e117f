"""Tiny models of every family besides SD 1.x, built offline in code with random weights (no hub).

``build_tiny_family("sdxl" | "sdxl-refiner" | "sd3" | "flux" | "sd2-v", seed)`` returns the family's img2img
pipeline, small enough for a 64x64 call in well under a second on 2 CPU cores. Tokenizers are built here
too: CLIP's byte-level BPE as for the SD tiny model, and a T5-style Unigram tokenizer over a small
vocabulary (the ``tokenizers`` library). Like :mod:`.tiny`, heavy libraries are imported inside functions.
"""

from __future__ import annotations

import string
from typing import Any

from .tiny import MAX_TOKENS, TEXT_HIDDEN_SIZE, _build_tokenizer

__all__ = ["FAMILIES", "build_tiny_family"]

#: family name -> what it builds
FAMILIES = ("sd2-v", "sdxl", "sdxl-refiner", "sd3", "flux")
T5_HIDDEN_SIZE = 64
T5_MAX_TOKENS = 64
SDXL_TEXT_2_HIDDEN_SIZE = 48
SD3_CLIP_L_HIDDEN_SIZE = 16
SD3_CLIP_G_HIDDEN_SIZE = 48


def _clip_text(tokenizer: Any, *, projection: bool, hidden: int = TEXT_HIDDEN_SIZE) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_t5_tokenizer() -> Any:
    """A T5-style tokenizer (Unigram, ``</s>`` appended) over letters, digits and common words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["red", "blue", "green", "yellow", "stripes", "cat", "dog", "sky", "sea", "sun", "a", "the", "of",
             "photo", "painting", "oil", "watercolor", "lighthouse"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in words] + [(c, -5.0) for c in string.ascii_letters + string.digits]
    pieces += [("▁", -3.0)] + [(c, -6.0) for c in string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=T5_MAX_TOKENS)


def _t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_HIDDEN_SIZE, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, levels: int, *, flow: bool) -> Any:
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False,
             "use_post_quant_conv": False} if flow else {"scaling_factor": 0.13025}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, sample_size=64, **extra,
    ).eval()


def _sdxl_unet(cross_attention_dim: int, time_ids: int, pooled: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=8 * time_ids + pooled, cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    ).eval()


def _sdxl(refiner: bool) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    tokenizer = _build_tokenizer()
    text_encoder = None if refiner else _clip_text(tokenizer, projection=False)
    # As in SDXL (768 and 1280 wide), the base's two encoders differ in width: single-file loaders tell
    # them apart by it. The refiner conditions on encoder 2 only.
    width_2 = TEXT_HIDDEN_SIZE if refiner else SDXL_TEXT_2_HIDDEN_SIZE
    text_encoder_2 = _clip_text(tokenizer, projection=True, hidden=width_2)
    unet = _sdxl_unet(width_2 if refiner else TEXT_HIDDEN_SIZE + width_2, 5 if refiner else 6, width_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLImg2ImgPipeline(
        vae=_vae(4, 4, flow=False), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=None if refiner else tokenizer, tokenizer_2=_build_tokenizer(), unet=unet, scheduler=scheduler,
        requires_aesthetics_score=refiner, force_zeros_for_empty_prompt=True,
    )


def _sd3() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline

    tokenizer, tokenizer_3 = _build_tokenizer(), build_t5_tokenizer()
    # As in SD3: CLIP-L and CLIP-G differ in width (768 and 1280; single-file loaders tell them apart by it),
    # their widths add up to at most T5's, and CLIP-L's projection is the identity (SD3 files carry none).
    clip_l = _clip_text(tokenizer, projection=True, hidden=SD3_CLIP_L_HIDDEN_SIZE)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(SD3_CLIP_L_HIDDEN_SIZE))
    clip_g = _clip_text(tokenizer, projection=True, hidden=SD3_CLIP_G_HIDDEN_SIZE)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN_SIZE, caption_projection_dim=32,
        pooled_projection_dim=SD3_CLIP_L_HIDDEN_SIZE + SD3_CLIP_G_HIDDEN_SIZE, out_channels=16, pos_embed_max_size=64,
    ).eval()
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, 4, flow=True),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=_build_tokenizer(),
        text_encoder_3=_t5(tokenizer_3), tokenizer_3=tokenizer_3,
    )


def _flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _build_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_HIDDEN_SIZE, pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ).eval()
    return FluxImg2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, 4, flow=True),
        text_encoder=_clip_text(tokenizer, projection=False), tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _sd2_v() -> Any:
    from diffusers import DDIMScheduler

    from .tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                   rescale_betas_zero_snr=False, timestep_spacing="leading")
    return pipe


def build_tiny_family(family: str, seed: int = 0) -> Any:
    """The tiny img2img pipeline of ``family`` (one of :data:`FAMILIES`) with random weights from ``seed``."""
    import torch

    builders = {"sdxl": lambda: _sdxl(False), "sdxl-refiner": lambda: _sdxl(True), "sd3": _sd3, "flux": _flux,
                "sd2-v": _sd2_v}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe
