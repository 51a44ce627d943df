"""The draft stage against a from-scratch reference: commit entries, then roll out, recomputing attention over the
whole entry sequence each depth (no cache), in fp32."""
import numpy as np
import torch

from vllm_eagle.draft import commit_entries, draft_chain
from vllm_eagle.draft_head import EagleHead, HeadConfig, attend
from vllm_eagle.draft_kv import DraftKVCache
from vllm_eagle.features import FeatureBatch

CFG = HeadConfig(hidden_size=48, intermediate_size=96, num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=37,
                 rms_norm_eps=1e-6, rope_theta=10000.0)


def reference_drafts(head, embed_w, lm_w, feats, tokens, k):
    """feats [p+1, H] true features f_0..f_p; tokens [p+2] t_0..t_{p+1} -> k greedy draft ids."""
    entry_f, entry_t = list(feats), list(tokens[1:])
    out = []
    for _ in range(k):
        n = len(entry_f)
        x = head.project(embed_w[torch.tensor(entry_t)], torch.stack(entry_f))
        q, kk, v = head.qkv(x, torch.arange(n))
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
        g = head.finish(x, attend(q[None], kk[None], v[None], causal)[0])[-1]
        tok = int((g @ lm_w.T).argmax())
        out.append(tok)
        entry_f.append(g)
        entry_t.append(tok)
    return out


def test_commit_and_chain_match_reference():
    torch.manual_seed(0)
    head = EagleHead(CFG).eval()
    embed_w, lm_w = torch.randn(37, 48), torch.randn(37, 48)
    # Three rows: a decode row that accepted 1 of 2 drafts, a full prefill, and a mid-prefill chunk (no drafts).
    lens = {"a": 9, "b": 5, "c": 12}
    seqs = {r: torch.randint(0, 37, (n + 2,)) for r, n in lens.items()}
    feats = {r: torch.randn(n + 1, 48) for r, n in lens.items()}
    kv = DraftKVCache(CFG.num_kv_heads, CFG.head_dim, torch.float32)
    # Earlier steps committed a[0..6] and c[0..3].
    for r, upto in (("a", 7), ("c", 4)):
        fb0 = FeatureBatch([r], feats[r][:upto], None, np.array([0, upto]), np.array([0]), np.array([upto]),
                           np.array([False]), seqs[r][None].numpy(), set(), 2)
        commit_entries(head, kv, fb0, lambda t: embed_w[t])
    # This step: a scheduled positions 7..9 (accepted 1 -> 2 committed), b 0..5 (6 committed), c 4..7 (4 committed).
    rows = [("a", 7, 3, 2, True), ("b", 0, 6, 6, True), ("c", 4, 4, 4, False)]
    feat_rows = [feats[r][s:s + n] for r, s, n, _, _ in rows]
    qs = np.concatenate([[0], np.cumsum([n for _, _, n, _, _ in rows])])
    token_ids = np.zeros((3, 16), dtype=np.int64)
    for i, (r, *_) in enumerate(rows):
        token_ids[i, : len(seqs[r])] = seqs[r].numpy()
    fb = FeatureBatch(["a", "b", "c"], torch.cat(feat_rows), None, qs, np.array([7, 0, 4]), np.array([2, 6, 4]),
                      np.array([True, True, False]), token_ids, {"zzz"}, 3)
    with torch.no_grad():
        x, last = commit_entries(head, kv, fb, lambda t: embed_w[t])
        assert last.tolist() == [1, 7, 11]
        pos_last = np.array([8, 5])
        got = draft_chain(head, kv, ["a", "b"], x[torch.from_numpy(last[:2])], pos_last, 3,
                          lambda t: embed_w[t], lambda h: (h @ lm_w.T).argmax(-1))
        for b, (r, p) in enumerate((("a", 8), ("b", 5))):
            want = reference_drafts(head, embed_w, lm_w, feats[r][: p + 1], seqs[r][: p + 2], 3)
            assert got[b].tolist() == want, r
