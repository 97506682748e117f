"""Trained VAE vs the demo model's hand-built one: is training worth it for the demo?

    .venv/bin/python bench/demo_vae.py [--steps 600] [--lr 5e-3] [--no-recolour]

Trains a small VAE from random weights on the demo's synthetic scenes, on one CPU thread, with the
recipe below, and compares its reconstructions with the hand-built pooling VAE that the demo model
ships (:func:`darkroom.dev.trained.build_pooling_vae`): mean absolute error on 64 held-out scenes
(in [-1, 1]) and on the demo's own picture (128 px, in 0..255), and the CPU time it took. With
``--save DIR`` it writes the trained VAE and a strip (picture, hand-built, trained) to DIR.

Recipe: SD's 4-level AutoencoderKL layout (8x downscale, 4 latent channels) cut down to 16 channels
per level, one resnet per decoder level, no attention; random 48 px crops, batch 8, AdamW with a cosine
schedule; loss = reconstruction MSE of a *sampled* latent + 1e-6 KL + an anchor pulling latent
channels 0-2 towards each 8x8 patch's mean colour (without it nothing converged in budget); the
log-variance starts at -8 so sampled latents are not drowned in noise. ``--recolour`` (default on)
shuffles and rescales colour channels, since the scenes use only eight named colours.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - quiets libraries before they load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--no-recolour", dest="recolour", action="store_false")
    parser.add_argument("--save", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from darkroom.dev.demo import sample_image
    from darkroom.dev.trained import SCENES, SEED, build_pooling_vae, scene_batch

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    images, _ = scene_batch(SCENES, generator)
    started = time.process_time()
    trained = train_vae(images, generator, args)
    cpu = time.process_time() - started
    held_out, _ = scene_batch(64, torch.Generator().manual_seed(99))
    picture = sample_image(128)
    x = torch.tensor(np.asarray(picture), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    rows, strip = [], [x]
    for name, vae in (("hand-built (pooling)", build_pooling_vae()), (f"trained ({args.steps} steps)", trained)):
        with torch.no_grad():
            scenes = vae.decode(vae.encode(held_out).latent_dist.mean).sample
            decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        strip.append(decoded)
        rows.append((name, float((scenes - held_out).abs().mean()), float((decoded - x).abs().mean() * 127.5)))
    print(f"VAE training: {args.steps} steps, {cpu:.1f} s CPU (one thread)")
    print(f"{'VAE':24} {'scenes MAE [-1,1]':>18} {'demo picture MAE [0,255]':>25}")
    for name, scenes_mae, picture_mae in rows:
        print(f"{name:24} {scenes_mae:18.3f} {picture_mae:25.1f}")
    if args.save:
        from PIL import Image

        args.save.mkdir(parents=True, exist_ok=True)
        trained.save_pretrained(args.save / "vae")
        tiles = [((t[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy() for t in strip]
        Image.fromarray(np.concatenate(tiles, axis=1)).save(args.save / "reconstructions.png")
    return 0


def train_vae(images: Any, generator: Any, args: argparse.Namespace) -> Any:
    import torch
    from diffusers import AutoencoderKL

    from darkroom.dev.trained import SIZE

    mse = torch.nn.functional.mse_loss
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                        layers_per_block=0, latent_channels=4, norm_num_groups=4, sample_size=SIZE,
                        scaling_factor=1.0, mid_block_add_attention=False)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -8.0
    optimiser = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch,), generator=generator)
        left, top = torch.randint(SIZE - args.crop + 1, (2,), generator=generator).tolist()
        x = images[index][:, :, top:top + args.crop, left:left + args.crop]
        if args.recolour:
            x = recolour(x, generator)
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = mse(decoded, x)
        loss = (reconstruction + 1e-6 * posterior.kl().mean()
                + mse(posterior.mean[:, :3], torch.nn.functional.avg_pool2d(x, 8)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for group in optimiser.param_groups:
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        if step % 200 == 0:
            print(f"  step {step}: reconstruction MSE {reconstruction.item():.4f}", file=sys.stderr)
    return vae.eval()


def recolour(x: Any, generator: Any) -> Any:
    """The same scenes in other colours: channels shuffled, each with its own gain and offset."""
    import torch

    n = x.shape[0]
    order = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    x = torch.gather(x, 1, order.view(n, 3, 1, 1).expand_as(x))
    gain = 0.5 + 0.7 * torch.rand(n, 3, 1, 1, generator=generator)
    offset = 0.8 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    return (x * gain + offset).clamp(-1, 1)


if __name__ == "__main__":
    sys.exit(main())
