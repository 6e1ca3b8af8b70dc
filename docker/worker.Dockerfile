# modgate GPU worker: CUDA runtime, the CUDA build of torch, every detector on the GPU.
# open_nsfw and nudenet run as torch modules converted from their ONNX files at load time
# (onnx2torch, a core dependency; runtime.onnx=auto picks it on CUDA), in the same CUDA
# context as the other models. The CPU build of onnxruntime stays for CPU runs only: never
# add onnxruntime-gpu beside it (tests/deploy/test_docker.py checks both).
#   docker build -f docker/worker.Dockerfile -t modgate-worker .
#   docker build -f docker/worker.Dockerfile --build-arg BAKE_MODELS=true -t modgate-worker:models .
# Runs as uid 10001 and writes only to /tmp and the model cache, so it works with a
# read-only root filesystem (mount an emptyDir on /tmp and a volume on /models).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG EXTRAS=nudenet
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modgate ./modgate
COPY worker ./worker
COPY producers ./producers
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
 && python -c "import onnx2torch, torch; assert torch.version.cuda, 'CPU-only torch in the GPU image'"

FROM ${CUDA_IMAGE}
ARG BAKE_MODELS=false
ARG DETECTORS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 modgate \
 && useradd --system --uid 10001 --gid modgate --home-dir /home/modgate --create-home modgate \
 && mkdir -p /models && chown modgate:modgate /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/modgate \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton \
    MODGATE_DETECTORS__MODEL_DIR=/models \
    MODGATE_DETECTORS__CACHE_DIR=/models/cache
USER 10001:10001
# Optional: bake the weights in, so nodes need no access to the hub or LAION's URLs.
RUN if [ "$BAKE_MODELS" = "true" ]; then \
      modgate models pull --to /models ${DETECTORS:+--detectors "$DETECTORS"}; \
    fi
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9108/livez', timeout=4).status != 200)"]
ENTRYPOINT ["modgate"]
CMD ["worker", "--queues", "modgate"]
