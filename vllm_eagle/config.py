"""Plugin options: one validated dataclass, built from vLLM's config in every process, and the keyword arguments that
turn a plain `LLM(...)` / `vllm serve` into one that speculates with our EAGLE proposer."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .draft_head import HeadConfig, HeadConfigError, check_head_matches_target, load_draft_vocab, read_config

PROPOSER_CLASS = "vllm_eagle.proposer.EagleProposer"
WORKER_CLASS = "vllm_eagle.worker.EagleCPUWorker"
CONFIG_KEY = "vllm_eagle"                        # our entry in vLLM's --additional-config
DYNAMIC = "dynamic"
# EAGLE-2 dynamic tree defaults on this CPU: verify cost grows with tree nodes (v(N)), so the budget stays small.
DYNAMIC_DEFAULTS = {"depth": 4, "top_k": 4, "total_tokens": 8}
# K=2: the fastest chain at batch 1 when it was chosen (K=2 vs K=3, paired rounds: docs/notes.md, "The default chain
# length", which also notes that it predates the current head).
CHAIN_DEFAULT_K = 2
MAX_DYNAMIC_TOP_K = 16


class EagleOptionError(ValueError):
    """Bad plugin options; the message names the option and the fix."""


@dataclass(frozen=True)
class EagleOptions:
    head: str                                     # EAGLE-1 or EAGLE-3 head folder (official layouts)
    num_speculative_tokens: int                   # K: draft tokens per step (chain length)
    tree: str = "chain"                           # draft shape: "chain", Medusa-style path tuples (see tree.py)
                                                  # or "dynamic" (EAGLE-2; K = total_tokens, the tree's draft nodes)
    depth: int = DYNAMIC_DEFAULTS["depth"]        # dynamic trees: draft forwards per step
    top_k: int = DYNAMIC_DEFAULTS["top_k"]        # dynamic trees: children per expanded node, nodes expanded per depth
    feature_layers: tuple[int, ...] = field(default=())   # target layers to capture; an EAGLE-3 head's own
                                                  # (its config, else vLLM's default) when () = unset
    draft_vocab: bool = True                      # EAGLE-1: draft over the head's draft_vocab.json if it has one
                                                  # (faster); an EAGLE-3 head always drafts over its own (d2t)
    adaptive: bool = True                         # per step, speculate only where it measured faster (adapt.py)
    lookup: int = 0                               # chains: prompt-lookup draft length, 0 = off. A row whose context
                                                  # repeats its tail drafts the `lookup` tokens that followed it there
                                                  # (no head forward; lookup.py); the others draft the head's chain
    chain_k: int = 0                              # with lookup: the head's chain length (0 = num_speculative_tokens,
                                                  # which is then max(chain_k, lookup): vLLM's per-step budget)
    min_confidence: float = 0.0                   # chains: a row's head drafts stop where their cumulative draft
                                                  # probability falls below this (EAGLE-2's confidence; 0 = off)

    @property
    def uses_trees(self) -> bool:
        """Whether steps verify trees (tree attention) rather than chains (vLLM's own verification)."""
        if self.tree in ("chain", DYNAMIC):
            return self.tree == DYNAMIC
        from .tree import compile_tree
        return not compile_tree(self.tree).is_chain

    @property
    def branching(self) -> int:
        """The most candidates one drafted node takes from the head's ranking: top_k (dynamic), the widest node of
        a static tree, 1 for a chain."""
        if self.tree in ("chain", DYNAMIC):
            return self.top_k if self.tree == DYNAMIC else 1
        from .tree import compile_tree
        return int(compile_tree(self.tree).rank.max()) + 1

    def __post_init__(self):
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens <= 0:
            raise EagleOptionError(f"num_speculative_tokens must be a positive integer, got {self.num_speculative_tokens!r}"
                                   " (e.g. --num-speculative-tokens 3)")
        from .tree import MAX_TREE_NODES
        if self.num_speculative_tokens > MAX_TREE_NODES - 1:
            raise EagleOptionError(f"num_speculative_tokens={self.num_speculative_tokens} is over {MAX_TREE_NODES - 1}, "
                                   "the most draft tokens one step verifies; useful values are 1-8")
        if self.tree == DYNAMIC:
            for name, v in (("depth", self.depth), ("top_k", self.top_k)):
                if not isinstance(v, int) or v <= 0:
                    raise EagleOptionError(f"dynamic tree {name} must be a positive integer, got {v!r}")
            if self.top_k > MAX_DYNAMIC_TOP_K:
                raise EagleOptionError(f"dynamic tree top_k={self.top_k} is over {MAX_DYNAMIC_TOP_K}: use a smaller top_k")
            pool = self.top_k + (self.depth - 1) * self.top_k ** 2
            if self.num_speculative_tokens > min(pool, MAX_TREE_NODES - 1):
                raise EagleOptionError(f"dynamic tree total_tokens={self.num_speculative_tokens} exceeds what depth="
                                       f"{self.depth}, top_k={self.top_k} can draft ({pool}) or the {MAX_TREE_NODES - 1}"
                                       "-node limit: lower total_tokens (--num-speculative-tokens) or raise depth/top_k")
        elif self.tree != "chain":
            from .tree import TreeSpecError, compile_tree
            try:
                nodes = compile_tree(self.tree).num_nodes - 1
            except TreeSpecError as e:
                raise EagleOptionError(f"tree: {e}") from None
            if nodes > self.num_speculative_tokens:
                raise EagleOptionError(f"tree has {nodes} draft nodes but num_speculative_tokens is "
                                       f"{self.num_speculative_tokens}: they must match (speculative_kwargs does this)")
        for name, v in (("lookup", self.lookup), ("chain_k", self.chain_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise EagleOptionError(f"{name} must be a draft length (an integer >= 0, 0 = off), got {v!r}"
                                       + (" (e.g. lookup=4)" if name == "lookup" else ""))
        if self.lookup and self.tree != "chain":
            raise EagleOptionError(f"lookup drafts chains; it cannot be combined with tree={self.tree!r}: use "
                                   "tree='chain' or lookup=0")
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
            raise EagleOptionError(f"min_confidence must be a probability in [0, 1) (0 = off), got {c!r} "
                                   "(e.g. min_confidence=0.2)")
        if c and self.tree != "chain":
            raise EagleOptionError(f"min_confidence cuts chains; trees choose their nodes themselves (tree="
                                   f"{self.tree!r}): use tree='chain' or min_confidence=0")
        if max(self.lookup, self.chain_k) > self.num_speculative_tokens:
            raise EagleOptionError(f"lookup={self.lookup} / chain_k={self.chain_k} exceed num_speculative_tokens="
                                   f"{self.num_speculative_tokens}, the tokens vLLM schedules per step: set it to "
                                   "their maximum (vllm_eagle.speculative_kwargs does this)")
        if not os.path.isdir(self.head):
            raise EagleOptionError(f"EAGLE head folder {self.head!r} does not exist: pass a folder with config.json and "
                                   "model.safetensors (e.g. vllm_eagle.default_head())")

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EagleOptions":
        extra = (vllm_config.additional_config or {}).get(CONFIG_KEY)
        if not extra or "head" not in extra:
            raise EagleOptionError(f"{PROPOSER_CLASS} needs additional_config={{'{CONFIG_KEY}': {{'head': HEAD_DIR}}}}; "
                                   "build the engine arguments with vllm_eagle.speculative_kwargs(HEAD, ...) or "
                                   "`vllm serve TARGET --speculative-model HEAD`")
        k = vllm_config.speculative_config.num_speculative_tokens
        unknown = set(extra) - {f for f in cls.__dataclass_fields__ if f != "num_speculative_tokens"}
        if unknown:
            raise EagleOptionError(f"unknown {CONFIG_KEY} option(s) {sorted(unknown)}; known: head, tree, depth, top_k, "
                                   "feature_layers, draft_vocab, adaptive, lookup, chain_k, min_confidence")
        return cls(head=extra["head"], num_speculative_tokens=k, tree=extra.get("tree", "chain"),
                   depth=extra.get("depth", DYNAMIC_DEFAULTS["depth"]), top_k=extra.get("top_k", DYNAMIC_DEFAULTS["top_k"]),
                   feature_layers=tuple(extra.get("feature_layers", ())), draft_vocab=bool(extra.get("draft_vocab", True)),
                   adaptive=bool(extra.get("adaptive", True)), lookup=extra.get("lookup", 0),
                   chain_k=extra.get("chain_k", 0), min_confidence=extra.get("min_confidence", 0.0))


def add_option_args(parser, aliases: bool = False) -> None:
    """The plugin's command-line flags, declared once: `vllm serve` (patches P1) and `vllm-eagle generate` (with
    the short aliases -k, --head, --tree when `aliases`) take the same ones; speculative_kwargs_from_args reads them."""
    short = (lambda *names: names) if aliases else (lambda *names: ())
    g = parser.add_argument_group("EAGLE (vllm-eagle)", "EAGLE speculative decoding from the vllm-eagle plugin")
    g.add_argument("--speculative-model", *short("--head"), default=None, metavar="HEAD",
                   help="EAGLE-1 or EAGLE-3 head folder; turns on vllm-eagle speculation")
    g.add_argument("--num-speculative-tokens", *short("-k"), type=int, default=None, metavar="K",
                   help="draft tokens per step (K; chain default 2; for --eagle-tree dynamic: total_tokens, default 8)")
    g.add_argument("--eagle-tree", *short("--tree"), default="chain", metavar="TREE",
                   help="draft shape: chain, path tuples such as \"[(0,), (1,), (0, 0)]\" (K = number of nodes), or "
                        "dynamic (EAGLE-2 trees grown per request by draft confidence)")
    g.add_argument("--eagle-depth", type=int, default=None,
                   help=f"dynamic trees: draft forwards per step (default {DYNAMIC_DEFAULTS['depth']})")
    g.add_argument("--eagle-top-k", type=int, default=None,
                   help="dynamic trees: children per expanded node and nodes expanded per depth "
                        f"(default {DYNAMIC_DEFAULTS['top_k']})")
    g.add_argument("--eagle-lookup", type=int, default=0, metavar="N",
                   help="chains: rows whose context repeats its tail draft the N tokens that followed it (prompt "
                        "lookup) instead of running the head (default 0 = off)")
    g.add_argument("--eagle-min-confidence", type=float, default=0.0, metavar="P",
                   help="chains: cut each row's head drafts before the first whose cumulative draft probability is "
                        "below P (default 0 = off)")


def speculative_kwargs_from_args(args, target: str | None = None) -> dict:
    """speculative_kwargs from the flags of add_option_args."""
    dyn = {k: v for k, v in (("depth", args.eagle_depth), ("top_k", args.eagle_top_k)) if v is not None}
    if dyn and args.eagle_tree != DYNAMIC:
        raise EagleOptionError("--eagle-depth/--eagle-top-k apply to --eagle-tree dynamic only")
    return speculative_kwargs(args.speculative_model, args.num_speculative_tokens, args.eagle_tree, target=target,
                              lookup=args.eagle_lookup, min_confidence=args.eagle_min_confidence, **dyn)


def check_engine_config(vllm_config) -> "EagleOptions | None":
    """Everything about our speculation the engine's config decides, checked before any engine starts: the plugin
    options, prefix caching off, the head against the target as vLLM loaded its config. The front end runs it when
    it builds the config (patches P6), so LLM(...) and `vllm serve` raise the error where the user called; the
    proposer runs it again in the worker. -> our options, or None when the config does not use our proposer."""
    spec = vllm_config.speculative_config
    if spec is None or spec.method != "custom_class" or spec.model != PROPOSER_CLASS:
        return None
    options = EagleOptions.from_vllm_config(vllm_config)
    if vllm_config.cache_config.enable_prefix_caching:
        raise EagleOptionError("vllm-eagle speculation needs prefix caching off (the head's KV of a cached prefix "
                               "is not rebuilt yet): pass --no-enable-prefix-caching / enable_prefix_caching=False "
                               "(vllm_eagle.speculative_kwargs and --speculative-model set it)")
    head_cfg = read_config(options.head)
    check_head_matches_target(head_cfg, vllm_config.model_config.hf_config.to_dict(), options.head)
    hc = HeadConfig.from_hf_dict(head_cfg)
    dv = load_draft_vocab(options.head) if options.draft_vocab and not hc.eagle3 else None
    drafts_from = hc.draft_vocab_size if hc.eagle3 else hc.vocab_size if dv is None else len(dv)
    if drafts_from < options.branching:
        raise EagleOptionError(f"tree={options.tree!r} ranks {options.branching} candidates per node, but head "
                               f"{options.head!r} drafts from {drafts_from} tokens (its draft vocabulary): use a "
                               f"narrower tree" + ("" if hc.eagle3 else " or draft_vocab=False"))
    if hc.eagle3 and not captures_aux_layers(vllm_config.model_config):
        raise EagleOptionError(f"EAGLE-3 head {options.head!r} fuses the target's intermediate layers, and vLLM's "
                               f"{vllm_config.model_config.architectures[0]} cannot hand them over (no EAGLE-3 "
                               "support in that model class): use an EAGLE-1 head for this target")
    unsupported = tree_attention_unsupported(vllm_config) if options.uses_trees else []
    if unsupported:
        raise EagleOptionError(f"tree={options.tree!r} verifies through vllm-eagle's tree attention, which does not "
                               f"support this engine's {', '.join(unsupported)}: use a chain (tree='chain', the "
                               "default) for this model")
    return options


def captures_aux_layers(model_config) -> bool:
    """Whether vLLM's model class for this target can capture intermediate layers for EAGLE-3 (SupportsEagle3)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_eagle3
    model_cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    return supports_eagle3(model_cls)


def tree_attention_unsupported(vllm_config) -> list[str]:
    """What the target's attention uses that tree verification cannot run, as its config tells before any engine
    starts (tree_attention.TreeCPUAttentionImpl checks its layers again at the first tree step)."""
    text, cache = vllm_config.model_config.hf_text_config, vllm_config.cache_config
    return [name for name, bad in (
        ("ALiBi", bool(getattr(text, "alibi", False) or getattr(text, "position_embedding_type", "") == "alibi")),
        (f"{cache.cache_dtype} KV cache", str(cache.cache_dtype).startswith("fp8")),
    ) if bad]


def validate_against_target(head: str, target: str | None) -> None:
    """Fail early (before an engine starts) when the head cannot serve this target. `target` may be a folder or a
    name the engine resolves later, in which case only the head is checked."""
    head_cfg = read_config(head)
    if target and os.path.isfile(os.path.join(target, "config.json")):
        with open(os.path.join(target, "config.json")) as f:
            check_head_matches_target(head_cfg, json.load(f), head)


def speculative_kwargs(head: str, num_speculative_tokens: int | None = None, tree: str = "chain", *,
                       depth: int = DYNAMIC_DEFAULTS["depth"], top_k: int = DYNAMIC_DEFAULTS["top_k"],
                       total_tokens: int | None = None, target: str | None = None,
                       feature_layers: tuple[int, ...] = (), draft_vocab: bool = True, adaptive: bool = True,
                       lookup: int = 0, min_confidence: float = 0.0,
                       k_by_batch_size: list[tuple[int, int, int]] | None = None) -> dict:
    """Keyword arguments for `vllm.LLM(model=TARGET, **speculative_kwargs(HEAD, num_speculative_tokens=K))`.

    tree: "chain" (K = num_speculative_tokens, default CHAIN_DEFAULT_K = 2), path tuples (K = its nodes) or "dynamic"
    (EAGLE-2: `depth` draft forwards, `top_k` children per expanded node and nodes expanded per depth, `total_tokens`
    draft nodes kept, default 8; num_speculative_tokens is an alias of total_tokens there).
    Returns speculative_config (vLLM's custom_class hook pointing at our proposer), additional_config (our options),
    worker_cls (our CPU worker, whose runner hands target features to the proposer), and enable_prefix_caching=False
    (the draft KV of a cached prefix is not rebuilt yet). Pass target= to check the head against it up front.
    k_by_batch_size=[(first, last, K), ...] hands vLLM's batch-size schedule (num_speculative_tokens_per_batch_size)
    the K to use per number of running requests; K=0 turns speculation off for that range (drafts stop, the head's
    KV keeps being committed so speculation resumes when load drops).
    adaptive=True (default): per step and batch-size bucket, speculate only if steps with drafts have measured more
    tokens per second than steps without (adapt.py); False drafts every step (fixed shape, e.g. for measuring tau).
    lookup=N (chains only): a row whose context has met its last 2-4 tokens before drafts the N tokens that
    followed them there (prompt lookup, lookup.py) instead of running the head's chain of num_speculative_tokens;
    vLLM then schedules up to max(K, N) drafts per row. Output is unchanged.
    min_confidence=p (chains only): each row's head chain stops before the first draft whose cumulative draft
    probability (the head's softmax over its draft vocabulary, multiplied along the chain) is below p, and drafting
    stops once no row is above it: fewer tokens to verify and fewer draft forwards where drafts would be rejected.
    """
    if tree == DYNAMIC:
        num_speculative_tokens = next((k for k in (total_tokens, num_speculative_tokens) if k is not None),
                                      DYNAMIC_DEFAULTS["total_tokens"])
    elif total_tokens is not None:
        raise EagleOptionError("total_tokens is an option of tree='dynamic'; chains and static trees take "
                               "num_speculative_tokens / their path tuples")
    elif tree != "chain":                         # a tree verifies all its nodes: K = number of draft nodes
        from .tree import TreeSpecError, compile_tree
        try:
            num_speculative_tokens = compile_tree(tree).num_nodes - 1
        except TreeSpecError as e:
            raise EagleOptionError(f"tree: {e}") from None
    k = CHAIN_DEFAULT_K if num_speculative_tokens is None else num_speculative_tokens
    chain_k = 0
    if tree == "chain" and isinstance(lookup, int) and lookup > 0:     # (EagleOptions refuses a bool or a non-int)
        chain_k, k = k, max(k, lookup)          # vLLM schedules up to the longer of the two per row
    opts = EagleOptions(head=os.path.abspath(head), num_speculative_tokens=k, tree=tree, depth=depth, top_k=top_k,
                        feature_layers=tuple(feature_layers), draft_vocab=draft_vocab, adaptive=adaptive,
                        lookup=lookup, chain_k=chain_k, min_confidence=min_confidence)
    try:
        validate_against_target(opts.head, target)
    except HeadConfigError as e:
        raise EagleOptionError(str(e)) from None
    extra = asdict(opts)
    extra.pop("num_speculative_tokens")
    extra["feature_layers"] = list(opts.feature_layers)
    spec = {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": opts.num_speculative_tokens}
    if k_by_batch_size:
        spec["num_speculative_tokens_per_batch_size"] = [tuple(r) for r in k_by_batch_size]
    return {
        "speculative_config": spec,
        "additional_config": {CONFIG_KEY: extra},
        "worker_cls": WORKER_CLASS,
        "enable_prefix_caching": False,
    }
