"""Adapters held in slots (fixed stacked buffers, per-sample weights as a tensor): every job gets what diffusers'
own ``set_adapters`` gives it, loading and hot-swapping never change the module structure, and a compiled
denoiser runs switches, blends, hot-swaps and mixed batches without recompiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.dev.tiny import make_tiny_lora
from darkroom.worker import recompiles
from darkroom.worker.adapters import AdapterFile, AdapterSet
from darkroom.worker.device import DeviceInfo
from darkroom.worker.inference.call import WorkItem, run_batch
from darkroom.worker.mixing import MixedAdapters, Routing, routed
from darkroom.worker.pipelines import load_pipeline
from darkroom.worker.slotted import SlotAdapters, slot_bank
from darkroom.worker.tuning import Tuning

from ..helpers import conv_lora, peft_reference, use_adapters

CPU = DeviceInfo("cpu", "float32", "cpu")
CALL: dict[str, Any] = {"strength": 0.75, "num_inference_steps": 6, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterFile]:
    root = tmp_path_factory.mktemp("slot-loras")
    specs: dict[str, dict[str, Any]] = {
        "unet": {"seed": 21}, "unet8": {"seed": 22, "rank": 8}, "te": {"seed": 23, "text_encoder": True},
        "te_only": {"seed": 24, "unet": False, "text_encoder": True},
    }
    files = {name: AdapterFile.inspect(make_tiny_lora(tiny_model, root / f"{name}.safetensors", **kw))
             for name, kw in specs.items()}
    files["conv"] = AdapterFile.inspect(conv_lora(tiny_model, root / "conv.safetensors"))
    return files


@pytest.fixture(scope="module")
def reference(tiny_model: Path, loras: dict[str, AdapterFile]) -> Any:
    """Plain diffusers with every test LoRA loaded under its own name (peft's layers)."""
    return peft_reference(tiny_model, loras)


@pytest.fixture(scope="module")
def inputs() -> list[Image.Image]:
    rng = np.random.default_rng(9)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(6)]


def job(index: int) -> Img2ImgJob:
    return Img2ImgJob(model="tiny", image="s3://inputs/x.png", prompt=f"a lighthouse, take {index}", seed=70 + index,
                      job_id=f"slot-{index}", **CALL)


def direct(reference: Any, loras: dict[str, AdapterFile], adapters: AdapterSet, image: Image.Image,
           j: Img2ImgJob) -> np.ndarray:
    """The job alone through plain diffusers (``set_adapters``, or LoRA disabled), one generator."""
    use_adapters(reference, loras, adapters)
    out = reference(prompt=[j.prompt], image=[image], generator=[torch.Generator("cpu").manual_seed(j.seeds()[0])],
                    **CALL)
    return np.asarray(out.images[0]).astype(int)


def images(pipe: Any, items: list[WorkItem]) -> list[np.ndarray]:
    return [np.asarray(out[0]).astype(int) for out in run_batch(pipe, items).images]


SETS: list[str] = ["base", "unet", "te", "blend", "te_only", "conv"]


def adapter_sets(loras: dict[str, AdapterFile]) -> list[AdapterSet]:
    """Six jobs: no adapter, a UNet LoRA, UNet + text encoder, a blend of ranks 4 and 8 with weights 0.6 and
    -0.8, a text-encoder-only LoRA at 0.7, and a convolution LoRA blended with an attention one."""
    return [(), ((loras["unet"], 1.0),), ((loras["te"], 1.0),), ((loras["unet"], 0.6), (loras["unet8"], -0.8)),
            ((loras["te_only"], 0.7),), ((loras["conv"], 1.0), (loras["unet"], 0.5))]


def test_one_mixed_call_in_slots_gives_each_job_its_diffusers_output(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any,
) -> None:
    # Given six jobs with different adapter sets (blends, weights, text encoder, convolutions) and slots of rank 8
    sets = adapter_sets(loras)
    jobs = [job(i) for i in range(len(sets))]
    items = [WorkItem(j, image, j.seeds()) for j, image in zip(jobs, inputs, strict=True)]
    pipe = load_pipeline(tiny_model, CPU, "float32")
    slots = SlotAdapters(pipe, max_slots=8, rank=8)
    # When the planner groups them and they run as one call
    plan = MixedAdapters().plan("tiny", pipe, slots, dict(enumerate(sets)))
    assert [c.routing for c in plan] == [Routing.MIXED] and plan[0].reason is None
    activation = slots.activate_mixed(sets)
    with routed(pipe, activation.routes):
        mixed = images(pipe, items)
    # Then each equals diffusers' single-job call within one uint8 step, and each file was loaded once (no
    # combined adapters: a blend is a row of weights)
    for index, (got, s, image, j) in enumerate(zip(mixed, sets, inputs, jobs, strict=True)):
        assert np.abs(got - direct(reference, loras, s, image, j)).max() <= 1, SETS[index]
    assert slots.loads == len(loras) and slots.combines == 0
    # And a job with an adapter differs visibly from the base model
    for index in range(1, len(sets)):
        assert np.abs(mixed[index] - direct(reference, loras, (), inputs[index], jobs[index])).max() > 8, SETS[index]


def test_single_calls_switch_adapters_and_the_base_model_is_exact(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any,
) -> None:
    pipe = load_pipeline(tiny_model, CPU, "float32")
    slots = SlotAdapters(pipe, max_slots=8, rank=8)
    j = job(0)
    item = WorkItem(j, inputs[0], j.seeds())
    for adapters in [*adapter_sets(loras)[1:], ()]:  # ends on the base model after every adapter was loaded
        slots.activate(list(adapters))
        got = images(pipe, [item])[0]
        assert np.abs(got - direct(reference, loras, adapters, inputs[0], j)).max() <= 1
    # The base model through slots (all weights 0) is bit-identical to diffusers without LoRA
    assert np.array_equal(got, direct(reference, loras, (), inputs[0], j))


def test_a_full_set_of_slots_hot_swaps_in_place_without_new_modules(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any,
) -> None:
    # Given one slot holding a LoRA
    pipe = load_pipeline(tiny_model, CPU, "float32")
    slots = SlotAdapters(pipe, max_slots=1, rank=8)
    slots.activate([(loras["unet"], 1.0)])
    modules = {name: id(m) for name, m in pipe.unet.named_modules()}
    # When another LoRA of the same layers takes its place
    activation = slots.activate([(loras["unet8"], 1.0)])
    # Then it was written into the same buffers (no module added or replaced) and gives that LoRA's output
    assert activation.hotswapped == 1 and slots.resident == [loras["unet8"].sha256]
    assert {name: id(m) for name, m in pipe.unet.named_modules()} == modules
    j = job(1)
    got = images(pipe, [WorkItem(j, inputs[1], j.seeds())])[0]
    assert np.abs(got - direct(reference, loras, ((loras["unet8"], 1.0),), inputs[1], j)).max() <= 1


def test_what_slots_cannot_hold_fails_that_job_and_the_slots_keep_serving(
    tiny_model: Path, loras: dict[str, AdapterFile], tmp_path: Path,
) -> None:
    pipe = load_pipeline(tiny_model, CPU, "float32")
    slots = SlotAdapters(pipe, max_slots=2, rank=4)
    dora = AdapterFile.inspect(make_tiny_lora(tiny_model, tmp_path / "dora.safetensors", seed=5, dora=True))
    for bad, why in ((loras["unet8"], "DARKROOM_LORA_MAX_RANK=4"), (dora, "DARKROOM_ADAPTER_LAYERS=peft")):
        with pytest.raises(JobError) as caught:
            slots.activate([(bad, 1.0)])
        assert caught.value.code is ErrorCode.ADAPTER_INVALID and why in caught.value.message
    assert slots.resident == []
    bank = slot_bank(pipe)
    assert bank is not None and all(float(layer.a.abs().sum()) == 0 for layer in bank.layers.values())
    slots.activate([(loras["unet"], 1.0)])  # a good one still loads
    assert slots.resident == [loras["unet"].sha256]


@pytest.mark.slow  # compiles the tiny UNet with inductor (a C++ compiler run)
def test_a_compiled_denoiser_runs_switches_blends_hot_swaps_and_mixed_batches_without_recompiling(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image],
) -> None:
    # Given a compiled worker's pipeline (slots wrapped as it loads, compiled for 64x64 at batch 1 to 8) and the
    # same model eager, both with two slots
    tuning = Tuning(compile=True, adapter_slots=True, lora_max_rank=8, warmup_sizes=((64, 64),), warmup_batch=8)
    compiled, eager = load_pipeline(tiny_model, CPU, "float32", tuning=tuning), load_pipeline(tiny_model, CPU, "float32")
    pairs = [SlotAdapters(p, max_slots=2, rank=8) for p in (compiled, eager)]
    for slots in pairs:
        slots.bank.prewrap()
    traced = counters["frames"]["total"]
    tuning.warm_up(compiled)
    assert recompiles.check() == 0
    # (with guidance the denoiser sees 2 to 16 rows: one dynamic graph, or a few where an operator guards on a
    # range of the batch, e.g. inductor's CPU convolution at 16 rows)
    warmed = counters["frames"]["total"]
    assert 1 <= warmed - traced <= 3
    # When jobs switch adapters, blend them, evict one (hot-swap into its slot), and run mixed batches of 3, 4 and
    # 8 (the worker's largest: 16 rows with guidance)
    sets = adapter_sets(loras)
    rounds: list[list[AdapterSet]] = [[sets[1]], [sets[3]], [()], [sets[2]], [sets[1], (), sets[4]],
                                      [sets[3], sets[1], (), sets[3]],
                                      [sets[1], (), sets[3], sets[1], (), sets[3], sets[1], ()]]
    for number, round_sets in enumerate(rounds):
        jobs = [job(10 * number + i) for i in range(len(round_sets))]
        items = [WorkItem(j, inputs[i % len(inputs)], j.seeds()) for i, j in enumerate(jobs)]
        outputs = []
        for pipe, slots in zip((compiled, eager), pairs, strict=True):
            if len(round_sets) == 1:
                slots.activate(list(round_sets[0]))
                outputs.append(images(pipe, items))
            else:
                with routed(pipe, slots.activate_mixed(round_sets).routes):
                    outputs.append(images(pipe, items))
        # Then every output is within one uint8 step of eager
        for got, expected in zip(*outputs, strict=True):
            assert np.abs(got - expected).max() <= 1, f"round {number}"
    # And nothing recompiled or was traced after the warm-up, though slots were hot-swapped
    assert pairs[0].hotswaps >= 1
    assert recompiles.check("test") == 0 and recompiles.total() == 0
    assert counters["frames"]["total"] == warmed


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_every_family_mixes_adapters_in_slots(family: str, tmp_path: Path, inputs: list[Image.Image]) -> None:
    from darkroom.dev.tiny import make_tiny_model

    # Given a tiny model of the family, a denoiser LoRA and one also on the (first) text encoder
    model = make_tiny_model(tmp_path / family, family=family)
    files = [AdapterFile.inspect(make_tiny_lora(model, tmp_path / f"l{i}.safetensors", seed=40 + i, text_encoder=te))
             for i, te in enumerate((False, True))]
    sets: list[AdapterSet] = [((files[0], 1.0),), (), ((files[0], 0.5), (files[1], 0.8))]
    call = {"strength": 0.7, "num_inference_steps": 4, "guidance_scale": 5.0}
    prompts = [f"a harbour, take {i}" for i in range(len(sets))]

    def generators() -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(80 + i) for i in range(len(sets))]

    # When the three jobs run as one mixed call with slots
    pipe = load_pipeline(model, CPU, "float32")
    slots = SlotAdapters(pipe, max_slots=4, rank=4)
    assert [c.routing for c in MixedAdapters().plan("m", pipe, slots, dict(enumerate(sets)))] == [Routing.MIXED]
    with routed(pipe, slots.activate_mixed(sets).routes):
        mixed = pipe(prompt=prompts, image=inputs[:3], generator=generators(), **call).images
    # Then each equals the family's diffusers pipeline with peft's set_adapters, one job at a time
    named = {f"l{i}": file for i, file in enumerate(files)}
    reference = peft_reference(model, named)
    for index, adapters in enumerate(sets):
        use_adapters(reference, named, adapters)
        single = reference(prompt=[prompts[index]], image=[inputs[index]], generator=[generators()[index]],
                           **call).images[0]
        assert np.abs(np.asarray(mixed[index]).astype(int) - np.asarray(single).astype(int)).max() <= 1, index
