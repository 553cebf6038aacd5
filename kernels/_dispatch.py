"""Backend choice shared by every kernel op: Triton on CUDA tensors, the PyTorch path elsewhere.

``backend`` is 'auto' | 'torch' | 'triton':
  * 'auto'   -> Triton when the inputs live on a CUDA device and Triton imports, else PyTorch;
  * 'torch'  -> always the PyTorch path (the CPU path, and the oracle in tests);
  * 'triton' -> always Triton. On CPU tensors this only works under ``TRITON_INTERPRET=1``,
    which must be set *before* triton is imported: ``@triton.jit`` decides at decoration time
    whether a function is compiled or interpreted. The kernel tests therefore run in a fresh
    subprocess with the variable set (see tests/test_kernels.py).

Precision contract of every Triton kernel here: tensors may be bf16 (or fp16/fp32) in memory;
every load is widened to fp32 before arithmetic, ``tl.dot`` accumulates in fp32, and only the
final store narrows to the output dtype. The interpreter mishandles bf16 arithmetic, which is
one more reason never to compute in it.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a hard dependency on GPU machines, optional for pure-CPU use of the package
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for these tensors; raises on a request that cannot be honoured."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return triton is not None and on_cuda
    if triton is None:
        raise RuntimeError("backend='triton' requested but triton is not importable")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what torch would do for this dtype.

    bf16/fp16 operands go to tensor cores as they are. fp32 operands use TF32 only where torch
    itself is allowed to (``torch.backends.cuda.matmul.allow_tf32``), so that fp32 parity tests
    on a GPU compare like with like; the interpreter always computes in full fp32.
    """
    if dtype != torch.float32 or interpreting():
        return "ieee" if dtype == torch.float32 else "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
