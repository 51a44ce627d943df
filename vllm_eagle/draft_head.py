"""EAGLE draft heads: one Llama decoder layer that drafts the target's next tokens from the target's features.

Vocabulary used across vllm_eagle:
  feature   f_p: what the target hands the head for position p. EAGLE-1: its hidden state after the final RMSNorm
            (the LM-head input). EAGLE-3: its residual stream before three layers (low, mid, high), concatenated
            [3 * H_target]; the head's `fc` fuses them (`fuse`).
  entry     the head's input pair (f_p, token_{p+1}), run at RoPE position p; it predicts g_p (the head's output,
            fed back as the next entry's feature) and with it token_{p+2}.
  committed a position whose token the target has verified; its entry is built from a true target feature.
  draft     a token proposed by the head; its entry is built from the head's own output.

Two layouts, both as vLLM 0.32 loads them, so one folder runs here and in vLLM's native speculation:
- EAGLE-1 (`EagleLlamaForCausalLM`, `method: eagle`): a 1-layer Llama config; `fc.weight [H, 2H]` on
  [embed; feature] (an official SafeAILab folder also has `fc.bias`, which this package runs and vLLM cannot), layer 0
  without input norm, no final norm; drafts through the target's LM head.
- EAGLE-3 (`LlamaForCausalLMEagle3` / `Eagle3LlamaForCausalLM`, `method: eagle3`): `fc.weight [H, 3 H_target]`;
  q/k/v read [input_layernorm(embed); hidden_norm(fused feature)] (2H); its own final `norm` and `lm_head
  [draft_vocab, H]`; `d2t[i]` = target id of draft id i minus i. Names `layers.0.*` (vLLM) or `midlayer.*` (SafeAILab).
The embedding is the target's unless the folder brings its own `embed_tokens.weight`.
"""
from __future__ import annotations

import functools
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


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
    rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))   # the target's RoPE parameters, sorted
    max_position: int = 4096              # positions the RoPE table covers (the target's max_position_embeddings)
    eagle3: bool = False                  # the EAGLE-3 layout (fused features, own norm and LM head)
    draft_vocab_size: int = 0             # EAGLE-3: rows of its lm_head (= vocab_size when it has no d2t)
    target_hidden_size: int = 0           # EAGLE-3: hidden size of the fused target layers
    aux_layers: tuple[int, ...] = ()      # EAGLE-3: target layers whose input it fuses; () = vLLM's default
    norm_before_residual: bool = False    # EAGLE-3: the residual is hidden_norm(fused) instead of fused

    @classmethod
    def from_hf_dict(cls, c: dict) -> "HeadConfig":
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        if isinstance(rope.get("full_attention"), dict):   # per layer type (Gemma-3): the head attends globally
            rope = dict(rope["full_attention"])
        rope.setdefault("rope_theta", c.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"   # older configs: "type"
        if c.get("partial_rotary_factor", 1.0) != 1.0:
            raise HeadConfigError(f"partial_rotary_factor {c['partial_rotary_factor']} (RoPE on part of each head) "
                                  "is not supported by the EAGLE head")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in c]
        if missing:
            raise HeadConfigError(f"head config.json lacks {missing}: an EAGLE head config is a 1-layer Llama config "
                                  "(re-export it with `vllm-eagle train`)")
        eagle3 = any(a in EAGLE3_ARCHITECTURES for a in c.get("architectures") or ())
        extra = {}
        if eagle3:
            ec = c.get("eagle_config") or {}
            unsupported = [k for k, bad in (("norm_before_fc", ec.get("norm_before_fc", c.get("norm_before_fc"))),
                                            ("fc_norm", c.get("fc_norm")), ("norm_output", c.get("norm_output")),
                                            ("attention_bias", c.get("attention_bias")),
                                            ("parallel_drafting", c.get("parallel_drafting")))
                           if bad]
            if ec.get("use_aux_hidden_state") is False:
                unsupported.append("eagle_config.use_aux_hidden_state=false")
            if unsupported:
                raise HeadConfigError(f"EAGLE-3 head config sets {unsupported}: vllm_eagle runs the EAGLE-3 layout "
                                      "without these variants; use vLLM's native `method: eagle3` for this head")
            layers = c.get("eagle_aux_hidden_state_layer_ids") or ec.get("eagle_aux_hidden_state_layer_ids") or ()
            extra = dict(eagle3=True, draft_vocab_size=c.get("draft_vocab_size") or c["vocab_size"],
                         target_hidden_size=c.get("target_hidden_size") or c["hidden_size"],
                         aux_layers=tuple(int(i) for i in layers),
                         norm_before_residual=bool(c.get("norm_before_residual", False)))
        return cls(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                   num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   vocab_size=c["vocab_size"], rms_norm_eps=c.get("rms_norm_eps", 1e-6),
                   rope=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items())),
                   max_position=int(c.get("max_position_embeddings", 4096)), **extra)

    @classmethod
    def from_dir(cls, path: str) -> "HeadConfig":
        return cls.from_hf_dict(read_config(path))

    def feature_layers(self, target_num_layers: int) -> tuple[int, ...]:
        """EAGLE-3: the target layers whose input (residual stream) the head fuses; () for EAGLE-1.
        vLLM's default for a head that names none: (2, L // 2, L - 3)."""
        if not self.eagle3:
            return ()
        return self.aux_layers or (2, target_num_layers // 2, target_num_layers - 3)

    def to_hf_dict(self, target: dict) -> dict:
        """A 1-layer Llama config in this layout (a SiLU MLP whatever the target's), with the target's token ids and
        the head's RoPE."""
        keep = {k: target[k] for k in ("bos_token_id", "eos_token_id", "max_position_embeddings") if k in target}
        out = dict(keep, architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                   hidden_act="silu", rope_parameters={k: list(v) if isinstance(v, tuple) else v for k, v in self.rope},
                   hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                   num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                   head_dim=self.head_dim, vocab_size=self.vocab_size, rms_norm_eps=self.rms_norm_eps,
                   tie_word_embeddings=False, torch_dtype="bfloat16")
        if self.eagle3:
            out.update(architectures=[EAGLE3_ARCHITECTURES[0]], draft_vocab_size=self.draft_vocab_size,
                       target_hidden_size=self.target_hidden_size, norm_before_residual=self.norm_before_residual,
                       eagle_aux_hidden_state_layer_ids=list(self.feature_layers(target["num_hidden_layers"])))
        return out


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
        problems.append(f"num_hidden_layers: {head.get('num_hidden_layers')} (EAGLE heads have exactly 1)")
    if head.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {head['hidden_act']!r} (the EAGLE head's MLP is SiLU-gated, as vLLM's Llama "
                        "draft models are)")
    if h.eagle3:
        L = t.get("num_hidden_layers", 0)
        if h.target_hidden_size != tc.hidden_size:
            problems.append(f"target_hidden_size: head {h.target_hidden_size} vs target {tc.hidden_size}")
        layers = h.feature_layers(L)
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            problems.append(f"eagle_aux_hidden_state_layer_ids {list(layers)}: {bad} outside the target's layers "
                            f"0..{L - 1}")
        if len(set(layers)) != len(layers):
            problems.append(f"eagle_aux_hidden_state_layer_ids {list(layers)} repeats a layer (vLLM captures each "
                            "layer once): set three distinct layers in the head's config.json")
        elif list(layers) != sorted(layers):
            problems.append(f"eagle_aux_hidden_state_layer_ids {list(layers)} is not ascending (vLLM hands the "
                            "captured layers over in ascending order, so fc would see them permuted)")
        if h.draft_vocab_size > tc.vocab_size:
            problems.append(f"draft_vocab_size: {h.draft_vocab_size} > the target's vocabulary {tc.vocab_size}")
    dv = load_draft_vocab(head_path) if os.path.isdir(head_path) else None
    if dv is not None and (int(dv.max()) >= tc.vocab_size or int(dv.min()) < 0):
        problems.append(f"{DRAFT_VOCAB_FILE} has token ids outside the target vocabulary [0, {tc.vocab_size})")
    if problems:
        raise HeadConfigError(f"EAGLE head {head_path!r} does not fit this target: " + "; ".join(problems)
                              + ". Train a head for this target with `vllm-eagle train --target TARGET --out HEAD`.")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


@functools.lru_cache(maxsize=8)
def rope_table(head_dim: int, max_position: int, rope: tuple) -> torch.Tensor:
    """[max_position, head_dim] float32: cat(cos, sin) halves per position from vLLM's rotary-embedding factory, so
    the head rotates exactly as the target's attention does under whatever scaling its config names (default,
    llama3, linear, YaRN, ...)."""
    from vllm.config import VllmConfig, get_current_vllm_config_or_none, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in rope}
    context = nullcontext() if get_current_vllm_config_or_none() else set_current_vllm_config(VllmConfig())
    with context:                                    # vLLM's rotary embeddings are custom ops: they read the config
        table = get_rope(head_dim, max_position, True, params, torch.float32).cos_sin_cache
    return table.to(torch.float32).contiguous()


def rope_cos_sin(positions: torch.Tensor, cfg: "HeadConfig", dtype: torch.dtype):
    """positions [T] -> cos, sin [T, head_dim] (neox / HF Llama rotate-half layout)."""
    cs = rope_table(cfg.head_dim, cfg.max_position, cfg.rope)[positions]
    cos, sin = cs.chunk(2, dim=-1)
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, sin], dim=-1).to(dtype)


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
    """The trainable part of an EAGLE head (`load_head` builds the one a folder holds).

    The draft stage sees four calls, the same for both layouts:
      fuse(f)          target features [T, F] -> head features [T, H]   (EAGLE-3: fc over the fused layers)
      project(e, h)    embeddings, head features [T, H] -> entries x [T, E]
      qkv(x, pos)      -> q [T, nh, hd], k, v [T, nkv, hd], RoPE applied
      finish(x, attn)  -> g [T, H]: the head's output, fed back as the next entry's head feature
    and `logits_input(g)` is what the draft LM head multiplies. Training calls the nn.Linear layers; inference calls
    `pack` once: q|k|v and gate|up become one GEMM each, built by the engine's GEMM factory.

    EAGLE-1: x = fc([e; h]) (E = H); the layer has no input norm and no final norm; the draft LM head is the
    target's.
    """

    packed: dict[str, Linear] | None = None
    eagle3 = False

    def __init__(self, cfg: HeadConfig, fc_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        H, nh, nkv, hd, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.fc = nn.Linear(self.fc_inputs(cfg), H, bias=fc_bias)
        self.q_proj = nn.Linear(self.attn_inputs(cfg), nh * hd, bias=False)
        self.k_proj = nn.Linear(self.attn_inputs(cfg), nkv * hd, bias=False)
        self.v_proj = nn.Linear(self.attn_inputs(cfg), nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.embed_tokens: torch.Tensor | None = None     # [V, H] the folder's own embedding, if it has one

    @staticmethod
    def fc_inputs(cfg: HeadConfig) -> int:
        return 2 * cfg.hidden_size

    @staticmethod
    def attn_inputs(cfg: HeadConfig) -> int:
        return cfg.hidden_size

    # checkpoint key (after `normalise_keys`) -> attribute
    _LAYER_KEYS = {**{f"layers.0.self_attn.{p}.weight": f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                   **{f"layers.0.mlp.{p}.weight": f"{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
                   "layers.0.post_attention_layernorm.weight": "post_attention_layernorm"}
    _KEYMAP = {"fc.weight": "fc.weight", **_LAYER_KEYS}
    _IGNORED = ("lm_head.weight",)                  # EAGLE-1 folders may carry the target's LM head: unused

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "EagleHead":
        return load_head(path, dtype)

    def keymap(self) -> dict[str, str]:
        return {**self._KEYMAP, **({"fc.bias": "fc.bias"} if self.fc.bias is not None else {})}

    def load_checkpoint_state(self, state: dict, path: str = "head") -> None:
        keymap = self.keymap()
        extra = sorted(k for k in state if k not in keymap and k not in self._IGNORED and k != "embed_tokens.weight")
        missing = sorted(k for k in keymap if k not in state)
        if missing or extra:
            layout = "EAGLE-3" if self.eagle3 else "EAGLE-1"
            raise HeadConfigError(f"EAGLE head {path!r} is not in the {layout} layout its config.json names: missing "
                                  f"{missing}, unexpected {extra}")
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for key, attr in keymap.items():
            if own[attr].shape != state[key].shape:
                raise HeadConfigError(f"EAGLE head {path!r}: {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(own[attr].shape)} for this config")
            with torch.no_grad():
                own[attr].copy_(state[key])
        if "embed_tokens.weight" in state:
            emb = state["embed_tokens.weight"]
            if tuple(emb.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
                raise HeadConfigError(f"EAGLE head {path!r}: embed_tokens.weight has shape {tuple(emb.shape)}, "
                                      f"expected {(self.cfg.vocab_size, self.cfg.hidden_size)}")
            self.embed_tokens = emb

    def checkpoint_state(self) -> dict:
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {key: own[attr].detach().contiguous() for key, attr in self.keymap().items()}

    def pack(self, make_linear: Callable[[torch.Tensor], Linear] = torch_linear) -> "EagleHead":
        """Inference GEMMs from the current weights: fc, q|k|v fused, o, gate|up fused, down, each
        `make_linear(weight [N, K])`. The engine passes vLLM's prepacked CPU GEMM (oneDNN / sgl), faster than
        F.linear on the head's few-row shapes (`python -m benchmarks.kernels`). Call again after changing the
        weights."""
        with torch.no_grad():
            gemm = lambda *layers: make_linear(torch.cat([m.weight for m in layers]))   # noqa: E731  rows stacked
            self.packed = {"fc": gemm(self.fc), "qkv": gemm(self.q_proj, self.k_proj, self.v_proj),
                           "o": gemm(self.o_proj), "gate_up": gemm(self.gate_proj, self.up_proj),
                           "down": gemm(self.down_proj)}
        return self

    def _fc(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or self.fc.bias is not None:
            return self.fc(x)
        return self.packed["fc"](x)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """target features [T, F] -> head features [T, H] (EAGLE-1: the final-norm state itself)"""
        return features

    def project(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """embeds, head features [T, H] -> entries x [T, H]. EAGLE order: embedding first."""
        return self._fc(torch.cat([embeds, features], dim=-1))

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits_input(self, g: torch.Tensor) -> torch.Tensor:
        """head outputs [M, H] -> what the draft LM head multiplies (EAGLE-1: g itself; vLLM feeds it the same)"""
        return g

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [T, E], positions [T] -> q [T, nh, hd], k, v [T, nkv, hd] with RoPE applied to q and k."""
        c, a = self.cfg, self.attn_input(x)
        if self.packed is None:
            q = self.q_proj(a).view(-1, c.num_heads, c.head_dim)
            k = self.k_proj(a).view(-1, c.num_kv_heads, c.head_dim)
            v = self.v_proj(a).view(-1, c.num_kv_heads, c.head_dim)
        else:                                        # [T, nh + 2 nkv, hd] split into views, no copies
            q, k, v = self.packed["qkv"](a).view(-1, c.num_heads + 2 * c.num_kv_heads, c.head_dim).split(
                [c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
        cos, sin = rope_cos_sin(positions, c, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, E] (entries), attn [T, nh*hd] (attention output before o_proj) -> g [T, H].

        The decoder layer after attention, as vLLM's Eagle models run it: out = r + mlp(norm(r)),
        r = residual(x) + o_proj(attn); `out` is g (EAGLE-3's pre-final-norm state, which vLLM feeds back).
        """
        if self.packed is None:
            r = self.residual(x) + self.o_proj(attn)
            h = rms_norm(r, self.post_attention_layernorm, self.cfg.rms_norm_eps)
            return r + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        r = self.residual(x) + self.packed["o"](attn)
        h = rms_norm(r, self.post_attention_layernorm, self.cfg.rms_norm_eps)
        gate, up = self.packed["gate_up"](h).chunk(2, -1)
        return r + self.packed["down"](F.silu(gate) * up)


class Eagle3Head(EagleHead):
    """EAGLE-3: fuse = fc over the concatenated target layers [T, n * H_target] -> [T, H]; an entry is
    x = [input_layernorm(e); hidden_norm(h); residual] [T, 3H], of which q/k/v read the first 2H and the layer adds the
    residual (h, or hidden_norm(h) with norm_before_residual); the draft LM head is the head's own `lm_head` over
    its draft vocabulary after its final `norm`; draft id i is target id i + d2t[i]."""

    eagle3 = True

    def __init__(self, cfg: HeadConfig, fc_bias: bool = False, num_fused: int = 3):
        self.num_fused = num_fused
        super().__init__(cfg, fc_bias)
        H = cfg.hidden_size
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.hidden_norm = nn.Parameter(torch.ones(H))
        self.norm = nn.Parameter(torch.ones(H))
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))

    def fc_inputs(self, cfg: HeadConfig) -> int:
        return self.num_fused * cfg.target_hidden_size

    @staticmethod
    def attn_inputs(cfg: HeadConfig) -> int:
        return 2 * cfg.hidden_size

    _KEYMAP = {**EagleHead._KEYMAP, "layers.0.input_layernorm.weight": "input_layernorm",
               "layers.0.hidden_norm.weight": "hidden_norm", "norm.weight": "norm", "lm_head.weight": "lm_head.weight"}
    _IGNORED = ("t2d",)

    def keymap(self) -> dict[str, str]:
        has_d2t = self.cfg.draft_vocab_size != self.cfg.vocab_size
        return {**super().keymap(), **({"d2t": "d2t"} if has_d2t else {})}

    def draft_token_ids(self) -> torch.Tensor | None:
        """[D] target id of each draft id, or None when the draft vocabulary is the target's."""
        if self.cfg.draft_vocab_size == self.cfg.vocab_size:
            return None
        return torch.arange(self.cfg.draft_vocab_size) + self.d2t

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(features)

    def project(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        h = rms_norm(features, self.hidden_norm, eps)
        return torch.cat([rms_norm(embeds, self.input_layernorm, eps), h,
                          h if self.cfg.norm_before_residual else features], dim=-1)

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : 2 * self.cfg.hidden_size]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 2 * self.cfg.hidden_size:]

    def logits_input(self, g: torch.Tensor) -> torch.Tensor:
        return rms_norm(g, self.norm, self.cfg.rms_norm_eps)


def normalise_keys(state: dict) -> dict:
    """SafeAILab / vLLM / HF spellings -> one: no `model.` prefix, `midlayer.` -> `layers.0.`."""
    out = {}
    for k, v in state.items():
        k = k[len("model."):] if k.startswith("model.") else k
        out[k.replace("midlayer.", "layers.0.", 1) if k.startswith("midlayer.") else k] = v
    return out


def read_state(path: str) -> dict:
    """All tensors of a head folder: *.safetensors, else pytorch_model*.bin (official EAGLE-1 folders)."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    bins = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
    if not files and not bins:
        raise HeadConfigError(f"EAGLE head folder {path!r} has no *.safetensors (or pytorch_model.bin) weights")
    state = {}
    for f in files or bins:
        full = os.path.join(path, f)
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file
                state.update(load_file(full))
            else:
                state.update(torch.load(full, map_location="cpu", weights_only=True))
        except Exception as e:                                  # each format raises its own error types
            raise HeadConfigError(f"EAGLE head weights {full!r} cannot be read ({e}): the file is truncated or "
                                  "corrupt; copy or export the head again") from None
    return normalise_keys(state)


def load_head(path: str, dtype: torch.dtype = torch.float32) -> EagleHead:
    """The head a folder holds (EAGLE-1 or EAGLE-3, by its config's architectures), weights loaded."""
    cfg = HeadConfig.from_dir(path)
    state = read_state(path)
    if cfg.eagle3:
        fc = state.get("fc.weight")
        n = fc.shape[1] // cfg.target_hidden_size if fc is not None and fc.ndim == 2 else 3
        head = Eagle3Head(cfg, fc_bias="fc.bias" in state, num_fused=n)
    else:
        head = EagleHead(cfg, fc_bias="fc.bias" in state)
    head.load_checkpoint_state(state, path)
    return head.to(dtype).eval()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention over padded batches.

    q    [B, Tq, nh, hd]
    k, v [B, Tk, nkv, hd]
    mask [B, Tq, Tk] bool (True = visible) or None for full visibility
    ->   [B, Tq, nh*hd]

    Drafting asks few queries (Tq <= 16: a tree depth's nodes) against a long prefix: there each KV head's group of
    query heads takes one fp32 matmul over the keys, without repeating K/V per query head (several times faster than
    a masked bf16 SDPA at batch 1; docs/notes.md). Training's long queries go to SDPA.
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
