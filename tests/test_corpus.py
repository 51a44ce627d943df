"""The kept self-distilled corpus: which ShareGPT turns it takes (every turn, balanced, held-out and evaluation
prompts never), that it grows by the next turns without regenerating, that its answers are the target's greedy
output, and that training examples rebuild the prompts."""
import json

import pytest
from conftest import generate_ids
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_eagle.train import corpus

CONVS = [
    [{"from": "human", "value": "Please summarize this text for me."}, {"from": "gpt", "value": "It says hi."},
     {"from": "human", "value": "Translate it into French."}, {"from": "gpt", "value": "Il dit salut."}],
    [{"from": "human", "value": "Write a python function that adds two numbers."}, {"from": "gpt", "value": "def f"}],
    [{"from": "human", "value": "How many legs do 3 cats have?"}, {"from": "gpt", "value": "12"},
     {"from": "gpt", "value": "a turn out of order"}, {"from": "human", "value": "never reached"}],
    [{"from": "human", "value": "Tell me a story."}, {"from": "gpt", "value": "Once upon a time."}],
    [{"from": "human", "value": "Tell me a joke."}, {"from": "gpt", "value": "No."}],   # held out (id 4)
]


@pytest.fixture
def sharegpt(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "HOLDOUT_START", 4)
    monkeypatch.setattr(corpus, "excluded_prompts", lambda: {"Tell me a story."})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": c} for c in CONVS]))
    return str(path)


def test_selection_takes_every_turn_balanced_and_never_held_out_or_evaluation(tiny, sharegpt):
    tok = AutoTokenizer.from_pretrained(tiny)
    order = corpus.select_turns(CONVS, tok, 4096, exclude={"Tell me a story."}, seed=0)
    # conversation 2 stops at its broken turn; 3 is an evaluation prompt; 4 is held out (HOLDOUT_START = 4 here).
    assert sorted((t.conv, t.turn) for t in order) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    cats = {(t.conv, t.turn): t.category for t in order}
    assert cats == {(0, 0): "summarisation", (0, 1): "translation", (1, 0): "code", (2, 0): "maths"}
    # round-robin over categories in CATEGORIES order
    assert [t.category for t in order] == [c for c in corpus.CATEGORIES if c in cats.values()]
    second = order[1]
    text = tok.apply_chat_template(corpus.conversation_messages(CONVS[second.conv], second.turn), tokenize=False,
                                   add_generation_prompt=True)
    assert list(second.prompt_ids) == tok(text, add_special_tokens=False)["input_ids"]
    assert corpus.category("word " * 10, corpus.LONG_DOCUMENT_TOKENS) == "long-document"
    assert corpus.select_turns(CONVS, tok, 12) == []                      # every prompt over the limit


@pytest.mark.slow
def test_corpus_grows_with_the_targets_greedy_answers(tiny, sharegpt, tmp_path):
    out = str(tmp_path / "corpus")
    first = corpus.grow(tiny, out, 2, max_tokens=12, sharegpt=sharegpt, log=lambda m: None)
    grown = corpus.grow(tiny, out, 10, max_tokens=12, sharegpt=sharegpt, log=lambda m: None)
    assert grown[:2] == first and len(grown) == 4                          # the next turns; only 4 are selectable
    assert {(r["conv"], r["turn"]) for r in grown} == {(0, 0), (0, 1), (1, 0), (2, 0)}
    meta = corpus.read_meta(out)
    assert meta["answers"] == 4 and meta["answer_tokens"] == sum(len(r["ids"]) for r in grown)
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = {(t.conv, t.turn): t.prompt_ids for t in corpus.select_turns(CONVS[:4], tok, 1536, exclude=set())}
    want, _ = generate_ids(tiny, [TokensPrompt(prompt_token_ids=list(prompts[(r["conv"], r["turn"])])) for r in grown],
                           SamplingParams(temperature=0, max_tokens=12))
    assert [r["ids"] for r in grown] == want
    with pytest.raises(corpus.CorpusMismatch, match="max_tokens=12"):
        corpus.grow(tiny, out, 5, max_tokens=64, sharegpt=sharegpt)
    exs = corpus.examples(out, tok, 4096, sharegpt=sharegpt)
    for ex, r in zip(exs, grown):
        assert ex.tokens[ex.answer_mask].tolist() == r["ids"]
        assert ex.tokens[~ex.answer_mask].tolist() == list(prompts[(r["conv"], r["turn"])])
    cut = corpus.examples(out, tok, 24, sharegpt=sharegpt)                # the prompt's start is cut, the answer kept
    assert all(len(e.tokens) <= 24 and e.tokens[e.answer_mask].tolist() == r["ids"][:16] for e, r in zip(cut, grown))


def test_base_model_prompts_are_plain_text(tiny):
    """A target without a chat template (a base model: Gemma 3 270M) reads each turn's text followed by a blank line,
    after the BOS its tokenizer adds; teacher-forced answers continue that text and end in EOS when finished."""
    from vllm_eagle.assets import prompt_ids, prompt_text
    from vllm_eagle.train.data import tokenize
    tok = AutoTokenizer.from_pretrained(tiny)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    assert prompt_text(tok, msgs).startswith("<s>user\n")                 # the tiny target's chat template
    tok.chat_template = None
    assert prompt_text(tok, msgs) == "Tell me a story.\n\n"
    ids = prompt_ids(tok, msgs)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Tell me a story.\n\n"
    answer = "Once upon a time a small dog lived by the sea, and every morning it ran along the beach."
    done, cut = tokenize(tok, [{"prompt": msgs[0]["content"], "answer": answer},
                               {"prompt": msgs[0]["content"], "answer": answer, "finished": False}], 512)
    assert done.tokens.tolist() == ids + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert cut.tokens.tolist() == done.tokens.tolist()[:-1]
    assert int(done.answer_mask.sum()) == len(done.tokens) - len(ids) and not done.answer_mask[:len(ids)].any()
