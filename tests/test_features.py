"""Features stage: for every committed position of every request, under continuous batching and chunked prefill, the
proposer receives exactly the target's final-norm hidden state (and, with feature_layers, the requested intermediate
layers), as HF transformers computes them for the final token sequence (fp32)."""
import pytest
import torch
from conftest import close, make_llm
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.proposer import EagleProposer


@pytest.mark.parametrize("shape", [dict(num_speculative_tokens=3),
                                   dict(tree="[(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]", adaptive=False)])
def test_features_reach_the_proposer_for_every_committed_position(tiny, oracle, monkeypatch, shape):
    """Chains, and trees: there the committed entries are the accepted path's nodes, not the first nodes in node order
    (the oracle accepts first children: path [0, 1, 3, 5] of the tree's nodes [(), (0,), (1,), (0, 0), (1, 0), ...])."""
    target, head = oracle                      # an accepting head: steps commit several positions at once
    seen = {}                                  # req_id -> {position: (feature, aux)}
    orig = EagleProposer._propose_step

    def spy(self, fb):
        for r, rid in enumerate(fb.req_ids):
            for i in range(int(fb.num_committed[r])):
                row = int(fb.query_start[r]) + (int(fb.tree_paths[r][i]) if r in fb.tree_paths else i)
                seen.setdefault(rid, {})[int(fb.start_pos[r]) + i] = (fb.features[row].clone(),
                                                                      fb.aux_features[row].clone())
        return orig(self, fb)

    monkeypatch.setattr(EagleProposer, "_propose_step", spy)
    prompts = ["def main(" * 9, "import os", "class Foo:" * 12, "for i in range("]
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, **shape, feature_layers=(0, 1)),
                   max_num_batched_tokens=32, max_num_seqs=3)     # chunked prefill, requests join mid-flight
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    close(llm)

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assert len(seen) == len(prompts), sorted(seen)
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        with torch.no_grad():
            hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        got = seen[next(k for k in seen if k.split("-")[0] == o.request_id)]
        # Every position whose next token is known was committed (the final step may commit a few more, for tokens
        # that max_tokens then trims from the output).
        n = len(ids) - 1
        assert set(range(n)) <= set(got) and max(got) < n + 4, (o.request_id, sorted(got))
        feats = torch.stack([got[p][0] for p in range(n)])
        aux = torch.stack([got[p][1] for p in range(n)])
        torch.testing.assert_close(feats, hs[-1][0, :n], rtol=1e-4, atol=1e-4)          # final-norm output
        torch.testing.assert_close(aux, torch.cat([hs[0][0, :n], hs[1][0, :n]], -1), rtol=1e-4, atol=1e-4)
