"""The benchmark harness on a tiny in-process configuration writes well-formed rows (schema, not timings)."""
import json
import os

import pytest

from benchmarks.run import Row, combine_rounds, fill_cost_model, main


@pytest.mark.slow
def test_harness_rows_are_well_formed(oracle, tmp_path):
    target, head = oracle
    rows = main(["--target", target, "--head", head, "--workloads", "humaneval", "--batch-sizes", "1", "2",
                 "--temperatures", "0", "--ks", "2", "--max-tokens", "8", "--reps", "1", "--out", str(tmp_path),
                 # ngram imports numba/llvmlite, whose objects crash vLLM 0.32's kernel-dispatcher scan when a later
                 # engine starts in the same process (in-process tests only; benchmarks run engines multiprocess).
                 "--configs", "native", "ours", "--serve-concurrency", "--trees", "[(0,), (1,), (0, 0)]",
                 "--dynamic", "2,2,3", "--fixed"])
    files = sorted(os.listdir(tmp_path))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1 and any(f.endswith(".md") for f in files) and any(f.endswith(".png") for f in files)
    data = json.load(open(tmp_path / js[0]))
    assert {"commit", "cpu", "vllm", "torch", "threads"} <= set(data["environment"])
    ours_names = ("ours-chain-k2", "ours-tree-n3-d2", "ours-dynamic-n3-d2-k2")
    assert [r["config"] for r in data["rows"]] == [c for c in ("vanilla", "native-eagle-k2", *ours_names,
                                                                *(n + "-fixed" for n in ours_names), "vanilla-end")
                                                 for _ in (1, 2)]
    fields = set(Row.__dataclass_fields__)
    for r in data["rows"]:
        assert set(r) == fields
        assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_reps"]) == 1 and r["speedup"] > 0
        if r["config"].startswith("vanilla"):
            assert r["tau"] is None and (r["speedup"] == 1.0 or r["config"] == "vanilla-end")
        else:
            assert 1.0 <= r["tau"] <= 3.0 and len(r["per_position_acceptance"]) in (2, 3)
    ours = [r for r in data["rows"] if r["config"].startswith("ours")]
    assert all(r["tau"] > 2.0 for r in ours)                               # the oracle head is accepted
    assert all(r["draft_cost_c"] > 0 and r["verify_cost_v"] > 0 for r in ours)
    assert all(0 <= r["gated_share"] <= 1 for r in ours)
    assert all(r["gated_share"] == 0 for r in ours if r["config"].endswith("-fixed"))
    # the shape's cost model: only where every step drafted (under the gate c and v mix plain steps in)
    assert all(r["limit"] > 0 for r in ours if r["config"].endswith("-fixed"))
    assert all(r["limit"] is None for r in ours if r["gated_share"] > 0)
    for r in ours:                                           # per-stage cost of our own code
        assert set(r["stage_ms"]) == {"draft", "mask", "tree_attention", "accept", "kv_commit"}
        trees = "tree" in r["config"] or "dynamic" in r["config"]
        assert r["stage_ms"]["draft"] > 0 and (r["stage_ms"]["accept"] > 0) == trees, r
    assert len(rows) == len(data["rows"])


@pytest.mark.slow
def test_interleaved_b1_rows_are_well_formed(oracle, tmp_path):
    from benchmarks.interleaved import main as interleaved
    target, head = oracle
    rows = interleaved(["--target", target, "--head", head, "--trees", "[(0,), (1,), (0, 0)]", "--prompts", "2",
                        "--max-tokens", "8", "--reverse-start", "--out", str(tmp_path)])
    assert [r["config"] for r in rows] == ["vanilla", "vanilla-2", "ours-chain-k2", "ours-tree-n3-d2"]  # created reversed
    data = json.load(open(next(tmp_path.glob("*-interleaved-b1.json"))))
    assert data["rows"] == rows and len(data["seconds"]) == 4 and all(len(s) == 2 for s in data["seconds"])
    assert (tmp_path / next(tmp_path.glob("*.json")).name.replace(".json", ".md")).is_file()
    assert rows[0]["speedup"] == 1.0 and all(r["speedup"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    for r in rows[2:]:
        assert r["tau"] > 2.0                                          # the oracle head is accepted
        assert set(r["stage_ms"]) == {"draft", "mask", "tree_attention", "accept", "kv_commit"}
        assert (r["stage_ms"]["accept"] > 0) == ("tree" in r["config"]), r
    assert "vs_chain" not in rows[2] and rows[3]["vs_chain"]["of"] == 2 and 0 <= rows[3]["vs_chain"]["won"] <= 2
    assert rows[3]["vs_chain"]["median"] > 0


def test_kernel_microbenchmarks_run_on_the_shared_references():
    from benchmarks.kernels import main as kernels_main
    rows = kernels_main(["--reps", "1"])
    assert {r["kernel"] for r in rows} == {"build_tree_masks", "tree_accept", "gather_kv", "tree attention layer",
                                           "draft fc", "draft qkv", "draft o", "draft gate_up", "draft down", "draft draft_lm_head",
                                           "target GEMMs, one forward"}
    assert [r["shape"] for r in rows if r["kernel"].startswith("target")] == [f"bf16 T={t}" for t in (1, 2, 3, 8, 16, 24)]
    assert all(r["reference_us"] > 0 and r["wrapper_us"] > 0 for r in rows)


def test_rounds_pair_each_speedup_with_its_own_rounds_vanilla():
    """--rounds: the machine drifts between rounds; speedups are per-round ratios, the table their median."""
    def row(cfg, rnd, tps, tau=None):
        return Row(cfg, "mtbench", 0.0, 1, 4, 96, tps, [tps], tau=tau,
                   per_position_acceptance=None if tau is None else [tau - 1], batch_tokens_per_s=tps, round=rnd)
    rows = [row("vanilla", 0, 30.0), row("ours-chain-k3", 0, 33.0, 1.6),
            row("vanilla", 1, 40.0), row("ours-chain-k3", 1, 48.0, 1.8),
            row("vanilla", 2, 50.0), row("ours-chain-k3", 2, 57.5, 1.7)]
    fill_cost_model(rows, {})
    assert [r.speedup for r in rows] == [1.0, 1.1, 1.0, 1.2, 1.0, 1.15]
    van, ours = combine_rounds(rows)
    assert (van.config, van.speedup, van.tokens_per_s_reps, van.round) == ("vanilla", 1.0, [30.0, 40.0, 50.0], -1)
    # median of the paired ratios (1.15), not the ratio of medians (48 / 40 = 1.2)
    assert (ours.tokens_per_s, ours.speedup, ours.tau, ours.per_position_acceptance) == (48.0, 1.15, 1.7, [0.7])
    assert ours.batch_speedup == 1.15                         # the whole-run rate pairs by round the same way


def test_closed_loop_refills_the_batch_and_ends_the_steady_state_at_the_first_unreplaced_finish():
    """Requests finish after 2, 3, 2, 4 steps (one token per step), 2 in flight: r0, r1 start; r0 ends at step 2 and r2
    takes its place; r1 ends at step 3, r3 starts; r2 ends at step 4 with the queue empty: steady state = 4 steps with
    2 + 3 + 2 + 1 = 8 tokens; then r3 alone until step 7: 11 tokens in all."""
    from types import SimpleNamespace

    from benchmarks.run import closed_loop

    class Engine:
        def __init__(self, lengths):
            self.lengths, self.live, self.steps = lengths, {}, 0

        def add_request(self, rid, prompt, sp):
            self.live[rid] = 0

        def step(self):
            self.steps += 1
            out = []
            for rid in list(self.live):
                self.live[rid] += 1
                done = self.live[rid] == self.lengths[rid]
                out.append(SimpleNamespace(request_id=rid, finished=done,
                                           outputs=[SimpleNamespace(token_ids=[0] * self.live[rid])]))
                if done:
                    del self.live[rid]
            return out

    engine = Engine({"bench-0": 2, "bench-1": 3, "bench-2": 2, "bench-3": 4})
    steady_tokens, _, tokens, _ = closed_loop(SimpleNamespace(llm_engine=engine), ["a", "b", "c", "d"], 2, None)
    assert (steady_tokens, tokens, engine.steps) == (8, 11, 7)


def test_spec_metrics_parse_vllm_counters():
    from benchmarks.serving import parse_spec_metrics
    text = "\n".join([
        "# TYPE vllm:spec_decode_num_drafts_total counter",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 12.0',
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 3.0',
        "# TYPE vllm:spec_decode_num_accepted_tokens_total counter",
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 7.0',
        "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter",
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 5.0',
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0"} 2.0', ""])
    assert parse_spec_metrics(text) == {"drafts": 15.0, "accepted_tokens": 7.0}
