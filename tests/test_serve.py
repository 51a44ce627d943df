"""`vllm serve` with --speculative-model: OpenAI completions and chat, streaming and not, identical to vanilla at
temperature 0; /metrics carries the spec-decode counters; the short soak; the server is stopped by its PID."""

import pytest

from benchmarks import soak
from benchmarks.serving import Server, load, post, spec_metrics

pytestmark = pytest.mark.slow                     # real model behind `vllm serve`: the full suite only

ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0")
PROMPT = "The three most important inventions of the 20th century are"
CHAT = [{"role": "user", "content": "Give me three tips for writing clean Python code."}]


def run_requests(url, model) -> dict:
    base = {"model": model, "temperature": 0, "max_tokens": 48}
    out = {"completion": post(url + "/v1/completions", {**base, "prompt": PROMPT})["choices"][0]["text"],
           "chat": post(url + "/v1/chat/completions", {**base, "messages": CHAT})["choices"][0]["message"]["content"]}
    chunks = post(url + "/v1/completions", {**base, "prompt": PROMPT, "stream": True}, stream=True)
    out["completion_stream"] = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    chunks = post(url + "/v1/chat/completions", {**base, "messages": CHAT, "stream": True}, stream=True)
    out["chat_stream"] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return out


@pytest.fixture(scope="module")
def soak_mix(smollm2):
    """The short soak: 32 requests (mixed lengths up to the context limit, greedy / penalties / logprobs / stop
    / sampled / n=2, ~10 % aborted mid-stream, ~5 % invalid) over 8 distinct prompts."""
    from transformers import AutoTokenizer
    pool = soak.prompt_pool(AutoTokenizer.from_pretrained(smollm2), 1024, 8)
    return soak.request_mix(pool, 32, abort_frac=0.1, bad_frac=0.05, max_model_len=1024)


@pytest.fixture(scope="module")
def vanilla_answers(smollm2, soak_mix, tmp_path_factory):
    """(answers to run_requests, the soak's vanilla references), from one vanilla server."""
    srv = Server(smollm2, *ARGS, log=str(tmp_path_factory.mktemp("serve") / "vanilla.log"))
    try:
        return run_requests(srv.url, smollm2), soak.references(srv.url, smollm2, soak_mix[1])
    finally:
        srv.stop()


def test_serve_speculative_model_with_dynamic_trees(smollm2, smollm2_head, vanilla_answers, soak_mix, tmp_path):
    """`vllm serve --speculative-model` with our flags, here EAGLE-2 dynamic trees (load-adaptive): greedy completions
    and chat, streamed and not, identical to vanilla; seeded sampling reproducible; a bad request answered with a 4xx
    while the server stays up; the benchmarks' `vllm bench serve` load; then the short soak (benchmarks/soak.py) with
    16 concurrent streaming clients: no failure, no stuck request, every greedy answer (and aborted prefix) equals
    vanilla's. (vLLM's own --speculative-config/--additional-config/--worker-cls form is what LLM(...) takes in the
    in-process tests; the flags' expansion to it is tests/test_patches.py's.)"""
    import urllib.error
    srv = Server(smollm2, *ARGS, "--speculative-model", smollm2_head, "--eagle-tree", "dynamic", "--eagle-depth", "3",
                 "--eagle-top-k", "3", "--num-speculative-tokens", "6", log=str(tmp_path / "ours.log"))
    try:
        ours = run_requests(srv.url, smollm2)
        sampled = {"model": smollm2, "prompt": PROMPT, "max_tokens": 32, "temperature": 0.9, "top_p": 0.95, "seed": 4}
        texts = [post(srv.url + "/v1/completions", sampled)["choices"][0]["text"] for _ in range(2)]
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(srv.url + "/v1/completions", {"model": smollm2, "prompt": PROMPT, "max_tokens": -3})
        after_bad = run_requests(srv.url, smollm2)
        metrics = spec_metrics(srv.url)
        bench = load(srv.url, smollm2, [PROMPT, CHAT[0]["content"], PROMPT], concurrency=2, max_tokens=8)
        report = soak.soak(srv.url, smollm2, srv.proc.pid, soak_mix[0], vanilla_answers[1], concurrency=16)
    finally:
        srv.stop()
    assert srv.proc.poll() is not None                    # stopped by its PID
    assert "vllm_eagle.proposer.EagleProposer" in open(tmp_path / "ours.log").read()
    assert ours == vanilla_answers[0] == after_bad
    assert ours["completion"] == ours["completion_stream"] and ours["chat"] == ours["chat_stream"]
    assert texts[0] == texts[1] and texts[0]
    assert 400 <= bad.value.code < 500
    assert metrics["draft_tokens"] == 6 * metrics["drafts"] > 0
    assert metrics["accepted_tokens"] > 0, metrics
    assert bench["requests"] == 3 and bench["concurrency"] == 2, bench
    assert bench["tokens_per_s"] > 0 and bench["ttft_ms"] > 0 and bench["tpot_ms"] > 0, bench
    print(report)
    assert not report.failed and not report.greedy_mismatched, report
    assert report.requests == 32 and report.completed + report.aborted + report.rejected_4xx == 32
    assert report.aborted > 0 and report.rejected_4xx > 0 and report.greedy_checked > 10
    assert report.running_after == 0                       # aborted streams were released
    assert report.spec["accepted_tokens"] > 0
    assert report.rss_mb_end < 1.5 * report.rss_mb_after_warmup      # no runaway growth (the long form measures it)
