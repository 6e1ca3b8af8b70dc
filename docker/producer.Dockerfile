# modgate producers and webhook dispatcher: no torch, no CUDA.
#   docker build -f docker/producer.Dockerfile -t modgate-producer .
#   docker run modgate-producer serve-events --port 8080
#   docker run modgate-producer listen sqs https://sqs.../queue
#   docker run modgate-producer worker --queues modgate.webhooks   (webhook dispatcher)
# Runs as uid 10001 and writes nothing outside /tmp: fine with a read-only root filesystem.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY docker/producer-requirements.txt ./
RUN pip install -r producer-requirements.txt
COPY pyproject.toml README.md ./
COPY modgate ./modgate
COPY worker ./worker
COPY producers ./producers
# --no-deps: the package's own dependencies include torch; producers never import it.
# hadolint ignore=DL3013
RUN pip install --no-deps .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 modgate \
 && useradd --system --uid 10001 --gid modgate --home-dir /home/modgate --create-home modgate
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/modgate
USER 10001:10001
EXPOSE 8080 9108
# serve-events answers /healthz on 8080; a dispatcher answers /livez on 9108: set
# MODGATE_HEALTH_URL accordingly (the Helm chart uses its own probes instead).
ENV MODGATE_HEALTH_URL=http://127.0.0.1:8080/healthz
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(urllib.request.urlopen(os.environ['MODGATE_HEALTH_URL'], timeout=4).status != 200)"]
ENTRYPOINT ["modgate"]
CMD ["serve-events", "--host", "0.0.0.0", "--port", "8080"]
