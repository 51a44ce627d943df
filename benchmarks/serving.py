"""`vllm serve` on 127.0.0.1: a server handle (start on a free port, wait for /health, stop by PID) and a streaming
load generator measuring TTFT, TPOT and throughput at a given concurrency. Used by benchmarks and tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, stream: bool = False, on_chunk=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            return json.load(r)
        chunks = []
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                if on_chunk:
                    on_chunk(chunks[-1])
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
    """Run `client` in n threads until every one returns; -> wall seconds."""
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, temperature: float = 0.0) -> dict:
    """Stream completions for `prompts` with `concurrency` requests in flight; -> TTFT/TPOT medians, throughput."""
    ttft, tpot, tokens, lock, queue = [], [], [0], threading.Lock(), list(enumerate(prompts))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop(0)
            t0, first, n = time.perf_counter(), [None], [0]

            def on_chunk(c):
                if c.get("choices") and c["choices"][0].get("text"):
                    first[0] = first[0] or time.perf_counter()
                if c.get("usage"):
                    n[0] = c["usage"]["completion_tokens"]
            post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": temperature, "ignore_eos": True, "stream": True,
                                           "stream_options": {"include_usage": True}}, stream=True, on_chunk=on_chunk)
            end = time.perf_counter()
            with lock:
                ttft.append(first[0] - t0)
                tpot.append((end - first[0]) / max(1, n[0] - 1))
                tokens[0] += n[0]

    wall = run_clients(worker, concurrency)
    return {"concurrency": concurrency, "requests": len(prompts), "ttft_ms": 1000 * statistics.median(ttft),
            "tpot_ms": 1000 * statistics.median(tpot), "tokens_per_s": tokens[0] / wall}
