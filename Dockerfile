# The aigc-runner image: `aigc` CLI, Celery worker, reconciler and Flower.
#   docker build -t aigc-runner .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t aigc-runner:cpu .
FROM python:3.11-slim

# torch==2.13.0 is pinned in pyproject.toml. Empty: pip takes it from PyPI, whose Linux x86_64
# wheel is the CUDA build (runs on GPU and CPU, several GB). Set to a PyTorch wheel index to
# choose the build: .../whl/cu128 (a CUDA version for GPU workers) or .../whl/cpu (small CPU image).
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIGC_CACHE_DIR=/cache

WORKDIR /app
COPY . .
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
 && useradd --create-home --uid 10001 aigc \
 && mkdir -p /cache \
 && chown aigc:aigc /cache

# /cache is created here owned by aigc, so a fresh named volume mounted on it is writable.
USER aigc
ENTRYPOINT ["aigc"]
CMD ["worker"]
