"""Synthetic models for tests and benchmarks: tiny random targets (Llama, Qwen2/3, Mistral, Gemma-3) with an offline
BPE tokenizer, random EAGLE-1 heads, and the oracle pair (a target whose layers are identities and a head that
provably drafts its next token)."""
from __future__ import annotations

import glob
import json
import os

import torch


# Tiny random targets per architecture: (transformers config class, model class, config fields beyond the shared
# ones). Each exercises what sets its family apart in vLLM: Qwen2 (q/k/v bias, tied embedding), Qwen3 (q/k norm, a
# head_dim other than hidden / heads), Mistral (every layer sliding-window), Gemma-3 (scaled embedding, sliding and
# full layers mixed, query_pre_attn_scalar, (1 + w) norms, tied embedding), Gemma-2 (the same, plus attention logits
# soft-capped: at 2, so the cap bends this tiny model's logits).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=48)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(tie_word_embeddings=True, sliding_window=16, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"])),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(tie_word_embeddings=True, sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    layer_types=["sliding_attention", "full_attention"])),
}


def make_tiny_target(out: str, arch: str = "llama", hidden: int = 128, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, vocab: int = 1024, seed: int = 0, **config) -> str:
    """A random `arch` model (ARCHITECTURES) in `out` with an offline BPE tokenizer (config= adds config fields, e.g.
    rope_parameters), reused if already there."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:60]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>")
    hf_tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    hf_tok.save_pretrained(out)
    torch.manual_seed(seed)
    config_cls, model_cls, fields = ARCHITECTURES[arch]
    cfg = getattr(transformers, config_cls)(
        **{**dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  max_position_embeddings=2048, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                  pad_token_id=hf_tok.pad_token_id), **fields, **config})
    getattr(transformers, model_cls)(cfg).save_pretrained(out)
    return out


def make_random_head(target: str, out: str, seed: int = 1, **override) -> str:
    """A random EAGLE-1 head for `target` (override= changes config fields, to build mismatched heads)."""
    from vllm_eagle.draft_head import EagleHead, HeadConfig
    from vllm_eagle.train.train_head import export
    with open(os.path.join(target, "config.json")) as f:
        tc = json.load(f)
    tc = {**tc, **override}
    torch.manual_seed(seed)
    export(EagleHead(HeadConfig.from_hf_dict(tc)), tc, out, "random test head\n")
    return out


def make_oracle_pair(target: str, out_root: str) -> tuple[str, str]:
    """-> (target_id, oracle_head). target_id: `target` with every o_proj/down_proj zeroed, so each layer is the
    identity and its next token is argmax(lm_head(norm(embed(t)))). oracle_head: fc = [I | 0] and zeroed
    o_proj/down_proj, so its predicted feature is embed(t) and (norm weights being ones) it drafts the same token."""
    from safetensors.torch import load_file, save_file
    from vllm_eagle.draft_head import EagleHead, HeadConfig
    from vllm_eagle.train.train_head import export
    tid, hid = os.path.join(out_root, "target-id"), os.path.join(out_root, "oracle-head")
    if not os.path.isfile(os.path.join(tid, "model.safetensors")):
        os.makedirs(tid, exist_ok=True)
        for f in os.listdir(target):
            if not f.endswith(".safetensors"):
                with open(os.path.join(target, f), "rb") as src, open(os.path.join(tid, f), "wb") as dst:
                    dst.write(src.read())
        state = load_file(os.path.join(target, "model.safetensors"))
        state = {k: torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v
                 for k, v in state.items()}
        # Sharpen both models' next-token distributions (argmax unchanged: the target's final norm undoes the embedding
        # scale) so draft confidences separate rank 0 from the rest, as a trained head's do; EAGLE-2 trees then grow
        # deep along the oracle's path.
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 50
        state["lm_head.weight"] = state["lm_head.weight"] * 100
        save_file(state, os.path.join(tid, "model.safetensors"), metadata={"format": "pt"})
    if not os.path.isfile(os.path.join(hid, "model.safetensors")):
        with open(os.path.join(target, "config.json")) as f:
            tc = json.load(f)
        head = EagleHead(HeadConfig.from_hf_dict(tc))
        H = head.cfg.hidden_size
        with torch.no_grad():
            head.fc.weight.copy_(torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1))
            head.o_proj.weight.zero_()
            head.down_proj.weight.zero_()
        export(head, tc, hid, "oracle test head\n")
    return tid, hid


def make_eagle3_head(target: str, out: str, layers: tuple[int, ...], oracle: bool = False, draft_vocab: int = 0,
                     seed: int = 1) -> str:
    """An EAGLE-3 head for `target` fusing `layers`, in vLLM's layout. Random weights, or (oracle=True, for a
    target-id of make_oracle_pair) a head that drafts that target's next token exactly: its attention is one-hot on
    the entry itself (q = k = c * input_layernorm(embedding), one KV head per query head), v carries the embedding,
    the residual is hidden_norm(feature) = 0 (hidden_norm weight 0, norm_before_residual), the MLP adds nothing,
    and its own lm_head is the target's, so it scores norm(embedding) as the identity target does.
    draft_vocab=D > 0: a random head over the first D token ids plus d2t (random heads only)."""
    from safetensors.torch import load_file
    from vllm_eagle.draft_head import Eagle3Head, HeadConfig
    from vllm_eagle.train.train_head import export
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    with open(os.path.join(target, "config.json")) as f:
        tc = json.load(f)
    base = HeadConfig.from_hf_dict(tc)
    H = base.hidden_size
    cfg = HeadConfig(**{**base.__dict__, "num_kv_heads": base.num_heads if oracle else base.num_kv_heads,
                        "eagle3": True, "draft_vocab_size": draft_vocab or base.vocab_size, "target_hidden_size": H,
                        "aux_layers": tuple(layers), "norm_before_residual": oracle})
    torch.manual_seed(seed)
    head = Eagle3Head(cfg)
    with torch.no_grad():
        if draft_vocab:                    # draft id i -> target id 2 i (an offset table that is not all zeros)
            head.d2t.copy_(torch.arange(draft_vocab))
        if oracle:
            lm = load_file(os.path.join(target, "model.safetensors"))["lm_head.weight"]
            eye = torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1)           # reads input_layernorm(embedding)
            head.q_proj.weight.copy_(10 * eye)
            head.k_proj.weight.copy_(10 * eye)
            head.v_proj.weight.copy_(eye)
            head.o_proj.weight.copy_(torch.eye(H))
            head.down_proj.weight.zero_()
            head.hidden_norm.zero_()
            head.lm_head.weight.copy_(lm)
    export(head, tc, out, "EAGLE-3 test head\n")
    return out


def write_loop_data(path) -> str:
    """A 40-record JSONL of {"prompt", "answer"} (short loops) that the tiny training presets learn from."""
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"write a loop number {i}",
                                "answer": "for i in range(10):\n    print(i)\n" * (1 + i % 3)}) + "\n")
    return str(path)
