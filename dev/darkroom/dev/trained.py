"""A tiny img2img model *trained* offline in about a minute, so that the demo visibly works.

The random tiny model (:mod:`.tiny`) turns every input into noise: right for parity tests, useless
for showing what img2img and its strength do. This one has the same architecture and files, but:

- its VAE is *built*, not trained: the 4-level AutoencoderKL's weights are set so that the encoder
  averages each 8x8 patch into the latent's first three channels and the decoder upsamples them
  back smoothly. Every picture then decodes to a soft copy of itself. (Training such a VAE from
  random weights did not converge in the time budget on 2 CPU cores: 300 steps, 78 s, still
  MSE 0.2.) The only non-linear layers on its path are the final GroupNorm + SiLU of encoder and
  decoder; each group holds (v, -v, K) with a large constant K, which makes the group's statistics
  constant, so the norm is affine and the SiLU, shifted far right, is the identity;
- its UNet is trained as a text-conditioned noise predictor on those scenes' latents, captioned
  with the name of their main colour (``"blue"``, ``"red"``, ...), optionally ``"... stripes"``,
  with the caption dropped one time in ten so classifier-free guidance works.

So at strength 0.3 an output keeps the input's composition, and at 0.9 it follows the prompt's
colour. The text encoder and tokenizer stay the tiny model's (random, frozen): the UNet learns
what their embeddings of the caption words mean. Training is deterministic (fixed seeds, one
generator) and its result is cached: :func:`make_demo_model` returns an existing model at once.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tiny import build_tiny_pipeline, is_tiny_model_dir

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["COLOURS", "build_pooling_vae", "is_demo_model_dir", "make_demo_model", "scene_batch"]

#: Caption words and the RGB colours they name (0..1).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.12),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.88, 0.2),
    "green": (0.2, 0.65, 0.25),
    "blue": (0.15, 0.3, 0.85),
    "purple": (0.55, 0.2, 0.7),
    "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.08),
}
SIZE = 64  # training pictures are SIZE x SIZE; the model runs at any multiple of 8
SCENES = 1024
UNET_STEPS = 600
BATCH = 32
LR = 2e-3
SEED = 1234
#: Written into the model folder; a folder with another recipe is trained again.
RECIPE = f"pooling-vae x0-ddim-low-ema unet-steps={UNET_STEPS} batch={BATCH} lr={LR} size={SIZE} scenes={SCENES} seed={SEED} v1"


def scene_batch(n: int, generator: torch.Generator, size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes in [-1, 1] (N, 3, size, size) and their captions: the main colour's name,
    with " stripes" when the background is striped."""
    import torch

    size = size or SIZE
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in names])
    ys = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    xs = torch.linspace(0, 1, size).view(1, size).expand(size, size)
    images, captions = [], []
    for _ in range(n):
        r = torch.rand(12, generator=generator)
        main = int(torch.randint(len(names), (1,), generator=generator))
        other = int(torch.randint(len(names), (1,), generator=generator))
        base = palette[main].view(3, 1, 1) * (0.8 + 0.4 * r[0])
        second = palette[other].view(3, 1, 1)
        image = base.expand(3, size, size).clone()
        kind = int(r[1] * 3)
        striped = kind == 2
        if kind == 1:  # a vertical gradient from the main colour towards another
            t = (ys * (0.3 + 0.5 * r[2])).unsqueeze(0)
            image = image * (1 - t) + second * t
        elif striped:  # stripes of the main colour and another
            period = 6 + int(r[2] * 10)
            band = ((ys if r[3] < 0.5 else xs) * size / period).floor() % 2
            image = torch.where(band.bool().unsqueeze(0), second.expand(3, size, size), image)
        for k in range(int(r[4] * 3)):  # up to two shapes, never the main colour's area
            colour = palette[int(torch.randint(len(names), (1,), generator=generator))].view(3, 1, 1)
            c = torch.rand(4, generator=generator)
            cx, cy, radius = c[0], c[1], 0.08 + 0.14 * c[2]
            if (k + int(r[5] * 2)) % 2 == 0:
                mask = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
            else:
                mask = ((xs - cx).abs() < radius) & ((ys - cy).abs() < radius * (0.5 + c[3]))
            image = torch.where(mask.unsqueeze(0), colour.expand(3, size, size), image)
        images.append(image.clamp(0, 1))
        captions.append(names[main] + (" stripes" if striped else ""))
    return torch.stack(images) * 2 - 1, captions


def is_demo_model_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a complete demo model trained by this recipe."""
    marker = Path(directory) / "TRAINED"
    return is_tiny_model_dir(directory) and marker.is_file() and marker.read_text().strip() == RECIPE


def make_demo_model(directory: Path, *, log: Callable[[str], None] | None = None) -> Path:
    """Train the demo model into ``directory``; a model already there from this recipe is returned at once.

    The model is saved into a sibling temp folder and renamed into place, so ``directory`` never
    holds half a model.
    """
    directory = Path(directory).absolute()
    if is_demo_model_dir(directory):
        return directory
    say = log or (lambda _message: None)
    directory.parent.mkdir(parents=True, exist_ok=True)
    pipe = _train(say)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "TRAINED").write_text(RECIPE + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _train(say: Callable[[str], None]) -> Any:
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    # One thread: small ops on a shared machine stall badly when two torch threads wait on each other,
    # and one thread keeps the result the same whatever the machine's core count.
    torch.set_num_threads(1)
    try:
        return _train_on_one_thread(say, started)
    finally:
        torch.set_num_threads(threads)


def _train_on_one_thread(say: Callable[[str], None], started: float) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        pipe = build_tiny_pipeline(seed=SEED)
        pipe.vae = build_pooling_vae()
        pipe.scheduler = _scheduler()
        generator = torch.Generator().manual_seed(SEED)
        _train_unet(pipe, generator, say)
        say(f"UNet trained ({time.monotonic() - started:.0f} s)")
    pipe.unet.eval()
    return pipe


def _scheduler() -> Any:
    """DDIM with Stable Diffusion 1.5's noise schedule, for a UNet that predicts the clean latents."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="sample")


_K = 1000.0  # the constant channel of each norm group (see the module docstring)
_SHIFT = 10.0  # SiLU(x + 10) == x + 10 within 1e-3 for |x| <= 1


def build_pooling_vae() -> Any:
    """An AutoencoderKL (SD's 4-level layout, 9 channels) whose encoder averages 8x8 patches into
    latent channels 0-2 and whose decoder upsamples them back, smoothing at each level."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(9, 9, 9, 9),
                        layers_per_block=1, latent_channels=4, norm_num_groups=3, sample_size=256,
                        scaling_factor=1.0)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            # Every resnet's conv2 and attention's to_out are zero now: each block is the identity (its
            # norms sit on a zeroed branch and only need a sane scale).
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        _signed_copy(vae.encoder.conv_in, sources=3)
        for block in vae.encoder.down_blocks:
            if block.downsamplers:
                _per_group(block.downsamplers[0].conv, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0],
                                                                      [0.0, 0.0, 0.0]]) / 4)
        _affine_norm(vae.encoder.conv_norm_out)
        for c in range(3):  # mean of latent channel c <- colour c; logvar far negative (a point mass)
            vae.encoder.conv_out.weight[c, 3 * c, 1, 1] = 1.0
            vae.encoder.conv_out.bias[c] = -_SHIFT
        vae.encoder.conv_out.bias[4:] = -30.0
        vae.quant_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        vae.post_quant_conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        _signed_copy(vae.decoder.conv_in, sources=3)
        smooth = torch.tensor([1.0, 2.0, 1.0])
        for block in vae.decoder.up_blocks:
            if block.upsamplers:
                _per_group(block.upsamplers[0].conv, torch.outer(smooth, smooth) / 16)
        _affine_norm(vae.decoder.conv_norm_out)
        for c in range(3):
            vae.decoder.conv_out.weight[c, 3 * c, 1, 1] = 1.0
            vae.decoder.conv_out.bias[c] = -_SHIFT
    return vae.eval()


def _signed_copy(conv: Any, sources: int) -> None:
    """Channel 3c <- input c, 3c+1 <- -input c, 3c+2 <- the constant K (centre taps, bias)."""
    for c in range(sources):
        conv.weight[3 * c, c, 1, 1] = 1.0
        conv.weight[3 * c + 1, c, 1, 1] = -1.0
        conv.bias[3 * c + 2] = _K


def _per_group(conv: Any, kernel: torch.Tensor) -> None:
    """Apply ``kernel`` to every v and -v channel on its own; keep each constant channel at K."""
    for c in range(3):
        conv.weight[3 * c, 3 * c] = kernel
        conv.weight[3 * c + 1, 3 * c + 1] = kernel
        conv.bias[3 * c + 2] = _K


def _affine_norm(norm: Any) -> None:
    """GroupNorm over (v, -v, K): mean K/3, std sqrt(2/9) K up to (v/K)^2; undo both, then shift right."""
    std = math.sqrt(2.0 / 9.0) * _K
    norm.weight.fill_(std)
    norm.bias.fill_(_K / 3 + _SHIFT)


def _train_unet(pipe: Any, generator: torch.Generator, say: Callable[[str], None]) -> None:
    import torch

    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler
    captions = sorted({*COLOURS, *(f"{c} stripes" for c in COLOURS), ""})
    with torch.no_grad():
        tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        embeddings = dict(zip(captions, pipe.text_encoder(tokens.input_ids)[0], strict=True))
        images, names = scene_batch(SCENES, generator)
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])  # type: ignore[no-untyped-call]
        vae.register_to_config(scaling_factor=round(1.0 / float(latents[:, :3].std()), 4))  # SD's recipe
        latents = latents * vae.config.scaling_factor
    say(f"  {SCENES} scenes encoded")
    alphas = scheduler.alphas_cumprod
    unet.train()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0)
    # An exponential moving average of the weights is what gets saved: far smoother samples from a
    # short run, at no extra training cost
    average = [p.detach().clone() for p in unet.parameters()]
    batch = BATCH
    for step in range(UNET_STEPS):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index]
        keep = torch.rand(batch, generator=generator) > 0.1
        context = torch.stack([embeddings[names[i] if k else ""] for i, k in zip(index.tolist(), keep.tolist(),
                                                                                    strict=True)])
        # half the batch at any noise level, half at low ones, where the output must stay the input
        steps = scheduler.config.num_train_timesteps
        t = torch.randint(steps, (batch,), generator=generator)
        t[: batch // 2] = torch.randint(steps * 2 // 5, (batch // 2,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # x0-prediction: the easiest target for a tiny net (the caption's colour at high noise, about
        # the input itself at low noise); the scheduler is told so (prediction_type="sample")
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, x0)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        decay = min(0.99, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, current in zip(average, unet.parameters(), strict=True):
                kept.mul_(decay).add_(current.detach(), alpha=1 - decay)
        for group in optimiser.param_groups:
            group["lr"] = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / UNET_STEPS)))
        if step % 100 == 0:
            say(f"  UNet step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        for kept, current in zip(average, unet.parameters(), strict=True):
            current.copy_(kept)
    unet.eval()
