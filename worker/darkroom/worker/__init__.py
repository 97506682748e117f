"""Darkroom worker: a Celery worker process that keeps img2img pipelines resident on its device.

Start one with ``darkroom worker --model ID=SOURCE``. Importing this package is cheap;
torch and diffusers load when a worker starts.
"""

__all__: list[str] = []
