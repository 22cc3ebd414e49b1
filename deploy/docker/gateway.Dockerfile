# fedgate edge gateway on a CUDA-capable base: ONNX Runtime's CUDA execution provider
# when the host has an NVIDIA GPU (docker run --gpus all / compose.gpu.yaml), CPU else.
# The image is the wheel plus its dependencies: it carries the bundled default model
# (package data), so a container needs only its config, keys, state volume and logs.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t fedgate-gateway .
# CUDA 12 + cuDNN 9 is what onnxruntime-gpu 1.2x/1.3x wheels are built against.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fedgate/venv
ENV PATH=/opt/fedgate/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# dependencies first (cached layer), then the code
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY cloud_aggregator ./cloud_aggregator
# the pinned torch from PyPI is the CUDA build on Linux x86_64 (local training on GPU);
# onnxruntime-gpu comes from pyproject.  Install the wheel (what users install), then
# refuse to build an image whose bundled model is missing or broken.
RUN pip wheel --no-deps -w /tmp/dist . \
 && pip install /tmp/dist/fedgate-*.whl \
 && fedgate --version \
 && python -c "from gateway.model.modeldir import bundled_model_dir as d, validate_model_dir as v; v(d(), int8=True)"

FROM ${CUDA_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
# unprivileged user with a fixed uid: chown the mounted TLS bundle to 10001 (RUNBOOK)
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/fedgate fedgate \
 && install -d -o fedgate -g fedgate -m 0700 /var/lib/fedgate
COPY --from=build /opt/fedgate/venv /opt/fedgate/venv
# state_dir (database, received global models) is the volume, whatever the config says
ENV PATH=/opt/fedgate/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    FEDGATE__GATEWAY__STATE_DIR=/var/lib/fedgate
USER fedgate
WORKDIR /var/lib/fedgate
VOLUME ["/var/lib/fedgate"]
# the gateway's status endpoint ([http] listen, default 127.0.0.1:9108)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/api/status', timeout=4)"]
# live capture uses scapy's AF_PACKET sockets (no libpcap needed): run with
# --cap-add NET_RAW --cap-add NET_ADMIN and [source] interface = "..."
# tini forwards SIGTERM so the gateway commits its batch and offsets before exiting
ENTRYPOINT ["tini", "--", "fedgate"]
CMD ["gateway", "run", "--config", "/etc/fedgate/gateway.toml"]
