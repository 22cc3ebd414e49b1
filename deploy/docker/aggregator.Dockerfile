# fedgate cloud aggregator: slim, CPU only (aggregation is numpy; the evaluator runs
# ONNX Runtime on CPU).  Build from the repository root:
#   docker build -f deploy/docker/aggregator.Dockerfile -t fedgate-aggregator .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/fedgate/venv
ENV PATH=/opt/fedgate/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch's CPU wheel first, so the pinned requirement is satisfied without the CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY cloud_aggregator ./cloud_aggregator
# the wheel carries the bundled model, whose weights are the default initial_model
RUN pip wheel --no-deps -w /tmp/dist . \
 && pip install /tmp/dist/fedgate-*.whl \
 && fedgate-aggregator --version \
 && python -c "from gateway.model.modeldir import bundled_model_dir as d, validate_model_dir as v; v(d())"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10002 --user-group --home-dir /var/lib/fedgate-aggregator fedgate-aggregator \
 && install -d -o fedgate-aggregator -g fedgate-aggregator -m 0700 /var/lib/fedgate-aggregator
COPY --from=build /opt/fedgate/venv /opt/fedgate/venv
ENV PATH=/opt/fedgate/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER fedgate-aggregator
WORKDIR /var/lib/fedgate-aggregator
# pool database (SQLite) and checkpoints: keep this volume, it is what a restore needs
VOLUME ["/var/lib/fedgate-aggregator"]
ENTRYPOINT ["tini", "--", "fedgate-aggregator"]
CMD ["run", "--config", "/etc/fedgate/aggregator.toml"]
