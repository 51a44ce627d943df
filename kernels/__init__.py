"""Tree kernels: Triton kernels + host wrappers; pure-torch references of the same names in `kernels.reference`.

On a CUDA device the wrappers launch the Triton kernels; everywhere else (vLLM's CPU backend has no Triton) they run
the references, which are the CPU path. Tests run the Triton kernels under TRITON_INTERPRET=1 (fp32) against them.
"""
from .acceptance import tree_accept
from .tree_mask import build_tree_masks

__all__ = ["build_tree_masks", "tree_accept"]
