# The aigc-runner image: `aigc` CLI, Celery worker, reconciler and Flower.
#   docker build -t aigc-runner:cpu .                                   # CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t aigc-runner:cu128 .  # CUDA torch, for GPU workers
# docker-compose.yml builds both: :cpu for every service but worker-gpu, :cu128 for worker-gpu.
FROM python:3.11-slim

# Which torch build, from PyTorch's own wheel index: "cpu" (a few hundred MB), or a CUDA build such
# as "cu128" (several GB). Not from PyPI: its Linux x86_64 torch is the CUDA build, whatever the worker.
ARG TORCH_VARIANT=cpu
# The pin in pyproject.toml (tests/unit/test_compose.py checks that the two agree).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIGC_CACHE_DIR=/cache

WORKDIR /app

# torch first, alone, from the chosen index (--index-url: that index only, so pip cannot take PyPI's
# build instead), in a layer that code changes do not rebuild. `pip install .` then finds
# torch 2.13.0+cpu (or +cu128) installed; it satisfies torch==2.13.0, so pip leaves it alone.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}/${TORCH_VARIANT}"

COPY . .
# The last step fails the build if anything replaced the chosen torch build.
RUN pip install . \
 && python -c 'import sys, importlib.metadata as m; v = m.version("torch"); sys.exit(None if v == sys.argv[1] else f"torch {v} is installed, not {sys.argv[1]}")' \
      "${TORCH_VERSION}+${TORCH_VARIANT}" \
 && useradd --create-home --uid 10001 aigc \
 && mkdir -p /cache \
 && chown aigc:aigc /cache

# /cache is created here owned by aigc, so a fresh named volume mounted on it is writable.
USER aigc
ENTRYPOINT ["aigc"]
CMD ["worker"]
