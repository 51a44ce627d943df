"""Packaging and registration: the entry point is found, register() is idempotent and runs in every vLLM process."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

import vllm_eagle


def test_entry_point_is_discovered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "vllm_eagle"]
    assert len(ours) == 1 and ours[0].value == "vllm_eagle:register"
    assert ours[0].load() is vllm_eagle.register


def test_register_is_idempotent_and_adds_flags():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    vllm_eagle.register()
    vllm_eagle.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = [a.option_strings for a in parser._actions]
    assert sum(["--speculative-model" in f for f in flags]) == 1        # added once, not per register() call


@pytest.mark.slow
def test_register_runs_in_engine_core_and_worker(tiny, oracle, tmp_path):
    """Multiprocess engine (the default topology): the plugin loads in front end, EngineCore and worker."""
    target, head = oracle
    log = tmp_path / "register.log"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import vllm_eagle
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={target!r}, dtype="float32", enforce_eager=True, max_model_len=256,
                      **vllm_eagle.speculative_kwargs({head!r}, num_speculative_tokens=2))
            out = llm.generate(["def main("], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 8
    """))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_EAGLE_REGISTER_LOG": str(log)}
    env.pop("OMP_NUM_THREADS")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    registered = {pid: title for pid, event, title in lines if event == "register"}
    workers = {pid for pid, event, _ in lines if event == "worker"}
    assert len(registered) >= 3, lines                                   # front end, engine core, worker (+ inspection)
    assert any("VLLM::EngineCore" in t for t in registered.values()), lines
    assert workers and workers <= set(registered), lines                 # the worker process ran register()
