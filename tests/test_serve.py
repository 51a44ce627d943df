"""`vllm serve` with --speculative-model: OpenAI completions and chat, streaming and not, identical to vanilla at
temperature 0; /metrics carries the spec-decode counters; the server is stopped by its PID."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

PROMPT = "The three most important inventions of the 20th century are"
CHAT = [{"role": "user", "content": "Give me three tips for writing clean Python code."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, stream=False):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        if not stream:
            return json.load(r)
        chunks = []
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks


class Server:
    def __init__(self, model, *extra, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
             "--seed", "0", *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            assert self.proc.poll() is None, open(log).read()[-3000:]
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(open(log).read()[-3000:])

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)          # the server PID leads its process group
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def run_requests(url, model) -> dict:
    base = {"model": model, "temperature": 0, "max_tokens": 48}
    out = {"completion": post(url + "/v1/completions", {**base, "prompt": PROMPT})["choices"][0]["text"],
           "chat": post(url + "/v1/chat/completions", {**base, "messages": CHAT})["choices"][0]["message"]["content"]}
    chunks = post(url + "/v1/completions", {**base, "prompt": PROMPT, "stream": True}, stream=True)
    out["completion_stream"] = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    chunks = post(url + "/v1/chat/completions", {**base, "messages": CHAT, "stream": True}, stream=True)
    out["chat_stream"] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return out


def spec_metrics(url) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total{" in line and "per_pos" not in line:
            name = line.split("{")[0][len("vllm:spec_decode_num_"):-len("_total")]
            vals[name] = float(line.rsplit(" ", 1)[1])
    return vals


@pytest.fixture(scope="module")
def vanilla_answers(smollm2, tmp_path_factory):
    srv = Server(smollm2, log=tmp_path_factory.mktemp("serve") / "vanilla.log")
    try:
        return run_requests(srv.url, smollm2)
    finally:
        srv.stop()


def test_serve_speculative_model_matches_vanilla(smollm2, smollm2_head, vanilla_answers, tmp_path):
    srv = Server(smollm2, "--speculative-model", smollm2_head, "--num-speculative-tokens", "3", log=tmp_path / "ours.log")
    try:
        ours = run_requests(srv.url, smollm2)
        metrics = spec_metrics(srv.url)
    finally:
        srv.stop()
    assert srv.proc.returncode is not None                # stopped
    assert ours == vanilla_answers
    assert ours["completion"] == ours["completion_stream"] and ours["chat"] == ours["chat_stream"]
    assert metrics["drafts"] > 0 and metrics["draft_tokens"] == 3 * metrics["drafts"]
    assert metrics["accepted_tokens"] > 0, metrics
    assert "vllm_eagle.proposer.EagleProposer" in open(tmp_path / "ours.log").read()


def test_serve_speculative_config_form(smollm2, smollm2_head, vanilla_answers, tmp_path):
    """vLLM's own flags (--speculative-config + --additional-config + --worker-cls) reach the same proposer."""
    import vllm_eagle
    kw = vllm_eagle.speculative_kwargs(smollm2_head, num_speculative_tokens=2)
    srv = Server(smollm2, "--speculative-config", json.dumps(kw["speculative_config"]),
                 "--additional-config", json.dumps(kw["additional_config"]), "--worker-cls", kw["worker_cls"],
                 "--no-enable-prefix-caching", log=tmp_path / "ours.log")
    try:
        ours = run_requests(srv.url, smollm2)
        metrics = spec_metrics(srv.url)
    finally:
        srv.stop()
    assert ours == vanilla_answers
    assert metrics["draft_tokens"] == 2 * metrics["drafts"] > 0
