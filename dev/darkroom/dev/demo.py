"""``make demo``: the main job end to end on embedded services and a tiny trained model.

Starts what is missing (Redis + S3 server, the demo model of :mod:`.trained`, trained
once and cached, a worker), submits
one job per strength on a picture drawn in code, waits, prints the output URIs
and writes a contact sheet (input beside the outputs, labelled by strength) to
the output bucket and to a local file. Stops what it started.

With ``families`` (the default) the same worker also serves a tiny SDXL model (random weights, built
offline once and cached beside the demo model) and one SDXL job with an SDXL-only field runs too: its
output joins the contact sheet. It shows the family path works end to end, not image quality.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from darkroom.common.errors import DarkroomError
from darkroom.common.settings import Settings
from darkroom.producer.client import Client

from .embedded import EmbeddedServices
from .process import WorkerProcess

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["run_demo", "sample_image", "contact_sheet"]

MODEL_ID = "tiny"
#: The second family's model: a tiny SDXL base with random weights (``darkroom models make-tiny --family sdxl``).
SDXL_MODEL_ID = "tiny-sdxl"
SDXL_STRENGTH = 0.6
#: The demo model knows colour words ("red", "blue stripes", ...); a real model gets a real prompt.
DEMO_MODEL_PROMPT = "red"
REAL_MODEL_PROMPT = "a watercolor painting of a lighthouse at dusk"
#: The demo model is tiny: strong guidance over-saturates it (real models take the usual 7.5).
DEMO_MODEL_GUIDANCE = 3.0
#: It was trained on 64x64 pictures and works best near that size; real models get 256x256.
DEMO_MODEL_SIZE = 128


def run_demo(*, state_dir: Path | None, model_dir: Path | None, strengths: list[float], prompt: str | None,
             families: bool = True) -> int:
    settings = Settings.load(**({"state_dir": state_dir} if state_dir else {}))
    state = settings.state_dir
    embedded = EmbeddedServices(state)
    started_services = embedded.endpoints() is None or not _running(embedded)
    step = _Steps()
    step("starting embedded Redis and S3 server" if started_services else "using running embedded services")
    endpoints = embedded.up()
    settings = Settings.load(state_dir=state, **_connection(endpoints.as_env()))
    worker: WorkerProcess | None = None
    try:
        model_path = model_dir or _demo_model(state / "models" / "demo", step)
        models = {MODEL_ID: model_path}
        if families:
            models[SDXL_MODEL_ID] = _sdxl_model(state / "models" / "demo-sdxl", step)
        step(f"starting a worker for {' and '.join(f'model {m!r} ({p})' for m, p in models.items())}")
        worker = WorkerProcess(
            f"demo-{uuid.uuid4().hex[:6]}", [arg for m, p in models.items() for arg in ("--model", f"{m}={p}")],
            env={**endpoints.as_env(), "DARKROOM_STATE_DIR": str(state)},
            redis_url=endpoints.redis_url, log_path=state / "logs" / "demo-worker.log",
        ).start()
        with Client(settings) as client:
            guidance = 7.5 if model_dir else DEMO_MODEL_GUIDANCE
            text = prompt or (REAL_MODEL_PROMPT if model_dir else DEMO_MODEL_PROMPT)
            source = sample_image(256 if model_dir else DEMO_MODEL_SIZE)
            return _run_jobs(client, settings, strengths, text, guidance, source, state, step, families=families)
    except DarkroomError as exc:
        click.echo(f"demo failed: {exc}", err=True)
        return 1
    finally:
        if worker is not None:
            step("stopping the worker")
            worker.stop()
        if started_services:
            step("stopping the embedded services")
            embedded.down()


def _run_jobs(client: Client, settings: Settings, strengths: list[float], prompt: str, guidance: float,
              source: Image, state: Path, step: _Steps, *, families: bool = False) -> int:
    run_id = time.strftime("%Y%m%d-%H%M%S")
    input_uri = client.upload(source, f"s3://darkroom/inputs/demo-{run_id}.png")
    step(f"uploaded a sample picture drawn in code to {input_uri}")
    prefix = f"{settings.default_output_prefix.rstrip('/')}/demo-{run_id}"
    handles = [
        client.submit({"model": MODEL_ID, "image": input_uri, "prompt": prompt, "strength": s,
                       "num_inference_steps": 20, "guidance_scale": guidance, "seed": 1234, "output_prefix": prefix})
        for s in strengths
    ]
    sdxl = client.submit({"model": SDXL_MODEL_ID, "image": input_uri, "prompt": prompt, "prompt_2": "blue stripes",
                          "strength": SDXL_STRENGTH, "num_inference_steps": 10, "guidance_scale": 5.0, "seed": 1234,
                          "output_prefix": prefix}) if families else None
    count = len(handles) + (sdxl is not None)
    step(f"submitted {count} jobs (strengths {', '.join(map(str, strengths))}"
         + (f"; one SDXL job, strength {SDXL_STRENGTH}, prompt_2 'blue stripes'" if sdxl else "") + "); waiting")
    outputs = []
    for strength, handle in zip(strengths, handles, strict=True):
        result = handle.wait(timeout=300)
        outputs.append((strength, client.open_images(result)[0]))
        click.echo(f"  strength {strength:.2f}: {result.uris[0]}  "
                   f"({result.timings.inference:.2f} s inference, seed {result.seeds[0]})")
    extra = []
    if sdxl is not None:
        result = sdxl.wait(timeout=300)
        family = client.fleet.catalog().get(SDXL_MODEL_ID)
        extra.append(("sdxl (untrained)", client.open_images(result)[0]))
        click.echo(f"  {SDXL_MODEL_ID} (family {family}, strength {SDXL_STRENGTH:.2f}): {result.uris[0]}  "
                   f"({result.timings.inference:.2f} s inference, {result.timings.total:.2f} s on the worker, "
                   f"seed {result.seeds[0]})")
    sheet = contact_sheet(source, outputs, prompt, extra)
    local = state / "demo" / f"contact-sheet-{run_id}.png"
    local.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(local)
    sheet_uri = client.upload(local, f"{prefix}/contact-sheet.png")
    click.echo(f"contact sheet: {sheet_uri}")
    click.echo(f"contact sheet (local): {local.resolve()}")
    click.echo(
        "note: the demo model is tiny and trained only on flat colours, shapes and stripes: low strength keeps\n"
        "      the picture, high strength repaints it in the prompt's colour. For real pictures run:\n"
        "      darkroom demo --model-dir /path/to/stable-diffusion-v1-5 (a diffusers folder)."
    )
    if families:
        click.echo(
            f"note: {SDXL_MODEL_ID} is a tiny SDXL model with random weights (never trained): its picture is noise.\n"
            "      It shows a second family (SDXL's own pipeline and fields) served by the same worker, not\n"
            "      image quality. Run the demo without it: darkroom demo --no-families."
        )
    return 0


def sample_image(size: int = 256) -> Image:
    """A small landscape drawn in code: sky gradient, sun, sea, a lighthouse."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    image = PILImage.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    horizon = int(size * 0.62)
    for y in range(horizon):
        t = y / horizon
        draw.line([(0, y), (size, y)], fill=(int(40 + 200 * t), int(60 + 120 * t), int(160 - 40 * t)))
    for y in range(horizon, size):
        t = (y - horizon) / (size - horizon)
        draw.line([(0, y), (size, y)], fill=(int(20 + 20 * t), int(70 + 40 * t), int(120 + 40 * t)))
    r = size // 10
    draw.ellipse([size * 0.7 - r, horizon * 0.55 - r, size * 0.7 + r, horizon * 0.55 + r], fill=(255, 200, 90))
    base, top, width = horizon + 6, int(size * 0.25), size // 14
    draw.polygon([(size * 0.3 - width, base), (size * 0.3 + width, base), (size * 0.3 + width * 0.6, top),
                  (size * 0.3 - width * 0.6, top)], fill=(235, 235, 230))
    for k in range(3):
        y = top + (base - top) * (k * 2 + 1) // 7
        draw.rectangle([size * 0.3 - width, y, size * 0.3 + width, y + (base - top) // 10], fill=(200, 40, 40))
    draw.rectangle([size * 0.3 - width * 0.7, top - width, size * 0.3 + width * 0.7, top], fill=(255, 240, 150))
    return image


def contact_sheet(source: Image, outputs: list[tuple[float, Image]], prompt: str,
                  extra: list[tuple[str, Image]] | None = None) -> Image:
    """The input beside each output, labelled ('input', 'strength 0.30', ...), then ``extra`` (label, image)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    tiles = [("input", source)] + [(f"strength {s:.2f}", im) for s, im in outputs] + list(extra or [])
    scale = max(1, 256 // max(source.size))  # small pictures are shown at least 256 px wide
    w, h = source.width * scale, source.height * scale
    pad, label_h, title_h = 8, 22, 26
    sheet = PILImage.new("RGB", (pad + len(tiles) * (w + pad), title_h + h + label_h + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    draw.text((pad, 6), f"darkroom img2img: {prompt}"[:120], fill=(230, 230, 230), font=font)
    for i, (label, tile) in enumerate(tiles):
        x = pad + i * (w + pad)
        sheet.paste(tile.convert("RGB").resize((w, h)), (x, title_h))
        draw.text((x, title_h + h + 4), label, fill=(230, 230, 230), font=font)
    return sheet


def _demo_model(path: Path, step: _Steps) -> Path:
    from .trained import is_demo_model_dir, make_demo_model

    if is_demo_model_dir(path):
        step(f"using the trained demo model {path}")
    else:
        step(f"training the tiny demo model into {path} (once; it is cached there)")
    return make_demo_model(path, log=lambda message: click.echo(f"    {message}"))


def _sdxl_model(path: Path, step: _Steps) -> Path:
    from .tiny import is_tiny_model_dir, make_tiny_model

    if is_tiny_model_dir(path):
        step(f"using the tiny SDXL model {path}")
    else:
        step(f"building a tiny SDXL model (random weights) into {path} (once; it is cached there)")
    return make_tiny_model(path, family="sdxl")


def _running(embedded: EmbeddedServices) -> bool:
    status = embedded.status()
    return all(bool(part.get("running")) for part in status.values() if isinstance(part, dict))


def _connection(env: dict[str, str]) -> dict[str, str]:
    prefix = "DARKROOM_"
    return {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}


class _Steps:
    """Numbered, timed progress lines."""

    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        click.echo(f"[{self.n}] {text}  (+{time.monotonic() - self.t0:.1f}s)")
