"""Triton import guard: the kernels exist wherever `triton` imports; they launch only on CUDA tensors or under
TRITON_INTERPRET=1 (set before the kernel modules are imported)."""
import os

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                                   # pragma: no cover - triton ships with vLLM's deps
    triton = tl = None
    HAS_TRITON = False


def use_triton(*tensors) -> bool:
    if not HAS_TRITON:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or all(t.is_cuda for t in tensors)
