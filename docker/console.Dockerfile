# modgate console: the review web app for moderators. No torch, no CUDA, no image decoding:
# only the shared package (modgate/) and the console itself (console/).
#   docker build -f docker/console.Dockerfile -t modgate-console .
#   docker run -p 8080:8080 -e MODGATE_REDIS__URL=redis://redis:6379/0 \
#     -e MODGATE_CONSOLE__TOKENS='{"ana": "<a long random token>"}' modgate-console
# Runs as uid 10001 and writes nothing: fine with a read-only root filesystem. Set
# MODGATE_CONSOLE__SESSION_SECRET when running more than one replica (docs/review.md).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY docker/console-requirements.txt ./
RUN pip install -r console-requirements.txt

FROM python:3.11-slim
RUN groupadd --system --gid 10001 modgate \
 && useradd --system --uid 10001 --gid modgate --home-dir /home/modgate --create-home modgate
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The packages themselves, not the project: installing the project would pull in torch.
COPY modgate ./modgate
COPY console ./console
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/modgate
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
CMD ["python", "-m", "console", "--host", "0.0.0.0", "--port", "8080"]
