"""Shared fixtures. Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 with OMP_NUM_THREADS=1: ~3 s startup;
without the thread cap the CPU attention kernel stalls), fp32 wherever outputs are compared exactly."""
import os

for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "TRITON_INTERPRET": "1"}.items():           # our Triton kernels run interpreted (fp32) in tests
    os.environ.setdefault(k, v)

import gc
import sys

import pytest
import torch

from vllm_eagle.metrics import spec_counters  # noqa: F401  (re-exported for tests)

sys.path.insert(0, os.path.dirname(__file__))
from builders import make_oracle_pair, make_random_head, make_tiny_target  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny(models_dir):
    return make_tiny_target(os.path.join(models_dir, "tiny"))


@pytest.fixture(scope="session")
def oracle(tiny, models_dir):
    """(target with identity layers, head that drafts exactly its next token)."""
    return make_oracle_pair(tiny, models_dir)


@pytest.fixture(scope="session")
def tiny_random_head(tiny, models_dir):
    return make_random_head(tiny, os.path.join(models_dir, "tiny-random-head"))


@pytest.fixture(scope="session")
def smollm2():
    import vllm_eagle
    return vllm_eagle.default_target()


@pytest.fixture(scope="session")
def smollm2_head():
    import vllm_eagle
    head = vllm_eagle.default_head()
    assert os.path.isfile(os.path.join(head, "model.safetensors")), "the shipped default head is missing"
    return head


def tiered(values, fast, ids=None) -> list:
    """Parameters for pytest.mark.parametrize: the values in `fast` run in both tiers, the others in the full suite
    only (marked slow), so the fast tier keeps one case of each behaviour. Tuples fill several argument names."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), id=None if ids is None else ids[i],
                         marks=() if v in fast else pytest.mark.slow)
            for i, v in enumerate(values)]


def make_llm(model, spec=None, dtype="float32", **kw):
    """An in-process engine with a 256 MiB KV cache unless the test sizes it. The test process's heap (torch, vLLM,
    fixtures) is frozen first, so the collections vLLM runs while it starts skip it (they dominate a tiny engine's
    start-up); vLLM unfreezes it again when an engine shuts down."""
    from vllm import LLM
    gc.collect()
    gc.freeze()
    kw.setdefault("kv_cache_memory_bytes", 256 << 20)
    return LLM(model=model, dtype=dtype, enforce_eager=True, disable_log_stats=False, max_model_len=kw.pop("max_model_len", 1024),
               seed=0, **(spec or {}), **kw)


def close(llm):
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    gc.collect()


_VANILLA: dict = {}                                       # (model, prompts, params, engine args) -> vanilla result


def generate_ids(model, prompts, sp, spec=None, **kw) -> tuple[list[list[int]], dict]:
    """Start an engine, generate, stop it: -> (output token ids per prompt, spec-decode counters). Vanilla results
    (spec None) are computed once per session for the same model, prompts, sampling parameters and engine args."""
    key = None if spec else repr((model, prompts, sp, sorted(kw.items())))
    if key not in _VANILLA:
        llm = make_llm(model, spec, **kw)
        out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
        counters = spec_counters(llm)
        close(llm)
        if key is None:
            return out, counters
        _VANILLA[key] = (out, counters)
    out, counters = _VANILLA[key]
    return [list(o) for o in out], dict(counters)
