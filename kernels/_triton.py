"""Triton import guard: the kernels exist wherever `triton` imports; the wrappers launch them on CUDA tensors, and on
CPU tensors only when VLLM_EAGLE_TRITON_INTERPRET=1 asks for it (tests, with TRITON_INTERPRET=1 set before the kernel
modules are imported). Everything else, the serving path on this CPU included, runs the torch references."""
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
    if os.environ.get("VLLM_EAGLE_TRITON_INTERPRET") == "1":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return all(t.is_cuda for t in tensors)
