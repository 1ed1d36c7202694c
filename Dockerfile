# GPU image of the MMAudio service: one image, three roles (api, worker, all-in-one `serve`).
# Weights are never baked in: mount a volume at /weights (fetched on first start by `serve` or
# `python -m model.weights download VARIANT --dir /weights`).
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MMAUDIO_WEIGHTS_DIR=/weights \
    MMAUDIO_DATA_DIR=/data \
    HF_HOME=/weights/hf-cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 mmaudio \
    && mkdir -p /weights /data \
    && chown mmaudio:mmaudio /weights /data

WORKDIR /app
# dependencies first: this layer survives code changes
COPY pyproject.toml README.md ./
RUN mkdir model service \
    && touch model/__init__.py service/__init__.py \
    && pip install --no-compile . \
    && pip uninstall -y mmaudio-service
COPY model ./model
COPY service ./service
COPY weights/manifest.json ./weights/manifest.json
RUN pip install --no-compile --no-deps .

USER 10001
VOLUME ["/weights", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python3", "-m", "service"]
