"""A tiny Stable-Diffusion-architecture img2img pipeline with RANDOM weights.

The model built here has the same architecture as Stable Diffusion 1.x (a
cross-attention UNet2DConditionModel, a 4-level AutoencoderKL with an 8x
downscale, a CLIP text encoder with a CLIP BPE tokenizer and SD 1.5's PNDM
scheduler), only very small: about 7 MB on disk, a fraction of a second per
64x64 img2img call on a CPU.

The weights are random (drawn from ``torch.manual_seed(seed)``), so the images
it makes are meaningless noise. It exists for tests and demos only: exercising
the job system end to end offline, with no download from the Hugging Face hub.
Never serve it as a real model.

Building is deterministic: the same seed gives byte-identical safetensors files.

Heavy libraries (torch, diffusers, transformers) are imported inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["build_tiny_pipeline", "make_tiny_model", "make_tiny_single_file", "make_tiny_ip_adapter", "is_tiny_model_dir",
           "VAE_SCALE_FACTOR"]

#: Sizes shared by the text encoder and the UNet's cross-attention.
TEXT_HIDDEN_SIZE = 32
MAX_TOKENS = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Pixels per latent cell along each side (2 ** (VAE levels - 1)), as in real SD.
VAE_SCALE_FACTOR = 8

#: Files that must exist for a saved directory to count as a complete model.
_REQUIRED_FILES: tuple[str, ...] = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols GPT-2/CLIP byte-level BPE uses for bytes 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codepoints:
            codepoints[b] = 256 + extra
            extra += 1
    return [chr(codepoints[b]) for b in range(256)]


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's vocab with no merges: byte symbols, the same with ``</w>``, then specials.

    Every byte has a token both inside and at the end of a word, so any text
    tokenizes without unknown tokens (one token per UTF-8 byte).
    """
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _build_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=_byte_level_vocab(),
        merges=[],
        model_max_length=MAX_TOKENS,
    )


def _build_text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config).eval()


def _build_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    # SD 1.x building blocks, two levels instead of four. Cross-attention sits
    # on the low-resolution level (diffusers' own tiny test layout): at 256x256
    # input it costs ~50 ms per UNet call against ~180 ms on the 32x32 level.
    # One layer per block (SD has 2) keeps a 20-step 64x64 call near 0.3 s on
    # 2 CPU threads (2 layers: ~0.45 s).
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    levels = 4  # 2 ** (levels - 1) == VAE_SCALE_FACTOR
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    ).eval()


def _build_scheduler() -> PNDMScheduler:
    from diffusers import PNDMScheduler

    # Stable Diffusion 1.5's scheduler config.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """Build the tiny img2img pipeline in memory, with random weights from ``seed``.

    Deterministic: the same seed gives identical weights. The caller's global
    torch RNG state is left as it was.
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Fixed construction order: each module draws from the same RNG stream.
        unet = _build_unet()
        vae = _build_vae()
        text_encoder = _build_text_encoder(
            vocab_size=len(tokenizer),
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
        )
    return StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def is_tiny_model_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a complete saved pipeline (every component's files)."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _may_replace(directory: Path) -> bool:
    """Whether ``overwrite`` may delete ``directory``: an empty dir or a (partial) pipeline.

    Anything else (a file, an unrelated folder) is never deleted.
    """
    if not directory.is_dir() or directory.is_symlink():
        return False
    return (directory / "model_index.json").is_file() or not any(directory.iterdir())


def _save_to_temp(parent: Path, name: str, seed: int) -> Path:
    """Build and save the pipeline into a fresh temp dir next to the target."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        build_tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace an existing ``directory`` with ``tmp``: two renames, then delete the old one."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    old = trash / "model"
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)  # put the previous model back
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def make_tiny_model(directory: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Save the tiny pipeline (safetensors) into ``directory`` and return ``directory``.

    The model is built in a sibling temp dir and renamed into place, so
    ``directory`` never holds a half-written model. If ``directory`` already
    holds a complete model and ``overwrite`` is false, it is returned untouched
    (whatever seed it was built with). If it exists but is not a model,
    ``FileExistsError`` is raised. With ``overwrite``, an existing model (or an
    empty directory) is replaced; other contents are never deleted.
    """
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            if is_tiny_model_dir(directory):
                return directory
            raise FileExistsError(f"{directory} exists and is not a saved pipeline")
        if not _may_replace(directory):
            raise FileExistsError(f"{directory} exists and is not a saved pipeline; not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _save_to_temp(directory.parent, directory.name, seed)
    try:
        if directory.exists():
            _swap_in(tmp, directory)
        else:
            os.rename(tmp, directory)
    except OSError:
        # Lost a race with another writer: keep theirs if it is a complete model.
        shutil.rmtree(tmp, ignore_errors=True)
        if not overwrite and is_tiny_model_dir(directory):
            return directory
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def make_tiny_single_file(path: Path, model_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Write the tiny model as one checkpoint file in the original LDM (CompVis) key layout, like SD 1.x
    single-file models: ``.safetensors``, or for ``.ckpt``/``.pt`` a torch pickle of ``{"state_dict": ...}``.

    The weights are ``model_dir``'s when given (so the file loads to exactly that folder's model), else
    built from ``seed``. Load it with ``config`` = a diffusers folder of the tiny model (see
    :func:`darkroom.worker.checkpoints.copy_config_folder`).
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    from darkroom.worker.checkpoints import ldm_state_dict

    if model_dir is not None:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                              requires_safety_checker=False)
    else:
        pipe = build_tiny_pipeline(seed)
    state = ldm_state_dict(pipe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, path)
    return path


def make_tiny_lora(
    model_dir: Path,
    path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    unet: bool = True,
    text_encoder: bool = False,
    scale: float = 1.0,
    dora: bool = False,
) -> Path:
    """Write a LoRA with random weights for the tiny model (UNet and/or text encoder) as ``path`` (.safetensors).

    Random A *and* B (peft's ``init_lora_weights=False``), so it visibly changes outputs. ``dora``: a
    weight-decomposed LoRA (DoRA, with magnitude vectors).
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    if not (unet or text_encoder):
        raise ValueError("a LoRA needs the UNet, the text encoder or both")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                          requires_safety_checker=False)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    layers: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, wanted in (("unet", unet), ("text_encoder", text_encoder)):
            if not wanted:
                continue
            module = getattr(pipe, component)
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets[component],
                                use_dora=dora)
            inject_adapter_in_model(config, module)
            state = {k: v * scale for k, v in get_peft_model_state_dict(module).items()}
            layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionImg2ImgPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True, **layers
    )
    return path


#: File and folder names :func:`make_tiny_ip_adapter` writes (the layout of h94/IP-Adapter's ``models/``).
IP_ADAPTER_WEIGHTS = "ip-adapter_tiny.safetensors"
IP_ADAPTER_ENCODER = "image_encoder"
#: Side of the square images the tiny CLIP vision encoder takes (real ones: 224).
IP_ADAPTER_IMAGE_SIZE = 32


def _build_image_encoder(projection_dim: int) -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IP_ADAPTER_IMAGE_SIZE,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def _ip_adapter_state(unet: Any, image_embed_dim: int, tokens: int = 4) -> dict[str, Any]:
    """Random IP-Adapter weights for ``unet`` in the original key layout (``image_proj.*``, ``ip_adapter.N.*``).

    The image projection maps one CLIP image embedding to ``tokens`` extra cross-attention tokens. Each
    cross-attention layer (``attn2``, in ``unet.attn_processors`` order) gets a key and a value
    projection for them; the original numbering counts every attention layer, self-attention at even
    and cross-attention at odd indices, so the k-th cross-attention layer is ``2k + 1``.
    """
    import torch

    cross = int(unet.config.cross_attention_dim)
    projection = torch.nn.Linear(image_embed_dim, cross * tokens)
    norm = torch.nn.LayerNorm(cross)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    state = {"image_proj.proj.weight": projection.weight, "image_proj.proj.bias": projection.bias,
             "image_proj.norm.weight": norm.weight, "image_proj.norm.bias": norm.bias}
    cross_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    modules = dict(unet.named_modules())
    for index, name in enumerate(cross_layers):
        attention = modules[name.removesuffix(".processor")]
        for part in ("to_k_ip", "to_v_ip"):
            layer = torch.nn.Linear(cross, attention.to_k.out_features, bias=False)
            state[f"ip_adapter.{2 * index + 1}.{part}.weight"] = layer.weight
    return {key: value.detach().contiguous() for key, value in state.items()}


def make_tiny_ip_adapter(folder: Path, model_dir: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write a random-weight IP-Adapter for the tiny model into ``folder``; return (weights file, encoder folder).

    ``folder/ip-adapter_tiny.safetensors`` holds the adapter (image projection + per-layer key/value
    projections, the layout diffusers' ``load_ip_adapter`` reads) and ``folder/image_encoder/`` a tiny
    ``CLIPVisionModelWithProjection`` (safetensors) with its ``CLIPImageProcessor`` config. Offline and
    deterministic: the same seed gives byte-identical files. Noise, like the tiny model itself.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
    folder = Path(folder)
    encoder_dir = folder / IP_ADAPTER_ENCODER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _build_image_encoder(projection_dim=TEXT_HIDDEN_SIZE)
        state = _ip_adapter_state(unet, image_embed_dim=TEXT_HIDDEN_SIZE)
    encoder.save_pretrained(str(encoder_dir), safe_serialization=True)
    CLIPImageProcessor(size=IP_ADAPTER_IMAGE_SIZE, crop_size=IP_ADAPTER_IMAGE_SIZE).save_pretrained(str(encoder_dir))
    weights = folder / IP_ADAPTER_WEIGHTS
    save_file(state, str(weights), metadata={"format": "pt"})
    return weights, encoder_dir
