# syntax=docker/dockerfile:1
# The image serves one model with `gunicorn classify_server:app` on port 8000 (see docs/deployment.md,
# "Docker"). The model is baked in at /models/model (MODEL_DIR), made in one of three ways:
#
#   docker build -t classify-service .                                  # retrain on flower_photos and the
#                                                                       # ImageNet weights, both downloaded
#   docker build --build-arg MODEL_PATH=model -t classify-service .     # a trained model folder (or a base
#                                                                       # folder of numbered versions) in the context
#   docker build --build-context model=/any/model/folder -t classify-service .   # one anywhere: replaces the
#                                                                       # "model" stage below, no training
#   docker run --rm -p 8000:8000 classify-service
#
# Training build arguments: IMAGE_DIR (photos in the context; default: download flower_photos),
# ARCHITECTURE (mobilenet_v2: 4x cheaper to serve than inception_v3), WEIGHTS (imagenet, or a .weights.h5
# file or, for efficientnet_lite*, a KerasHub preset folder in the context), STEPS (4000). Needs BuildKit (the default builder since Docker 23).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the package and its dependencies in a virtualenv that the serving stage copies whole ---------
FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY setup.py pyproject.toml ./
COPY classify_contract/ classify_contract/
COPY retrain/ retrain/
COPY classify_server/ classify_server/
RUN --mount=type=cache,target=/root/.cache/pip pip install .

# --- train: run retrain, or copy MODEL_PATH from the context; the model ends in /models/model ------------
FROM build AS train
ARG MODEL_PATH=""
ARG IMAGE_DIR=""
ARG ARCHITECTURE=mobilenet_v2
ARG WEIGHTS=imagenet
ARG STEPS=4000
# The context is bind-mounted (never copied into a layer) to reach MODEL_PATH, IMAGE_DIR or WEIGHTS.
# HOME=/cache keeps the downloaded flower_photos (~/flower_photos), Keras' ImageNet weights
# (~/.keras) and the bottlenecks in a build cache, so that a rebuild does not fetch or compute them again.
RUN --mount=type=bind,target=/context \
    --mount=type=cache,target=/cache \
    set -eu; \
    if [ -n "$MODEL_PATH" ]; then \
      test -d "/context/$MODEL_PATH" || { echo "MODEL_PATH=$MODEL_PATH: no such folder in the build context" >&2; exit 1; }; \
      mkdir -p /models && cp -r "/context/$MODEL_PATH" /models/model; \
    else \
      weights="$WEIGHTS"; if [ -e "/context/$WEIGHTS" ]; then weights="/context/$WEIGHTS"; fi; \
      HOME=/cache python -m retrain ${IMAGE_DIR:+--image_dir "/context/$IMAGE_DIR"} \
        --architecture "$ARCHITECTURE" --weights "$weights" --how_many_training_steps "$STEPS" \
        --output_dir /models/model --bottleneck_dir /cache/bottlenecks --summaries_dir ""; \
    fi; \
    ls -lR /models/model

# --- model: only the model folder; `--build-context model=DIR` replaces this stage (and skips training) ---
FROM scratch AS model
COPY --from=train /models/model/ /

# --- serve: the virtualenv, gunicorn.conf.py and the model; no compiler, no pip cache, no root -----------
FROM ${PYTHON_IMAGE} AS serve
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=/models/model \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEB_CONCURRENCY=1 \
    THREADS=4 \
    TF_INTRA_OP_THREADS=2 \
    TF_INTER_OP_THREADS=2 \
    XDG_RUNTIME_DIR=/tmp
# os.cpu_count() in a container is the host's core count, not the container's CPU limit, so the
# image does not let gunicorn.conf.py guess: WEB_CONCURRENCY x TF_INTRA_OP_THREADS = 2 cores. Set them
# (with the container's CPU and memory) for a bigger container: docs/deployment.md, "Workers, threads, instances or pods".
# XDG_RUNTIME_DIR: where gunicorn puts its control socket (else in $HOME, which this user has not).
RUN groupadd --system --gid 10001 classify \
 && useradd --system --uid 10001 --gid classify --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin classify
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=model / /models/model/
COPY gunicorn.conf.py ./
# Numeric, so that Kubernetes' runAsNonRoot can check it. Code and model stay root-owned: read-only to it.
USER 10001:10001
EXPOSE 8000
# No curl in the slim image: Python's urllib asks /healthz (the process is up; /readyz is for the balancer).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["gunicorn", "classify_server:app"]
