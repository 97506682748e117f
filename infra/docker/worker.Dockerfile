# Darkroom GPU worker: CUDA torch + the diffusers stack + darkroom-common and darkroom-worker (no producer
# SDK, dashboard or dev tools: the worker depends on the contract only).
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORKDIR /src
COPY constraints.txt ./
COPY common ./common
COPY worker ./worker
# torch comes from the base image (a CUDA build); constraints pin the rest. A torch pin, if
# constraints.txt ever gets one, is dropped so pip keeps the base image's CUDA build.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt ./common ./worker \
 && python -c "import torch; assert torch.version.cuda, 'CPU torch replaced the CUDA build'"
# Numeric uid so Kubernetes' runAsNonRoot can verify it (infra/k8s runs it as 10001).
RUN useradd --create-home --uid 10001 darkroom && mkdir -p /var/lib/darkroom && chown darkroom /var/lib/darkroom
USER 10001
STOPSIGNAL SIGTERM
CMD ["darkroom", "worker"]
