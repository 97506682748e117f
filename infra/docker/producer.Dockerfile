# Darkroom producer image: darkroom.common + darkroom.producer only (SDK, CLI, `darkroom dispatcher`,
# `darkroom dashboard`).
# No torch, no diffusers: a few hundred MB. Build: docker build -f infra/docker/producer.Dockerfile .
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt ./
COPY common ./common
COPY producer ./producer
# Constraints pin versions only for what these two packages pull in; torch (never a dependency here)
# is dropped from them anyway so no constraint can drag it in.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt ./common "./producer[dashboard]" \
 && ! pip show torch >/dev/null 2>&1 \
 && rm -rf /src
RUN useradd --create-home --uid 10001 darkroom
USER 10001
WORKDIR /home/darkroom
STOPSIGNAL SIGTERM
CMD ["darkroom", "--help"]
