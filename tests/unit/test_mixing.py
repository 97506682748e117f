"""Mixed-adapter batching in-process: one call routes each sample to its own adapters and matches diffusers'
own single-job calls with ``set_adapters``; groups that cannot be routed are split, and say why."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.common.jobs import Img2ImgJob
from darkroom.dev.tiny import make_tiny_lora
from darkroom.worker.adapters import BASE, AdapterFile, AdapterManager, AdapterSet
from darkroom.worker.device import DeviceInfo
from darkroom.worker.inference.call import WorkItem, batch_key, run_batch
from darkroom.worker.mixing import MixedAdapters, Routing, routed
from darkroom.worker.pipelines import load_pipeline

from ..helpers import conv_lora, peft_reference, use_adapters

CPU = DeviceInfo("cpu", "float32", "cpu")
CALL: dict[str, Any] = {"strength": 0.75, "num_inference_steps": 6, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterFile]:
    root = tmp_path_factory.mktemp("mix-loras")
    specs: dict[str, dict[str, Any]] = {
        "unet": {"seed": 11}, "unet8": {"seed": 12, "rank": 8}, "te": {"seed": 13, "text_encoder": True},
        "te_only": {"seed": 14, "unet": False, "text_encoder": True},
    }
    return {name: AdapterFile.inspect(make_tiny_lora(tiny_model, root / f"{name}.safetensors", **kw))
            for name, kw in specs.items()}


@pytest.fixture(scope="module")
def inputs() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]


def job(index: int, **fields: Any) -> Img2ImgJob:
    return Img2ImgJob(model="tiny", image="s3://inputs/x.png", prompt=f"a boat, take {index}", seed=40 + index,
                      job_id=f"mix-{index}", **{**CALL, **fields})


@pytest.fixture(scope="module")
def reference(tiny_model: Path, loras: dict[str, AdapterFile]) -> Any:
    """Plain diffusers with every test LoRA loaded under its own name."""
    return peft_reference(tiny_model, loras)


def direct(reference: Any, loras: dict[str, AdapterFile], adapters: AdapterSet, image: Image.Image,
           j: Img2ImgJob) -> np.ndarray:
    """The job alone through plain diffusers (``set_adapters``, or LoRA disabled for no adapter), one generator."""
    use_adapters(reference, loras, adapters)
    out = reference(prompt=[j.prompt], image=[image], generator=[torch.Generator("cpu").manual_seed(j.seeds()[0])],
                    num_images_per_prompt=1, **CALL)
    return np.asarray(out.images[0]).astype(int)


def test_a_mixed_call_gives_each_job_its_single_job_output(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any
) -> None:
    # Given five jobs: no adapter, a UNet LoRA, a text-encoder LoRA, a two-adapter blend with weights other than 1
    # (ranks 4 and 8) and a text-encoder-only LoRA at weight 0.7
    sets: list[AdapterSet] = [(), ((loras["unet"], 1.0),), ((loras["te"], 1.0),),
                              ((loras["unet"], 0.6), (loras["unet8"], -0.8)), ((loras["te_only"], 0.7),)]
    jobs = [job(i) for i in range(len(sets))]
    items = [WorkItem(j, image, j.seeds()) for j, image in zip(jobs, inputs, strict=True)]
    # When they run as one pipeline call routed per sample
    pipe = load_pipeline(tiny_model, CPU, "float32")
    manager = AdapterManager(pipe)
    activation = manager.activate_mixed(sets)
    assert activation.routes[0] == BASE and len(set(activation.routes)) == len(sets)
    assert activation.combined == 2  # the blend and the 0.7-weighted adapter became adapters of their own
    with routed(pipe, activation.routes):
        mixed = [np.asarray(images[0]).astype(int) for images in run_batch(pipe, items).images]
    # Then each equals diffusers' single-job call with set_adapters within one uint8 step
    singles = [direct(reference, loras, s, image, j) for s, image, j in zip(sets, inputs, jobs, strict=True)]
    for index, (got, expected) in enumerate(zip(mixed, singles, strict=True)):
        assert np.abs(got - expected).max() <= 1, f"job {index}"
    # And each job with an adapter differs from what the base model makes of it
    for index in range(1, len(sets)):
        base = direct(reference, loras, (), inputs[index], jobs[index])
        assert np.abs(mixed[index] - base).max() > 8, f"job {index} looks like the base model"


def test_after_a_mixed_call_single_jobs_are_unaffected(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any
) -> None:
    # Given a pipeline that just ran a mixed call with a combined adapter
    pipe = load_pipeline(tiny_model, CPU, "float32")
    manager = AdapterManager(pipe)
    j = job(0)
    item = WorkItem(j, inputs[0], j.seeds())
    sets: list[AdapterSet] = [(), ((loras["unet"], 0.5), (loras["te"], 0.5))]
    with routed(pipe, manager.activate_mixed(sets).routes):
        run_batch(pipe, [item, item])
    # When single jobs follow: the base model, then the blend through ordinary activation
    manager.activate([])
    base = np.asarray(run_batch(pipe, [item]).images[0][0]).astype(int)
    manager.activate(list(sets[1]))
    blend = np.asarray(run_batch(pipe, [item]).images[0][0]).astype(int)
    # Then the hooks are gone and nothing of the mixed call remains
    assert np.array_equal(base, direct(reference, loras, (), inputs[0], j))
    assert np.abs(blend - direct(reference, loras, sets[1], inputs[0], j)).max() <= 1
    # And the combined adapter stays resident for the next mixed call (nothing is built twice)
    assert manager.activate_mixed(sets).combined == 0


def test_convolution_loras_and_their_blends_are_routed_too(
    tiny_model: Path, loras: dict[str, AdapterFile], inputs: list[Image.Image], reference: Any,
    tmp_path: Path
) -> None:
    # Given a LoRA on convolutions (peft's per-sample path) alone and blended with an attention LoRA
    conv = AdapterFile.inspect(conv_lora(tiny_model, tmp_path / "conv.safetensors"))
    reference.load_lora_weights(str(conv.path), adapter_name="conv")
    everything = {**loras, "conv": conv}
    sets: list[AdapterSet] = [((conv, 1.0),), (), ((conv, 0.5), (loras["unet"], 0.8))]
    jobs = [job(i) for i in range(len(sets))]
    items = [WorkItem(j, image, j.seeds()) for j, image in zip(jobs, inputs[:len(sets)], strict=True)]
    # When they run as one mixed call
    pipe = load_pipeline(tiny_model, CPU, "float32")
    with routed(pipe, AdapterManager(pipe).activate_mixed(sets).routes):
        mixed = [np.asarray(images[0]).astype(int) for images in run_batch(pipe, items).images]
    # Then each equals its single-job diffusers call within one uint8 step, and the conv LoRA does something
    for index, adapters in enumerate(sets):
        expected = direct(reference, everything, adapters, inputs[index], jobs[index])
        assert np.abs(mixed[index] - expected).max() <= 1, f"job {index}"
    assert np.abs(mixed[0] - direct(reference, everything, (), inputs[0], jobs[0])).max() > 8


def test_a_layer_called_with_an_unexpected_batch_fails_instead_of_running_unrouted(
    tiny_model: Path, loras: dict[str, AdapterFile]
) -> None:
    pipe = load_pipeline(tiny_model, CPU, "float32")
    routes = AdapterManager(pipe).activate_mixed([(), ((loras["te"], 1.0),), ((loras["unet"], 1.0),)]).routes
    ids = torch.zeros((2, 8), dtype=torch.long)  # 2 rows for 3 samples
    with routed(pipe, routes), pytest.raises(RuntimeError, match="2 rows for 3 samples"):
        pipe.text_encoder(ids)
    pipe.text_encoder(ids)  # and the hooks are gone afterwards


def test_jobs_that_differ_only_in_adapters_share_a_key_when_mixing() -> None:
    image = Image.new("RGB", (64, 64))
    plain, styled = job(1), job(2, adapters=[{"uri": "style", "weight": 0.5}])
    a, b = WorkItem(plain, image, plain.seeds()), WorkItem(styled, image, styled.seeds())
    assert batch_key(a) != batch_key(b)
    assert batch_key(a, mixed_adapters=True) == batch_key(b, mixed_adapters=True)
    assert batch_key(a, mixed_adapters=True) != batch_key(WorkItem(job(3, num_inference_steps=9), image, [1]),
                                                          mixed_adapters=True)


# -- planning ---------------------------------------------------------------------------------------
def fake_file(name: str, *, dora: bool = False) -> AdapterFile:
    return AdapterFile(Path(f"/loras/{name}.safetensors"), name * 8, True, "sig", dora)


def manager(slots: int = 8, fused: bool = False) -> Any:
    """An adapter manager's planning surface: its slots, whether LoRAs are fused, what fits at once."""
    return SimpleNamespace(max_slots=slots, fused=fused, fits=AdapterManager(SimpleNamespace(), max_slots=slots).fits)


PIPE = SimpleNamespace(unet=torch.nn.Linear(2, 2))
A, B, C = ((fake_file("a"), 1.0),), ((fake_file("b"), 1.0),), ((fake_file("c"), 0.5), (fake_file("a"), 0.5))


def test_one_adapter_set_runs_as_an_ordinary_call() -> None:
    policy = MixedAdapters()
    assert [c.routing for c in policy.plan("m", PIPE, manager(), {0: A})] == [Routing.SINGLE]
    assert [c.routing for c in policy.plan("m", PIPE, manager(), {0: A, 3: A})] == [Routing.IDENTICAL]


def test_different_adapter_sets_run_as_one_mixed_call() -> None:
    calls = MixedAdapters().plan("m", PIPE, manager(), {0: A, 1: (), 2: B, 3: C, 4: A})
    assert len(calls) == 1 and calls[0].routing is Routing.MIXED and calls[0].reason is None
    assert calls[0].indices == (0, 1, 2, 3, 4) and calls[0].distinct == [A, (), B, C]


def test_more_sets_than_adapter_slots_make_several_mixed_calls() -> None:
    calls = MixedAdapters().plan("m", PIPE, manager(slots=2), {0: A, 1: (), 2: B, 3: C, 4: A})
    assert [(c.indices, c.routing) for c in calls] == [((0, 1, 2, 4), Routing.MIXED), ((3,), Routing.SINGLE)]


def test_mixing_off_splits_by_adapter_set_and_says_so() -> None:
    policy = MixedAdapters(enabled=False)
    calls = policy.plan("m", PIPE, manager(), {0: A, 1: (), 2: A})
    assert [(c.indices, c.routing) for c in calls] == [((0, 2), Routing.IDENTICAL), ((1,), Routing.SINGLE)]
    assert all("DARKROOM_MIXED_ADAPTERS=false" in (c.reason or "") for c in calls)
    assert not policy.allows("m")


def test_dora_adapters_run_apart_and_the_rest_still_mix() -> None:
    dora = ((fake_file("d", dora=True), 1.0),)
    calls = MixedAdapters().plan("m", PIPE, manager(), {0: A, 1: dora, 2: B, 3: dora})
    assert [(c.indices, c.routing) for c in calls] == [((0, 2), Routing.MIXED), ((1, 3), Routing.IDENTICAL)]
    assert calls[0].reason is None and "DoRA" in (calls[1].reason or "")


def test_a_compiled_unet_is_never_routed_and_its_model_goes_back_to_identical_keys() -> None:
    policy = MixedAdapters()
    compiled = SimpleNamespace(unet=torch.nn.Linear(2, 2))
    compiled.unet.compile()  # in place, as the worker's `compile` setting does (compiles lazily, on first call)
    calls = policy.plan("m", compiled, manager(), {0: A, 1: B})
    assert [c.routing for c in calls] == [Routing.SINGLE, Routing.SINGLE]
    assert all("compiled" in (c.reason or "") for c in calls)
    assert not policy.allows("m") and policy.allows("other")


def test_with_adapters_in_slots_a_compiled_denoiser_is_routed_and_slots_count_files_not_sets() -> None:
    from darkroom.worker.slotted import SlotAdapters

    compiled = SimpleNamespace(unet=torch.nn.Linear(2, 2))
    slots = SlotAdapters(compiled, max_slots=2, rank=2)
    compiled.unet.compile()
    policy = MixedAdapters()
    # A, B and C need three files (a, b, c) in two slots: A and B mix, C (a blend of c and a) runs apart
    calls = policy.plan("m", compiled, slots, {0: A, 1: (), 2: B, 3: C})
    assert [(c.indices, c.routing, c.reason) for c in calls] == [((0, 1, 2), Routing.MIXED, None),
                                                                ((3,), Routing.SINGLE, None)]
    assert policy.allows("m")


def test_fused_adapters_are_never_routed(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = load_pipeline(tiny_model, CPU, "float32")
    adapters = AdapterManager(pipe)
    adapters.activate([(loras["unet"], 1.0)])
    pipe.fuse_lora()
    assert adapters.fused
    calls = MixedAdapters().plan("m", pipe, adapters, {0: ((loras["unet"], 1.0),), 1: ()})
    assert [c.routing for c in calls] == [Routing.SINGLE, Routing.SINGLE]
    assert "fused" in (calls[0].reason or "")


def test_dora_files_are_recognised(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "dora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2), "unet.x.lora_B.weight": torch.zeros(2, 2),
               "unet.x.lora_magnitude_vector": torch.ones(2)}, str(path))
    assert AdapterFile.inspect(path).dora
