# Darkroom GPU worker: CUDA torch + the diffusers stack + the three Darkroom packages.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORKDIR /src
COPY constraints.txt ./
COPY common ./common
COPY producer ./producer
COPY worker ./worker
# torch comes from the base image (a CUDA build); constraints pin the rest.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt ./common ./producer ./worker
RUN useradd --create-home darkroom && mkdir -p /var/lib/darkroom && chown darkroom /var/lib/darkroom
USER darkroom
STOPSIGNAL SIGTERM
CMD ["darkroom", "worker"]
