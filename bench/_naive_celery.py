"""The naive baseline of ``bench/throughput.py`` (b): a plain Celery task that loads the pipeline per task.

This is what a first img2img service on Celery often looks like: fetch the input, build the
pipeline from disk, run it, upload the PNG. Run by the benchmark as
``celery -A _naive_celery worker --pool solo`` with NAIVE_* variables for the services.
"""

from __future__ import annotations

import io
import os

import boto3
from celery import Celery

app = Celery("naive-img2img", broker=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False)


def _s3() -> object:
    return boto3.client("s3", endpoint_url=os.environ["NAIVE_S3"], aws_access_key_id=os.environ["NAIVE_KEY"],
                        aws_secret_access_key=os.environ["NAIVE_SECRET"], region_name="us-east-1")


@app.task(name="naive.img2img")
def img2img(model_dir: str, bucket: str, key: str, out_key: str, prompt: str, seed: int, strength: float,
            steps: int, guidance: float) -> str:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    s3 = _s3()
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    s3.put_object(Bucket=bucket, Key=out_key, Body=buffer.getvalue())  # type: ignore[attr-defined]
    return out_key
