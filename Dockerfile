# Folio images. One build, two targets:
#   service  router and tokenizer (no torch):   docker build --target service -t folio-service .
#   engine   GPU engine shard (CUDA torch):      docker build --target engine  -t folio-engine .
# The model is not baked in: `python -m folio prepare-model` (run by the engine image) writes the
# bundled SmolLM2-135M-Instruct into $FOLIO_CACHE, a volume the tokenizer and engines share; or mount
# any HF model directory and pass --model.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS service
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app FOLIO_CACHE=/cache
WORKDIR /app
COPY deploy/requirements-service.txt /tmp/requirements-service.txt
RUN pip install -r /tmp/requirements-service.txt
COPY protos/ protos/
RUN python protos/generate.py
COPY folio/ folio/
COPY services/ services/
RUN useradd --create-home --uid 10001 folio && mkdir -p /cache && chown folio /cache
USER folio
# SIGTERM drains: NOT_SERVING, stop taking work, give in-flight calls --grace-s.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.router", "--host", "0.0.0.0"]

FROM service AS engine
USER root
COPY requirements.txt /tmp/requirements.txt
# On PyPI, torch==2.13.0 for linux x86_64 is the CUDA build.
RUN pip install -r /tmp/requirements.txt
COPY kernels/ kernels/
USER folio
CMD ["python", "-m", "services.engine", "--host", "0.0.0.0"]
