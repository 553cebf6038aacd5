"""MoE kernels: routing, token permutation and grouped SwiGLU GEMMs.

Each op has a PyTorch reference (the CPU path, and the oracle for tests) and, where written, a
Triton kernel for CUDA tensors. This package needs only torch (and triton for the GPU path):
it must never import the model, the engine or the trainer.

Shape legend: T tokens, D model dim, F expert width, E experts, K top-k, S = T*K routed slots.
"""

from timers1.kernels.grouped_gemm import swiglu_experts
from timers1.kernels.permute import permute, unpermute
from timers1.kernels.routing import Routing, route

__all__ = ["Routing", "route", "permute", "unpermute", "swiglu_experts"]
