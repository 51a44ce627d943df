"""Soak / load test of `vllm serve` with our speculation, loopback only, bounded in requests and minutes.

    python -m benchmarks.soak [--minutes 10] [--requests 2000] [--concurrency 64] [--tree dynamic] [--dtype float32]

Phases: (1) a vanilla server answers every distinct greedy request once (the reference); (2) our server takes
`--requests` streaming requests from `--concurrency` clients (mixed prompt lengths up to the context limit; greedy,
greedy with a repetition penalty, logprobs and stop strings; seeded and unseeded sampling, n=2; about 10 % closed
mid-stream by the client, about 3 % invalid). Checks: no request fails or hangs, invalid ones get a 4xx, every
completed greedy choice (and every aborted one's prefix) equals the vanilla tokens, the engine is idle afterwards,
and the servers' resident memory after warm-up vs at the end. Prints a JSON report; exit status 1 if a check fails.
Tests run the same functions in a short form (tests/test_serve.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .serving import Server, run_clients, spec_metrics

STOP = "\n\n"


@dataclass
class Req:
    prompt: list[int]           # prompt token ids
    max_tokens: int
    params: dict                # sampling fields of the request body
    key: int | None = None      # index of its vanilla reference (deterministic requests), None for sampled ones
    abort_after: int | None = None   # close the stream after this many chunks
    bad: str | None = None      # why the server must refuse it (4xx)


@dataclass
class Report:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    rejected_4xx: int = 0       # invalid requests refused as they must be
    failed: list = field(default_factory=list)      # unexpected errors (messages)
    greedy_checked: int = 0     # completed or aborted deterministic choices compared with vanilla
    greedy_mismatched: list = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    rss_mb_after_warmup: float = 0.0
    rss_mb_end: float = 0.0
    rss_mb_max: float = 0.0
    running_after: float = -1.0     # vllm:num_requests_running + waiting once all clients are done
    spec: dict = field(default_factory=dict)

    def ok(self) -> bool:
        return not self.failed and not self.greedy_mismatched and self.running_after == 0 and self.completed > 0


DETERMINISTIC = [                 # (name, body fields): each gets a vanilla reference
    ("greedy", {"temperature": 0}),
    ("repetition-penalty", {"temperature": 0, "repetition_penalty": 1.2}),
    ("logprobs", {"temperature": 0, "logprobs": 2}),
    ("stop", {"temperature": 0, "stop": [STOP]}),
]
SAMPLED = [{"temperature": 0.8, "top_p": 0.95}, {"temperature": 1.0, "top_k": 20}, {"temperature": 1.0},
           {"temperature": 0.8, "n": 2}]


def prompt_pool(tokenizer, max_model_len: int, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of mixed length (token ids): chat-templated MT-Bench and ShareGPT questions, long ShareGPT
    concatenations, and prompts that end 8 tokens short of max_model_len - 64 (drafts must be cut at the limit)."""
    from vllm_eagle.assets import chat_prompts, mtbench_questions, sharegpt_path
    from vllm_eagle.train.data import parse_sharegpt
    rng = random.Random(seed)
    with open(sharegpt_path(), encoding="utf-8") as f:
        share = [r["prompt"] for r in parse_sharegpt(f.read(8 << 20), limit=600)][-300:]
    short = chat_prompts(tokenizer, [q["turns"][0] for q in mtbench_questions()] + share[:100])
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    pool = [enc(p) for p in rng.sample(short, min(len(short), n))]
    body = enc(" ".join(share[100:]))
    for i in range(len(pool)):
        if i % 4 == 3:                                    # long: 300 .. max_model_len - 200 tokens
            start = rng.randrange(0, len(body) - max_model_len)
            pool[i] = body[start:start + rng.randrange(300, max_model_len - 200)]
        elif i % 8 == 6:                                  # at the limit: max_tokens 64 reaches max_model_len - 8
            start = rng.randrange(0, len(body) - max_model_len)
            pool[i] = body[start:start + max_model_len - 72]
    return [p[: max_model_len - 72] for p in pool]


def request_mix(pool: list[list[int]], num: int, abort_frac: float, bad_frac: float, max_model_len: int,
                seed: int = 0) -> tuple[list[Req], list[Req]]:
    """-> (requests in submission order, distinct deterministic requests to take vanilla references for)."""
    rng = random.Random(seed)
    distinct: list[Req] = []
    for i, p in enumerate(pool):
        name, params = DETERMINISTIC[i % len(DETERMINISTIC)]
        distinct.append(Req(p, 64 if len(p) >= max_model_len - 72 else rng.choice([16, 32, 64, 96]), params,
                            key=len(distinct)))
    out = []
    for _ in range(num):
        u = rng.random()
        if u < bad_frac:
            p = rng.choice(pool)
            out.append(rng.choice([Req(p, -1, {"temperature": 0}, bad="negative max_tokens"),
                                   Req(p * (max_model_len // len(p) + 1), 16, {"temperature": 0},
                                       bad="prompt longer than max_model_len"),
                                   Req(p, 16, {"temperature": 0, "top_p": 7.0}, bad="top_p > 1")]))
            continue
        if u < 0.6:
            r = rng.choice(distinct)
            r = Req(r.prompt, r.max_tokens, r.params, r.key)
        else:
            params = dict(rng.choice(SAMPLED))
            if rng.random() < 0.5:
                params["seed"] = rng.randrange(1 << 30)
            r = Req(rng.choice(pool), rng.choice([16, 32, 64, 96]), params)
        if rng.random() < abort_frac:
            r.abort_after = rng.randrange(1, 6)
        out.append(r)
    return out, distinct


def body(model: str, r: Req, stream: bool) -> dict:
    b = {"model": model, "prompt": r.prompt, "max_tokens": r.max_tokens, "return_token_ids": True, **r.params}
    if stream:
        b.update(stream=True, stream_options={"include_usage": True})
    return b


def complete(url: str, model: str, r: Req, timeout: float) -> list[list[int]]:
    """Non-streaming completion -> token ids per choice."""
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body(model, r, False)).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        choices = sorted(json.load(resp)["choices"], key=lambda c: c["index"])
    return [c["token_ids"] for c in choices]


def stream(url: str, model: str, r: Req, timeout: float) -> tuple[list[list[int]], bool]:
    """Streaming completion -> (token ids per choice, aborted); closes the connection after r.abort_after chunks."""
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body(model, r, True)).encode(),
                                 {"Content-Type": "application/json"})
    ids: dict[int, list[int]] = {}
    chunks = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices") or ():
                ids.setdefault(c["index"], []).extend(c.get("token_ids") or ())
            chunks += 1
            if r.abort_after is not None and chunks >= r.abort_after:
                return [ids[i] for i in sorted(ids)], True       # leaving the `with` drops the connection
    return [ids[i] for i in sorted(ids)], False


def references(url: str, model: str, distinct: list[Req], concurrency: int = 8, timeout: float = 600) -> dict:
    """Vanilla token ids per deterministic request: {key: [ids per choice]}."""
    out, lock, todo = {}, threading.Lock(), list(distinct)

    def work():
        while True:
            with lock:
                if not todo:
                    return
                r = todo.pop()
            got = complete(url, model, r, timeout)
            with lock:
                out[r.key] = got
    run_clients(work, concurrency)
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (the API server, engine core and worker)."""
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def engine_gauges(url: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            if line.startswith(name + "{"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def soak(url: str, model: str, server_pid: int, reqs: list[Req], refs: dict, concurrency: int,
         minutes: float | None = None, timeout: float = 300, warmup_frac: float = 0.2) -> Report:
    """Run `reqs` against `url` with `concurrency` clients (stop issuing after `minutes`); check every answer."""
    rep, lock = Report(), threading.Lock()
    todo = list(reversed(reqs))
    deadline = time.time() + 60 * minutes if minutes else None
    warm_at = max(1, min(int(len(reqs) * warmup_frac), 2 * concurrency))     # answers before the memory baseline
    spec_before = spec_metrics(url)

    def check(r: Req, got: list[list[int]], aborted: bool) -> None:
        if r.key is None:
            return
        want = refs[r.key]
        for i, ids in enumerate(got):
            rep.greedy_checked += 1
            ok = ids == want[i] if not aborted else ids == want[i][: len(ids)]
            if not ok:
                rep.greedy_mismatched.append({"key": r.key, "params": r.params, "choice": i, "aborted": aborted,
                                              "prompt_len": len(r.prompt), "got": ids[:40], "want": want[i][:40]})

    def work():
        while True:
            with lock:
                if not todo or (deadline and time.time() > deadline):
                    return
                r = todo.pop()
                rep.requests += 1
            try:
                got, aborted = stream(url, model, r, timeout)
                err = None if r.bad is None else f"invalid request ({r.bad}) was accepted"
            except urllib.error.HTTPError as e:
                got, aborted = [], False
                err = None if (r.bad and 400 <= e.code < 500) else f"HTTP {e.code} for {r.params}: {e.read()[:300]!r}"
                if err is None:
                    with lock:
                        rep.rejected_4xx += 1
                    continue
            except Exception as e:                        # noqa: BLE001 (timeouts = stuck requests, resets, ...)
                got, aborted, err = [], False, f"{type(e).__name__}: {e} for {r.params} ({len(r.prompt)} tokens)"
            with lock:
                if err:
                    rep.failed.append(err)
                    continue
                rep.aborted += aborted
                rep.completed += not aborted
                rep.tokens += sum(map(len, got))
                check(r, got, aborted)
                done = rep.completed + rep.aborted
                if done == warm_at:
                    rep.rss_mb_after_warmup = rss_mb(server_pid)
                if done % 16 == 0:
                    rep.rss_mb_max = max(rep.rss_mb_max, rss_mb(server_pid))

    rep.wall_s = round(run_clients(work, concurrency), 1)
    for _ in range(30):                                   # aborted streams are released asynchronously
        g = engine_gauges(url)
        rep.running_after = sum(g.values())
        if rep.running_after == 0:
            break
        time.sleep(1)
    rep.rss_mb_end = rss_mb(server_pid)
    rep.rss_mb_max = max(rep.rss_mb_max, rep.rss_mb_end)
    after = spec_metrics(url)
    rep.spec = {k: after.get(k, 0) - spec_before.get(k, 0) for k in after}
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--target")
    p.add_argument("--head")
    p.add_argument("--minutes", type=float, default=10.0, help="stop issuing requests after this long")
    p.add_argument("--requests", type=int, default=2000, help="at most this many requests")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--distinct", type=int, default=40, help="distinct prompts")
    p.add_argument("--abort-frac", type=float, default=0.1)
    p.add_argument("--bad-frac", type=float, default=0.03)
    p.add_argument("--tree", default="dynamic", help="chain, path tuples or dynamic")
    p.add_argument("--dtype", default="float32", help="float32: greedy answers are compared token for token")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", help="also write the JSON report here")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm_eagle
    from transformers import AutoTokenizer
    target, head = a.target or vllm_eagle.default_target(), a.head or vllm_eagle.default_head()
    pool = prompt_pool(AutoTokenizer.from_pretrained(target), a.max_model_len, a.distinct)
    reqs, distinct = request_mix(pool, a.requests, a.abort_frac, a.bad_frac, a.max_model_len)
    common = ("--dtype", a.dtype, "--max-model-len", str(a.max_model_len), "--enforce-eager", "--seed", "0",
              "--max-num-seqs", str(a.concurrency))
    log_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    t0 = time.time()
    with Server(target, *common, log=os.path.join(log_dir, "soak-vanilla.log")) as srv:
        refs = references(srv.url, target, distinct)
    print(f"[soak] {len(refs)} vanilla references in {time.time() - t0:.0f} s", flush=True)
    spec = ["--speculative-model", head, "--eagle-tree", a.tree] + (
        ["--num-speculative-tokens", "3"] if a.tree == "chain" else [])
    with Server(target, *common, *spec, log=os.path.join(log_dir, "soak-ours.log")) as srv:
        rep = soak(srv.url, target, srv.proc.pid, reqs, refs, a.concurrency, a.minutes)
    out = {"command": "python -m benchmarks.soak " + " ".join(argv or __import__("sys").argv[1:]),
           "ok": rep.ok(), **vars(rep)}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
