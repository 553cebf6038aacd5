# Cluster image for timers1: CUDA builds of torch 2.13.0 and triton 3.7.1 (the versions
# setup.py pins). The torch wheel from PyPI carries its CUDA runtime, cuBLAS and NCCL as pip
# packages, so the base needs only Python; the host provides the NVIDIA driver.
#   docker build -t timers1 .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs timers1 timers1 train --config configs/tiny.yaml
FROM python:3.11-slim-bookworm

# Triton compiles a small C launcher per kernel at first use: it needs a C compiler.
# ninja + g++ are for DeepSpeed's JIT-built CPU Adam (optional offload optimizer).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ ninja-build git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/timers1
COPY setup.py README.md ./
COPY src ./src
COPY kernels ./kernels
COPY configs ./configs
COPY launch ./launch

# Plain PyPI torch==2.13.0 is the CUDA build on Linux x86_64; pin both explicitly.
RUN pip install --no-cache-dir torch==2.13.0 triton==3.7.1 \
 && pip install --no-cache-dir -e . \
 && python -c "import timers1, torch, triton; print(torch.__version__, triton.__version__)"

ENV OMP_NUM_THREADS=8 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1
ENTRYPOINT []
CMD ["timers1", "--help"]
