"""EAGLE-1 draft head: fc([embed(token); feature]) -> one Llama decoder layer (no input norm) -> shared LM head.

Vocabulary used across vllm_eagle:
  feature   f_p: the target's hidden state at position p after its final RMSNorm (the LM-head input).
  entry     the head's input pair (f_p, token_{p+1}), run at RoPE position p; it predicts f_{p+1} and token_{p+2}.
  committed a position whose token the target has verified; its entry is built from a true target feature.
  draft     a token proposed by the head; its entry is built from the head's own predicted feature.

The checkpoint layout is the official EAGLE-1 one as vLLM 0.32 loads it (`EagleLlamaForCausalLM`): a 1-layer Llama
`config.json`, keys `fc.weight [H, 2H]` (no bias), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`, `layers.0.post_attention_layernorm.weight`. Embedding and LM head are the
target's (frozen, shared), so one folder runs in this package and in vLLM's native `method: eagle`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_KEYS = (
    "fc.weight",
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
)


class HeadConfigError(ValueError):
    """A head folder that cannot serve the given target; the message names the mismatch and the fix."""


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_hf_dict(cls, c: dict) -> "HeadConfig":
        rope = c.get("rope_parameters") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") not in ("default", None):
            raise HeadConfigError(f"rope_type {rope['rope_type']!r} is not supported by the EAGLE head (only default RoPE)")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in c]
        if missing:
            raise HeadConfigError(f"head config.json lacks {missing}: an EAGLE-1 head config is a 1-layer Llama config "
                                  "(re-export it with `vllm-eagle train`)")
        return cls(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                   num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   vocab_size=c["vocab_size"], rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta))

    @classmethod
    def from_dir(cls, path: str) -> "HeadConfig":
        return cls.from_hf_dict(read_config(path))

    def to_hf_dict(self, target: dict) -> dict:
        """A 1-layer Llama config in the EAGLE-1 layout, copying token ids and RoPE from the target config."""
        keep = {k: target[k] for k in ("bos_token_id", "eos_token_id", "max_position_embeddings", "hidden_act",
                                       "rope_parameters", "rope_theta") if k in target}
        return dict(keep, architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                    hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.head_dim, vocab_size=self.vocab_size, rms_norm_eps=self.rms_norm_eps,
                    tie_word_embeddings=False, torch_dtype="bfloat16")


def read_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise HeadConfigError(f"EAGLE head folder {path!r} does not exist: pass a folder with config.json and "
                              "model.safetensors (train one with `vllm-eagle train`, or use vllm_eagle.default_head())")
    if not os.path.isfile(cfg):
        raise HeadConfigError(f"{path!r} has no config.json: an EAGLE head folder needs config.json + model.safetensors")
    try:
        with open(cfg) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadConfigError(f"{cfg} is not valid JSON ({e}): the head folder is corrupt; copy or export it again") \
            from None


DRAFT_VOCAB_FILE = "draft_vocab.json"


def load_draft_vocab(path: str) -> torch.Tensor | None:
    """Token ids the head drafts from ([M] int64, most frequent first), or None if the folder has no draft
    vocabulary. Kept outside *.safetensors so vLLM's native loader ignores it."""
    f = os.path.join(path, DRAFT_VOCAB_FILE)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        ids = json.load(fh)["token_ids"]
    if not ids or len(set(ids)) != len(ids):
        raise HeadConfigError(f"{f}: token_ids must be a non-empty list of distinct token ids")
    return torch.tensor(ids, dtype=torch.int64)


def check_head_matches_target(head: dict, target: dict, head_path: str = "head") -> None:
    """Raise HeadConfigError naming every dimension where the head cannot draft for the target."""
    t = target.get("text_config", target)
    h, tc = HeadConfig.from_hf_dict(head), HeadConfig.from_hf_dict(t)
    problems = [f"{name}: head {getattr(h, name)} vs target {getattr(tc, name)}"
                for name in ("hidden_size", "vocab_size") if getattr(h, name) != getattr(tc, name)]
    if h.num_heads * h.head_dim <= 0 or h.num_heads % h.num_kv_heads:
        problems.append(f"attention heads: {h.num_heads} query heads not a multiple of {h.num_kv_heads} KV heads")
    if head.get("num_hidden_layers", 1) != 1:
        problems.append(f"num_hidden_layers: {head.get('num_hidden_layers')} (EAGLE-1 heads have exactly 1)")
    dv = load_draft_vocab(head_path) if os.path.isdir(head_path) else None
    if dv is not None and (int(dv.max()) >= tc.vocab_size or int(dv.min()) < 0):
        problems.append(f"{DRAFT_VOCAB_FILE} has token ids outside the target vocabulary [0, {tc.vocab_size})")
    if problems:
        raise HeadConfigError(f"EAGLE head {head_path!r} does not fit this target: " + "; ".join(problems)
                              + ". Train a head for this target with `vllm-eagle train --target TARGET --out HEAD`.")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [T] -> cos, sin [T, head_dim] (neox / HF Llama rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


Linear = Callable[[torch.Tensor], torch.Tensor]     # x [..., K] -> [..., N]


def torch_linear(weight: torch.Tensor) -> Linear:
    """weight [N, K] -> x @ weight.T through F.linear (what training and packing without an engine use)."""
    return lambda x: F.linear(x, weight)


class EagleHead(nn.Module):
    """The trainable part of an EAGLE-1 head. Embedding and LM head are passed in (the target's, frozen).

    Training calls the nn.Linear layers. Inference calls `pack` once: q|k|v and gate|up become one GEMM each and
    every GEMM is built by the engine's GEMM factory (see `pack`).
    """

    packed: dict[str, Linear] | None = None

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        H, nh, nkv, hd, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))

    # checkpoint key <-> attribute
    _KEYMAP = {"fc.weight": "fc.weight",
               **{f"layers.0.self_attn.{p}.weight": f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
               **{f"layers.0.mlp.{p}.weight": f"{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
               "layers.0.post_attention_layernorm.weight": "post_attention_layernorm"}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "EagleHead":
        from safetensors.torch import load_file
        cfg = HeadConfig.from_dir(path)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise HeadConfigError(f"EAGLE head folder {path!r} has no *.safetensors weights")
        state = {}
        for f in files:
            try:
                state.update(load_file(os.path.join(path, f)))
            except Exception as e:                                  # safetensors raises its own error types
                raise HeadConfigError(f"EAGLE head weights {os.path.join(path, f)!r} cannot be read ({e}): the file is "
                                      "truncated or corrupt; copy or export the head again") from None
        head = cls(cfg)
        head.load_checkpoint_state(state, path)
        return head.to(dtype).eval()

    def load_checkpoint_state(self, state: dict, path: str = "head") -> None:
        extra = sorted(k for k in state if k not in self._KEYMAP and k not in ("embed_tokens.weight", "lm_head.weight"))
        missing = sorted(k for k in self._KEYMAP if k not in state)
        if missing or extra:
            raise HeadConfigError(f"EAGLE head {path!r} is not in the EAGLE-1 layout: missing {missing}, unexpected {extra}"
                                  " (an fc.bias cannot be loaded by vLLM 0.32 either; retrain or drop it)")
        own = dict(self.named_parameters())
        for key, attr in self._KEYMAP.items():
            if own[attr].shape != state[key].shape:
                raise HeadConfigError(f"EAGLE head {path!r}: {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(own[attr].shape)} for this config")
            with torch.no_grad():
                own[attr].copy_(state[key])

    def checkpoint_state(self) -> dict:
        own = dict(self.named_parameters())
        return {key: own[attr].detach().contiguous() for key, attr in self._KEYMAP.items()}

    def pack(self, make_linear: Callable[[torch.Tensor], Linear] = torch_linear) -> "EagleHead":
        """Inference GEMMs from the current weights: fc, q|k|v fused, o, gate|up fused, down, each
        `make_linear(weight [N, K])`. The engine passes vLLM's prepacked CPU GEMM (oneDNN / sgl), about 2x faster
        than F.linear on the head's T=1 shapes here (`python -m benchmarks.kernels`). Call again after changing the
        weights."""
        with torch.no_grad():
            gemm = lambda *layers: make_linear(torch.cat([m.weight for m in layers]))   # noqa: E731  rows stacked
            self.packed = {"fc": gemm(self.fc), "qkv": gemm(self.q_proj, self.k_proj, self.v_proj),
                           "o": gemm(self.o_proj), "gate_up": gemm(self.gate_proj, self.up_proj),
                           "down": gemm(self.down_proj)}
        return self

    def project(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """embeds, features [T, H] -> fc input x [T, H]. EAGLE order: embedding first."""
        x = torch.cat([embeds, features], dim=-1)
        return self.fc(x) if self.packed is None else self.packed["fc"](x)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [T, H], positions [T] -> q [T, nh, hd], k, v [T, nkv, hd] with RoPE applied to q and k."""
        c = self.cfg
        if self.packed is None:
            q = self.q_proj(x).view(-1, c.num_heads, c.head_dim)
            k = self.k_proj(x).view(-1, c.num_kv_heads, c.head_dim)
            v = self.v_proj(x).view(-1, c.num_kv_heads, c.head_dim)
        else:                                        # [T, nh + 2 nkv, hd] split into views, no copies
            q, k, v = self.packed["qkv"](x).view(-1, c.num_heads + 2 * c.num_kv_heads, c.head_dim).split(
                [c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, H] (fc output), attn [T, nh*hd] (attention output before o_proj) -> predicted feature [T, H].

        Llama layer 0 with Identity input norm and no final norm, as vLLM's EagleLlamaForCausalLM:
        out = r + mlp(norm(r)), r = x + o_proj(attn).
        """
        if self.packed is None:
            r = x + self.o_proj(attn)
            h = rms_norm(r, self.post_attention_layernorm, self.cfg.rms_norm_eps)
            return r + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        r = x + self.packed["o"](attn)
        h = rms_norm(r, self.post_attention_layernorm, self.cfg.rms_norm_eps)
        gate, up = self.packed["gate_up"](h).chunk(2, -1)
        return r + self.packed["down"](F.silu(gate) * up)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention over padded batches.

    q    [B, Tq, nh, hd]
    k, v [B, Tk, nkv, hd]
    mask [B, Tq, Tk] bool (True = visible) or None for full visibility
    ->   [B, Tq, nh*hd]

    Drafting asks few queries (Tq <= 16: a tree depth's nodes) against a long prefix: there each KV head's group of
    query heads takes one fp32 matmul over the keys, without repeating K/V per query head (bf16 SDPA with a mask
    cost 0.43 ms per depth at batch 1 here, this 0.08 ms). Training's long queries go to SDPA.
    """
    B, Tq, nh, hd = q.shape
    nkv = k.shape[2]
    rep = nh // nkv
    if Tq <= 16:
        # query head h = g * rep + r belongs to KV head g: [B, Tq, nkv, rep, hd] -> [B, nkv, Tq * rep, hd]
        qg = q.float().view(B, Tq, nkv, rep, hd).permute(0, 2, 1, 3, 4).reshape(B, nkv, Tq * rep, hd)
        s = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * (1.0 / math.sqrt(hd))  # [B, nkv, Tq * rep, Tk]
        if mask is not None:
            s.masked_fill_(~mask.repeat_interleave(rep, dim=1)[:, None], float("-inf"))
        o = torch.matmul(s.softmax(-1), v.float().transpose(1, 2))                    # [B, nkv, Tq * rep, hd]
        return o.view(B, nkv, Tq, rep, hd).permute(0, 2, 1, 3, 4).reshape(B, Tq, nh * hd).to(q.dtype)
    qt = q.transpose(1, 2)                                             # [B, nh, Tq, hd]
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)               # [B, nh, Tk, hd]
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    m = None if mask is None else mask[:, None, :, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=1.0 / math.sqrt(hd))
    return out.transpose(1, 2).reshape(B, Tq, nh * hd)
