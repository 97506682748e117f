"""Helpers shared by unit and integration tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def png_bytes(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


def wait_until(probe: Callable[[], T], timeout: float = 60.0, what: str = "the condition", *,
               every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy, and return that; fail naming ``what`` after ``timeout``.

    Tests wait on an observable event this way (a record, a history entry, a Redis key, a log line, a metric),
    never on a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)
    return value


def conv_lora(model_dir: Path, path: Path) -> Path:
    """A LoRA on the tiny UNet's ResNet convolutions (and its attention), rank 2, alpha 4, random weights."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                          requires_safety_checker=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["conv1", "conv2", "to_q"])
        inject_adapter_in_model(config, pipe.unet)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionImg2ImgPipeline.save_lora_weights(str(path.parent), weight_name=path.name,
                                                     safe_serialization=True, unet_lora_layers=layers)
    return path


def peft_reference(model_dir: Path, loras: dict[str, Any]) -> Any:
    """A CPU pipeline of ``model_dir`` (any family) with every LoRA of ``loras`` (name -> file with a ``path``)
    loaded by diffusers itself (peft's layers) under its name: what routed and slot outputs are compared with."""
    from darkroom.worker.device import DeviceInfo
    from darkroom.worker.pipelines import load_pipeline

    pipe = load_pipeline(model_dir, DeviceInfo("cpu", "float32", "cpu"), "float32")
    for name, file in loras.items():
        pipe.load_lora_weights(str(file.path), adapter_name=name)
    return pipe


def use_adapters(reference: Any, loras: dict[str, Any], adapters: Sequence[tuple[Any, float]]) -> None:
    """Make ``adapters`` ((file, weight) pairs) the reference's active LoRAs with diffusers' ``set_adapters``
    (none: LoRA disabled)."""
    names = {file: name for name, file in loras.items()}
    if adapters:
        reference.enable_lora()
        reference.set_adapters([names[f] for f, _ in adapters], adapter_weights=[w for _, w in adapters])
    else:
        reference.disable_lora()


class RecordingConsumer:
    """Stands for Celery's consumer: records what queue subscriptions ask of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def add_task_queue(self, queue: str) -> None:
        self.calls.append(("add", queue))

    def cancel_task_queue(self, queue: str) -> None:
        self.calls.append(("cancel", queue))
