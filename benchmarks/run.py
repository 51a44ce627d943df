"""One command, side by side: vanilla vLLM, vLLM native `method: eagle`/`eagle3` (same head), vLLM ngram, and ours.

    python -m benchmarks.run [--quick] [--batch-sizes 1 8] [--workloads mtbench humaneval sharegpt] ...

Every configuration runs the same prompts in this one process, one engine at a time (the default multiprocess
topology: worker on core 0, engine core + front end on core 1), each cell after an untimed 32-token pass of its first
batch (shapes, the gate's learning), with the median of --reps timed repetitions. Prefix caching is off in every
configuration: repeated passes over the same prompts would otherwise serve vanilla's, ngram's and native EAGLE's
prefills from the cache (ours needs it off), flattering them by the prompt prefill's share of the work (an estimate:
docs/notes.md).
`--rounds R` runs the whole list of configurations R times: each round's speedups are taken against that round's
vanilla, and the table shows per-cell medians over rounds (a machine's speed drifts within a long run, which paired
ratios cancel and one vanilla measurement at the start does not; docs/notes.md has the drift measured). Rows go to
benchmarks/results/<date>-<commit>.json; a markdown table and PNG plots sit beside it.
Per row: tokens/s, speedup over vanilla (same workload, temperature and batch size, same run), tau (mean accepted
length = 1 + accepted/drafts), per-position acceptance, and for ours the cost model: c = one draft depth over one
vanilla step (a draft forward: one tree depth), v(K) = one verify step (target forward over K+1 tokens per request)
over one vanilla step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

from benchmarks.common import DEFAULT_TREE, RESULTS, Config, configs, environment, native_method, workloads
from vllm_eagle.metrics import spec_counters

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

@dataclass
class Row:
    config: str                 # vanilla | ngram-k3 | native-eagle-k3 | ours-chain-k3
    workload: str
    temperature: float
    batch_size: int
    num_prompts: int
    max_tokens: int
    tokens_per_s: float         # median over reps
    tokens_per_s_reps: list
    speedup: float | None = None
    tau: float | None = None
    per_position_acceptance: list | None = None
    draft_cost_c: float | None = None
    verify_cost_v: float | None = None
    step_ms: float | None = None
    stage_ms: dict | None = None    # ours: ms per step in draft, mask, tree_attention, accept, kv_commit
    gated_share: float | None = None    # ours: share of steps the load-adaptive gate kept from drafting
    batch_tokens_per_s: float | None = None   # the whole run's rate, ramp-down included (closed_loop)
    batch_speedup: float | None = None        # batch_tokens_per_s over vanilla's, same round
    limit: float | None = None  # ours: tau / (depth * c + v), see fill_cost_model
    recomputed_share: float | None = None   # ours, trees: share of verified trees left to the masked recompute
    round: int = 0              # --rounds: which pass over the configurations (-1: the median over rounds)


def closed_loop(llm, prompts: list[str], bs: int, sp) -> tuple[int, float, int, float]:
    """Generate `prompts` with `bs` requests in flight (closed loop, as `vllm serve` under bs clients: a finished
    request is replaced by the next prompt at once). -> (tokens, seconds) of the steady state, while the queue still
    refilled the batch, and (tokens, seconds) of the whole run, ramp-down included.

    The steady state ends when the first request finishes with no prompt left to take its place: from then on the
    batch shrinks, and a speculating engine's requests finish unevenly (accepted lengths differ per request), so in a
    static batch the slowest request sets the wall time. E.g. one wave of 8 requests x 128 tokens at tau 1.52: a
    request needs 85 steps on average, but the wave lasts as long as its slowest one (a measured case: docs/notes.md,
    "Benchmark method"); vanilla's requests all finish at step 128, so its steady state is its whole run.
    """
    engine = llm.llm_engine
    queue, done_tokens, live = list(enumerate(prompts)), 0, {}
    t0 = time.perf_counter()
    steady: tuple[int, float] | None = None
    while queue or live:
        while queue and len(live) < bs:
            i, prompt = queue.pop(0)
            rid = f"bench-{i}"                      # outputs carry this id (the engine's own id adds a suffix)
            engine.add_request(rid, prompt, sp)
            live[rid] = 0
        finished = False
        for o in engine.step():
            live[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished:
                done_tokens += live.pop(o.request_id)
                finished = True
        if finished and steady is None and not queue:
            steady = (done_tokens + sum(live.values()), time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return (*(steady or (done_tokens, wall)), done_tokens, wall)


def measure(llm, cfg: Config, prompts: list[str], bs: int, temperature: float, max_tokens: int, reps: int) -> dict:
    """Median steady-state tokens/s of `reps` closed-loop passes over `prompts` with `bs` requests in flight (every
    request makes max_tokens; see closed_loop); `batch_tokens_per_s`: the same passes' whole-run rate."""
    from vllm import SamplingParams
    sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)   # unseeded (adapt.py)
    # Untimed warm-up of this cell: first-time shapes and the gate's learning for this batch size and temperature
    # are paid here, as a long-running server pays them once (timed, they would cost a short batch of trees much of
    # its speed: adapt.py).
    llm.generate(prompts[:bs], SamplingParams(temperature=temperature, max_tokens=min(32, max_tokens), ignore_eos=True),
                 use_tqdm=False)
    rates, batch_rates, before = [], [], spec_counters(llm)
    if cfg.name.startswith("ours"):
        llm.collective_rpc("eagle_stats", kwargs={"reset": True})     # counters of this cell from 0
    wall = 0.0
    for _ in range(reps):
        n_steady, t_steady, n, dt = closed_loop(llm, prompts, bs, sp)
        wall += dt
        rates.append(n_steady / t_steady)
        batch_rates.append(n / dt)
    after = spec_counters(llm)
    out = {"tokens_per_s": statistics.median(rates), "tokens_per_s_reps": [round(r, 2) for r in rates],
           "batch_tokens_per_s": statistics.median(batch_rates)}
    if cfg.k and after.get("drafts"):
        drafts = after["drafts"] - before.get("drafts", 0)
        acc = after["accepted_tokens"] - before.get("accepted_tokens", 0)
        per_pos = [a - b for a, b in zip(after["accepted_tokens_per_pos"],
                                         before.get("accepted_tokens_per_pos", [0] * cfg.k))]
        out["tau"] = 1 + acc / max(1, drafts)
        out["per_position_acceptance"] = [round(p / max(1, drafts), 4) for p in per_pos]
    if cfg.name.startswith("ours"):
        out["depth"] = cfg.depth
        st = llm.collective_rpc("eagle_stats", kwargs={"reset": True})[0]
        out["step_ms"] = 1000 * wall / max(1, st["steps"])
        out["draft_ms"] = 1000 * st["draft_s"] / max(1, st["steps"])
        out["stage_ms"] = {k: round(1000 * st[f"{k}_s"] / max(1, st["steps"]), 3)
                           for k in ("draft", "mask", "tree_attention", "accept", "kv_commit")}
        out["gated_share"] = round(st["gated_steps"] / max(1, st["steps"]), 3)
        if st["trees_verified"]:
            out["recomputed_share"] = round(st["trees_recomputed"] / st["trees_verified"], 3)
    elif cfg.name.startswith("vanilla"):
        out["step_ms"] = 1000 * wall / (reps * -(-len(prompts) // bs) * max_tokens)
    return out


@dataclass
class ServeRow:
    config: str
    concurrency: int
    requests: int
    max_tokens: int
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float
    speedup: float | None = None
    tau: float | None = None


def serve_rows(target: str, head: str, k: int, concurrencies: list[int], prompts: list[str], max_tokens: int,
               dtype: str, log_dir: str) -> list[ServeRow]:
    """Each config behind `vllm serve` on 127.0.0.1, streaming load at each concurrency (a warm-up request first)."""
    from .serving import Server, load, post, spec_metrics
    common = ("--dtype", dtype, "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
              "--no-enable-prefix-caching")
    method = native_method(head)
    cfgs = {"vanilla": (), f"native-{method}-k{k}": ("--speculative-config", json.dumps(
                {"method": method, "model": head, "num_speculative_tokens": k})),
            f"ours-chain-k{k}": ("--speculative-model", head, "--num-speculative-tokens", str(k))}
    rows = []
    for name, extra in cfgs.items():
        print(f"[bench] serve {name}", flush=True)
        with Server(target, *common, *extra, log=os.path.join(log_dir, f"serve-{name}.log")) as srv:
            post(srv.url + "/v1/completions", {"model": target, "prompt": prompts[0], "max_tokens": 16})  # warm-up
            for c in concurrencies:
                before = spec_metrics(srv.url)
                m = load(srv.url, target, prompts[: max(2 * c, 4)], c, max_tokens)
                after = spec_metrics(srv.url)
                drafts = after.get("drafts", 0) - before.get("drafts", 0)
                tau = 1 + (after["accepted_tokens"] - before["accepted_tokens"]) / drafts if drafts else None
                rows.append(ServeRow(name, c, m["requests"], max_tokens, round(m["ttft_ms"], 1), round(m["tpot_ms"], 2),
                                     round(m["tokens_per_s"], 2), tau=tau and round(tau, 3)))
                print(f"[bench]   c={c}: {m['tokens_per_s']:.1f} tok/s, TTFT {m['ttft_ms']:.0f} ms, "
                      f"TPOT {m['tpot_ms']:.1f} ms", flush=True)
    base = {r.concurrency: r for r in rows if r.config == "vanilla"}
    for r in rows:
        r.speedup = round(r.tokens_per_s / base[r.concurrency].tokens_per_s, 3)
    return rows


def serve_markdown(rows: list[ServeRow]) -> str:
    return ("\n\nServing (`vllm serve` on 127.0.0.1, streaming completions, ignore_eos):\n\n"
            "| concurrency | config | tok/s | speedup | TTFT ms | TPOT ms | τ |\n|---|---|---|---|---|---|---|\n"
            + "".join(f"| {r.concurrency} | {r.config} | {r.tokens_per_s:.1f} | {r.speedup:.2f}× | {r.ttft_ms:.0f} | "
                      f"{r.tpot_ms:.1f} | {'–' if r.tau is None else format(r.tau, '.2f')} |\n" for r in rows))


def fill_cost_model(rows: list[Row], raw: dict) -> None:
    base = {(r.workload, r.temperature, r.batch_size, r.round): r for r in rows if r.config == "vanilla"}
    for r in rows:
        b = base.get((r.workload, r.temperature, r.batch_size, r.round))
        if b is None:
            continue
        r.speedup = round(r.tokens_per_s / b.tokens_per_s, 3)
        if r.batch_tokens_per_s and b.batch_tokens_per_s:
            r.batch_speedup = round(r.batch_tokens_per_s / b.batch_tokens_per_s, 3)
        extra = raw.get(id(r), {})
        if r.config.startswith("ours") and b.step_ms and r.step_ms:
            r.draft_cost_c = round(extra["draft_ms"] / (extra["depth"] * b.step_ms), 3)
            r.verify_cost_v = round((r.step_ms - extra["draft_ms"]) / b.step_ms, 3)
            # The cost model's speedup for the shape: what it gives when every step emits tau tokens per request;
            # depth * c + v = step / vanilla step. It exceeds the measured speedup by prefill steps and a static
            # batch's ramp-down. Only for rows where every step drafted: under the gate, c and v average drafted and
            # plain steps while tau counts drafted ones. E.g. tau 1.59, c 0.075, depth 2, v 1.115 -> 1.59 / 1.265.
            r.limit = round(r.tau * b.step_ms / r.step_ms, 3) if r.tau and not extra.get("gated_share") else None


def combine_rounds(rows: list[Row]) -> list[Row]:
    """Rows of several rounds -> one row per cell (config, workload, T, batch size), round -1: medians over rounds
    of every number (speedups: of the per-round ratios); tokens_per_s_reps lists the rounds' tok/s. E.g. vanilla
    30 / 40 tok/s and ours 33 / 48 in rounds 0 / 1 -> ours 40.5 tok/s, speedup median(1.10, 1.20) = 1.15."""
    med = lambda xs: None if any(x is None for x in xs) else round(statistics.median(xs), 3)   # noqa: E731
    cells: dict[tuple, list[Row]] = {}
    for r in rows:
        cells.setdefault((r.config, r.workload, r.temperature, r.batch_size), []).append(r)
    out = []
    for rs in cells.values():
        r0 = rs[0]
        per_pos = None if r0.per_position_acceptance is None else [
            med(list(p)) for p in zip(*(r.per_position_acceptance for r in rs))]
        stage = None if r0.stage_ms is None else {k: med([r.stage_ms[k] for r in rs]) for k in r0.stage_ms}
        out.append(Row(r0.config, r0.workload, r0.temperature, r0.batch_size, r0.num_prompts, r0.max_tokens,
                       med([r.tokens_per_s for r in rs]), [r.tokens_per_s for r in rs],
                       med([r.speedup for r in rs]), med([r.tau for r in rs]), per_pos,
                       med([r.draft_cost_c for r in rs]), med([r.verify_cost_v for r in rs]),
                       med([r.step_ms for r in rs]), stage, med([r.gated_share for r in rs]),
                       med([r.batch_tokens_per_s for r in rs]), med([r.batch_speedup for r in rs]),
                       med([r.limit for r in rs]), recomputed_share=med([r.recomputed_share for r in rs]), round=-1))
    return out


def shown_rows(rows: list[Row]) -> list[Row]:
    """What the table and plots show: the rows, or their medians over rounds when there are several rounds."""
    return combine_rounds(rows) if len({r.round for r in rows}) > 1 else rows


def own_share(r: Row) -> float | None:
    """Share of the step in our own code: drafting (the head's forwards, its KV) + masks + tree attention + acceptance
    + KV compaction (the runner's Python glue around vLLM's own is not split out here: see benchmarks/profile_b1.py)."""
    return None if not r.stage_ms or not r.step_ms else sum(r.stage_ms.values()) / r.step_ms


def markdown(rows: list[Row], env: dict, cmd: str) -> str:
    head = ("| workload | T | bs | config | tok/s | speedup | whole-run speedup | τ | per-position acceptance | c | v(K) | "
            "limit τ/(d·c+v) | step ms | ours: draft / mask / tree attn / accept / KV commit ms per step | own % | "
            "gated | trees recomputed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda x, f: "–" if x is None else format(x, f)
    body = "".join(
        f"| {r.workload} | {r.temperature:g} | {r.batch_size} | {r.config} | {r.tokens_per_s:.1f} | "
        f"{fmt(r.speedup, '.2f')}× | {fmt(r.batch_speedup, '.2f')}× | {fmt(r.tau, '.2f')} | "
        f"{', '.join(f'{p:.2f}' for p in r.per_position_acceptance) if r.per_position_acceptance else '–'} | "
        f"{fmt(r.draft_cost_c, '.3f')} | {fmt(r.verify_cost_v, '.2f')} | {fmt(r.limit, '.2f')}× | "
        f"{fmt(r.step_ms, '.1f')} | {' / '.join(f'{v:.1f}' for v in r.stage_ms.values()) if r.stage_ms else '–'} | "
        f"{fmt(own_share(r), '.0%')} | {fmt(r.gated_share, '.0%')} | {fmt(r.recomputed_share, '.0%')} |\n" for r in rows)
    return (f"Command: `{cmd}`  \nHardware: {env['cpu']}, {env['cores']} cores, no GPU; vLLM {env['vllm']}, torch "
            f"{env['torch']}, Python {env['python']}; commit {env['commit']}; {env['date']}.  \n"
            + ("tok/s = median of the timed repetitions; speedup vs vanilla (run first) in the same run; "
               if rows and rows[0].round >= 0 else
               "tok/s = median over rounds of each round's median repetition; speedup = median over rounds of the "
               "ratio to that round's vanilla (run first in each round); ")
            + "vanilla-end = vanilla run again last (its speedup = the machine's drift during a round).\n\n"
            + head + body)


def plots(rows: list[Row], stem: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for (wl, temp) in sorted({(r.workload, r.temperature) for r in rows}):
        sel = [r for r in rows if r.workload == wl and r.temperature == temp]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for cfg in sorted({r.config for r in sel}):
            rs = sorted((r for r in sel if r.config == cfg), key=lambda r: r.batch_size)
            bss = [r.batch_size for r in rs]
            axes[0].plot(bss, [r.speedup or 0 for r in rs], marker="o", label=cfg)
            axes[1].plot(bss, [r.tokens_per_s for r in rs], marker="o", label=cfg)
            pp = next((r.per_position_acceptance for r in rs if r.per_position_acceptance), None)
            if pp:
                axes[2].plot(range(1, len(pp) + 1), pp, marker="o",
                             label=f"{cfg} (τ={statistics.mean(r.tau for r in rs if r.tau):.2f})")
        axes[0].axhline(1.0, color="gray", lw=0.8)
        for ax, title, xl in ((axes[0], "speedup vs vanilla", "batch size"), (axes[1], "tokens/s", "batch size"),
                              (axes[2], "per-position acceptance (mean over batch sizes' first)", "draft position")):
            ax.set_title(title)
            ax.set_xlabel(xl)
            ax.grid(alpha=0.3)
        axes[0].set_xscale("log", base=2)
        axes[1].set_xscale("log", base=2)
        axes[0].legend(fontsize=7)
        axes[2].legend(fontsize=7)
        fig.suptitle(f"{wl}, temperature {temp:g}")
        fig.tight_layout()
        path = f"{stem}-{wl}-t{temp:g}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def save(stem: str, env: dict, cmd: str, target: str, head: str, rows: list[Row], srows: list) -> str:
    """Write STEM.json (raw rows; with several rounds also the per-cell medians) and STEM.md (the table, of the
    medians when there are several rounds); returns the markdown."""
    shown = shown_rows(rows)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "command": cmd, "target": target, "head": head,
                   "rows": [asdict(r) for r in rows], "combined_rows": [asdict(r) for r in shown if r.round == -1],
                   "serve_rows": [asdict(r) for r in srows]}, f, indent=1)
    md = markdown(shown, env, cmd) + (serve_markdown(srows) if srows else "")
    with open(stem + ".md", "w") as f:
        f.write(md)
    return md


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke check: MT-Bench, greedy, bs 1 (2 prompts) and 8, 64 tokens, K=2, no static tree")
    p.add_argument("--target")
    p.add_argument("--head")
    p.add_argument("--workloads", nargs="+", default=["mtbench", "humaneval", "sharegpt"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--ks", nargs="+", type=int, default=[2, 3])
    p.add_argument("--configs", nargs="+", default=["ngram", "native", "ours"])
    p.add_argument("--trees", nargs="*", default=[DEFAULT_TREE], help="static trees (path tuples) for ours")
    p.add_argument("--dynamic", nargs="*", default=["4,4,8"], metavar="DEPTH,TOP_K,TOTAL",
                   help="EAGLE-2 dynamic trees for ours")
    p.add_argument("--lookups", nargs="*", type=int, default=[4], metavar="N",
                   help="prompt-lookup draft lengths for the 'lookup' configuration (ours + lookup=N)")
    p.add_argument("--confidences", nargs="*", type=float, default=[0.2], metavar="P",
                   help="min_confidence values for the 'confident' configuration (ours, chains cut below P)")
    p.add_argument("--fixed", action="store_true", help="also run ours with adaptive=False (cost model per shape)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompts-per-batch", type=int, default=2, help="prompts per run = max(bs * this, --min-prompts)")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over all configurations; speedups against each round's own vanilla, medians shown")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--serve-concurrency", nargs="*", type=int, default=[1, 4, 16],
                   help="vllm serve runs at these concurrencies (MT-Bench prompts, first K); none to skip")
    a = p.parse_args(argv)
    if a.quick:
        a.workloads, a.batch_sizes, a.temperatures, a.ks, a.max_tokens = ["mtbench"], [1, 8], [0.0], [2], 64
        a.serve_concurrency, a.prompts_per_batch, a.min_prompts, a.trees = [], 1, 2, []
    import vllm_eagle
    from transformers import AutoTokenizer
    from vllm import LLM
    target, head = a.target or vllm_eagle.default_target(), a.head or vllm_eagle.default_head()
    need = max(max(a.batch_sizes) * a.prompts_per_batch, a.min_prompts)
    wls = workloads(AutoTokenizer.from_pretrained(target), a.workloads, need)
    rows, raw = [], {}
    env = environment()
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{time.strftime('%Y-%m-%d')}-{env['commit']}{'-quick' if a.quick else ''}")
    cmd = "python -m benchmarks.run " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    dynamic = [tuple(int(x) for x in d.split(",")) for d in a.dynamic]
    cfgs = configs(head, a.ks, a.configs, a.trees, dynamic, a.fixed, a.lookups, a.confidences)
    for rnd, cfg in [(r, c) for r in range(a.rounds) for c in cfgs]:
        print(f"[bench] {cfg.name}" + (f" (round {rnd + 1}/{a.rounds})" if a.rounds > 1 else ""), flush=True)
        llm = LLM(model=target, dtype=a.dtype, max_model_len=2048, enforce_eager=True, disable_log_stats=False,
                  max_num_seqs=max(a.batch_sizes), seed=0, **{"enable_prefix_caching": False, **cfg.spec})
        from vllm import SamplingParams
        llm.generate(wls[next(iter(wls))][:2], SamplingParams(max_tokens=16), use_tqdm=False)   # warm-up
        for wl, prompts in wls.items():
            for temp in a.temperatures:
                for bs in a.batch_sizes:
                    n = max(bs * a.prompts_per_batch, a.min_prompts)
                    m = measure(llm, cfg, prompts[:n], bs, temp, a.max_tokens, a.reps)
                    row = Row(cfg.name, wl, temp, bs, n, a.max_tokens, round(m["tokens_per_s"], 2),
                              m["tokens_per_s_reps"], tau=m.get("tau") and round(m["tau"], 3),
                              per_position_acceptance=m.get("per_position_acceptance"),
                              step_ms=m.get("step_ms") and round(m["step_ms"], 2), stage_ms=m.get("stage_ms"),
                              gated_share=m.get("gated_share"), recomputed_share=m.get("recomputed_share"),
                              batch_tokens_per_s=round(m["batch_tokens_per_s"], 2), round=rnd)
                    raw[id(row)] = m
                    rows.append(row)
                    print(f"[bench]   {wl} T={temp:g} bs={bs}: {row.tokens_per_s:.1f} tok/s"
                          + (f", tau {row.tau:.2f}" if row.tau else ""), flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        fill_cost_model(rows, raw)
        save(stem, env, cmd, target, head, rows, [])         # partial results survive an interrupted run
    srows = []
    if a.serve_concurrency:
        from transformers import AutoTokenizer as _Tok
        from vllm_eagle.assets import chat_prompts, mtbench_questions
        sprompts = chat_prompts(_Tok.from_pretrained(target), [q["turns"][0] for q in mtbench_questions()])
        srows = serve_rows(target, head, a.ks[0], a.serve_concurrency, sprompts, a.max_tokens, a.dtype, a.out)
    md = save(stem, env, cmd, target, head, rows, srows)
    pngs = plots(shown_rows(rows), stem)
    print(md)
    print(f"[bench] wrote {stem}.json, {stem}.md, " + ", ".join(pngs))
    return rows


if __name__ == "__main__":
    main()
