"""`vllm serve` on 127.0.0.1: a server handle (start on a free port, wait for /health, stop by PID) and a streaming
load through `vllm bench serve` (TTFT, TPOT and throughput at a given concurrency). Used by benchmarks and tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, stream: bool = False):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            return json.load(r)
        chunks = []
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks


class Server:
    """`vllm serve MODEL *args` in its own process group; use as a context manager."""

    def __init__(self, model: str, *args: str, log: str, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path, self.log = log, open(log, "w")
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model, "--host", "127.0.0.1",
             "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(self.tail())

    def tail(self, n: int = 3000) -> str:
        with open(self.log_path) as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)          # the server PID leads its process group
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def spec_metrics(url: str) -> dict:
    """Spec-decode counters from the server's /metrics (parse_spec_metrics)."""
    return parse_spec_metrics(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())


def parse_spec_metrics(text: str) -> dict:
    """Prometheus text -> {drafts, draft_tokens, accepted_tokens}: vLLM's spec-decode counters, summed over label
    sets (engines); the per-position counter is left out."""
    from prometheus_client.parser import text_string_to_metric_families
    vals: dict = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:spec_decode_num_") or "per_pos" in family.name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                name = sample.name[len("vllm:spec_decode_num_"):-len("_total")]
                vals[name] = vals.get(name, 0.0) + sample.value
    return vals


def run_clients(client, n: int) -> float:
    """Run `client` in n threads until every one returns; -> wall seconds (the soak's clients)."""
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, temperature: float = 0.0) -> dict:
    """`vllm bench serve` against the server: the prompts as they are (already chat-templated), streamed with
    `concurrency` requests in flight, ignore_eos; -> TTFT/TPOT medians, output throughput."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "prompts.jsonl"), "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
        cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "bench", "serve", "--backend", "vllm",
               "--base-url", url, "--model", model, "--dataset-name", "custom", "--skip-chat-template",
               "--dataset-path", os.path.join(d, "prompts.jsonl"), "--custom-output-len", str(max_tokens),
               "--num-prompts", str(len(prompts)), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--temperature", str(temperature), "--disable-tqdm", "--save-result", "--result-dir", d,
               "--result-filename", "result.json"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"vllm bench serve failed ({run.returncode}): {run.stderr[-3000:]}")
        with open(os.path.join(d, "result.json")) as f:
            r = json.load(f)
    return {"concurrency": concurrency, "requests": r["completed"], "ttft_ms": r["median_ttft_ms"],
            "tpot_ms": r["median_tpot_ms"], "tokens_per_s": r["output_throughput"]}
