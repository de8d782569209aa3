"""jft.data.preference: layouts, errors, truncation, collation, KTO's KL pairs, reward pairs.

The tokenizer is built here, byte-level (one token per byte, no hub, no
download) with a ChatML template, so lengths are easy to reason about.
"""

import json
import os

import numpy as np
import pytest

from jft import data
from jft.data import preference as pd
from jft.data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                      additional_special_tokens=["<|im_start|>"])
  tokenizer.chat_template = CHATML
  return tokenizer


def write(path, rows, jsonl=True):
  with open(path, "w") as f:
    if jsonl:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
      json.dump(rows, f)
  return str(path)


# ---------------------------------------------------------------------------- instructions


def test_alpaca_prompts_exact(tok):
  rows = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
          {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
  plain, with_input = pd.instruction_examples(rows, tok)
  assert plain == {"prompt": "Below is an instruction that describes a task. Write a response that appropriately "
                             "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n",
                   "response": "Blue."}
  assert with_input["prompt"] == (
      "Below is an instruction that describes a task, paired with an input that provides further context. "
      "Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n")
  chat = pd.instruction_examples(rows, tok, template="chat", system="Be brief.")
  assert chat[1]["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                               "<|im_start|>user\nTranslate to French.\n\ncat<|im_end|>\n<|im_start|>assistant\n")
  assert chat[0]["prompt"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n" \
                              "<|im_start|>assistant\n"
  assert len(pd.instruction_examples(rows, tok, limit=1)) == 1


def test_instruction_errors_name_the_row(tok):
  with pytest.raises(DataError, match=r"row 1 has no 'instruction'; fields: \['input', 'output'\]"):
    pd.instruction_examples([{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}], tok)
  with pytest.raises(DataError, match="row 0 has an empty output"):
    pd.instruction_examples([{"instruction": "a", "input": "", "output": "  "}], tok)


def test_split_rows_seeded():
  rows = [{"i": i} for i in range(999)]
  train, held = data.split_rows(rows, 0.1, seed=0)
  assert (len(train), len(held)) == (899, 100)
  assert sorted(r["i"] for r in train + held) == list(range(999))
  assert (train, held) == data.split_rows(rows, 0.1, seed=0)
  assert held != data.split_rows(rows, 0.1, seed=1)[1]


# ---------------------------------------------------------------------------- files


def test_load_json_rows(tmp_path):
  rows = [{"a": 1}, {"a": 2}]
  assert pd.load_json_rows(write(tmp_path / "x.json", rows, jsonl=False)) == rows
  assert pd.load_json_rows(write(tmp_path / "x.jsonl", rows)) == rows
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"a": 1}\n{"a": \n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
    pd.load_json_rows(str(bad))
  (tmp_path / "bad.json").write_text("[{")
  with pytest.raises(DataError, match=r"bad.json: not valid JSON .*line 1"):
    pd.load_json_rows(str(tmp_path / "bad.json"))
  with pytest.raises(DataError, match="no such file"):
    pd.load_json_rows(str(tmp_path / "missing.json"))
  with pytest.raises(DataError, match="expected a JSON list"):
    pd.load_json_rows(write(tmp_path / "obj.json", {"a": 1}, jsonl=False))


# ---------------------------------------------------------------------------- preference layouts


def layouts(prompt="Is the sky blue?", chosen="Yes.", rejected="No.", system=None):
  """The same pair in the common, TRL conversational and ShareGPT layouts."""
  trl = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
  sharegpt = ([{"from": "system", "value": system}] if system else []) + [{"from": "human", "value": prompt}]
  return [
      {"prompt": prompt, "chosen": chosen, "rejected": rejected},
      {"prompt": trl, "chosen": [{"role": "assistant", "content": chosen}],
       "rejected": [{"role": "assistant", "content": rejected}]},
      {"conversations": sharegpt, "chosen": {"from": "gpt", "value": chosen},
       "rejected": {"from": "gpt", "value": rejected}},
  ]


@pytest.mark.parametrize("chat", [True, False])
def test_layouts_parse_alike(tok, tmp_path, chat):
  rows = pd.load_json_rows(write(tmp_path / "p.jsonl", layouts()))
  out = pd.preference_examples(rows, tok, chat=chat, template="Q: {text}", system="Sys")
  assert out[0] == out[1] == out[2]
  prompt = ("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nQ: Is the sky blue?<|im_end|>\n"
            "<|im_start|>assistant\n") if chat else "Q: Is the sky blue?"
  assert out[0] == {"prompt": prompt, "chosen": "Yes.", "rejected": "No."}


def test_conversation_system_and_multi_turn(tok):
  _, trl, sharegpt = layouts(system="Row system")
  a, b = pd.preference_examples([trl, sharegpt], tok, chat=True, system="ignored: the row has one")
  assert a == b and a["prompt"].startswith("<|im_start|>system\nRow system<|im_end|>")
  turns = [("human", "user", "Hi"), ("gpt", "assistant", "Hello!"), ("human", "user", "Sky?")]
  multi = [{"prompt": [{"role": r, "content": c} for _, r, c in turns], "chosen": [{"role": "assistant",
                                                                                  "content": "Blue"}],
            "rejected": [{"role": "assistant", "content": "Red"}]},
           {"conversations": [{"from": f, "value": c} for f, _, c in turns], "chosen": {"from": "gpt", "value": "Blue"},
            "rejected": {"from": "gpt", "value": "Red"}}]
  a, b = pd.preference_examples(multi, tok, chat=True)
  assert a == b
  assert a["prompt"] == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                         "<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(DataError, match="row 0: a multi-turn conversation needs a chat template"):
    pd.preference_examples(multi, tok, chat=False)
  # without a chat template, a single-turn conversation is plain text, its system message first
  assert pd.preference_examples([sharegpt], tok, chat=False)[0]["prompt"] == "Row system\n\nIs the sky blue?"


def test_preference_errors_name_the_row(tok):
  good = layouts()[0]
  with pytest.raises(DataError, match=r"train.jsonl: row 1 has no 'rejected'; fields: \['chosen', 'prompt'\]"):
    pd.preference_examples([good, {"prompt": "p", "chosen": "c"}], tok, chat=False, where="train.jsonl")
  with pytest.raises(DataError, match="row 0 has no 'chosen' or 'rejected'"):
    pd.preference_examples([{"prompt": "p"}], tok, chat=False)
  for row in layouts(rejected=" "):
    with pytest.raises(DataError, match="row 0: empty rejected completion"):
      pd.preference_examples([row], tok, chat=True)
  with pytest.raises(DataError, match="row 0: empty chosen completion"):
    pd.preference_examples([{"prompt": "p", "chosen": [{"role": "assistant", "content": ""}], "rejected": "r"}],
                           tok, chat=True)
  with pytest.raises(DataError, match=r"row 0: unknown layout \(fields \['chosen', 'question', 'rejected'\]\)"):
    pd.preference_examples([{"question": "p", "chosen": "c", "rejected": "r"}], tok, chat=False)
  with pytest.raises(DataError, match="row 0: the conversation must end with a user message"):
    pd.preference_examples([{"conversations": [{"from": "gpt", "value": "x"}], "chosen": "c", "rejected": "r"}],
                           tok, chat=True)


# ---------------------------------------------------------------------------- tokenize, pad


def test_long_prompt_cut_from_the_left_completions_whole(tok):
  examples = [{"prompt": "0123456789" * 3, "chosen": "abc", "rejected": "defgh"},
              {"prompt": "short", "chosen": "ok", "rejected": "no"}]
  rows, truncated = pd.tokenize_pairs(examples, tok, max_length=20, chat=False)
  assert truncated == 1
  first = rows[0]
  assert all(r.prompt_ids.dtype == np.int32 for r in rows)
  # " defgh" + eos = 7 tokens, so the shared prompt keeps its last 13 tokens
  assert tok.decode(first.prompt_ids) == ("0123456789" * 3)[-13:]
  assert first.chosen_ids.tolist() == tok(" abc", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  assert first.rejected_ids.tolist() == tok(" defgh", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  assert pd.pair_length(first) == 20 and pd.pair_length(rows[1]) == len("short") + len(" ok") + 1
  right, _ = pd.tokenize_pairs(examples, tok, max_length=20, chat=False, truncation="right")
  assert tok.decode(right[0].prompt_ids) == ("0123456789" * 3)[:13]
  with pytest.raises(DataError, match=r"pair 1: completions of 4 \(chosen\) and 4 \(rejected\) tokens leave no room "
                                      r"for the prompt in max_length=4"):
    pd.tokenize_pairs([{"prompt": "p", "chosen": "o", "rejected": "n"}, examples[1]], tok, max_length=4, chat=False)


def test_pad_pairs(tok):
  rows, _ = pd.tokenize_pairs([{"prompt": "ab", "chosen": "c", "rejected": "de"},
                               {"prompt": "f", "chosen": "ghi", "rejected": "j"}], tok, max_length=16, chat=True)
  batch = pd.pad_pairs(rows, 8, pad_id=-1)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((2, 2, 8), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
  eos = tok.eos_token_id
  ab, c, de = (tok(s, add_special_tokens=False)["input_ids"] for s in ("ab", "c", "de"))
  assert batch["input_ids"][0, 0].tolist() == ab + c + [eos] + [-1] * 4
  assert batch["input_ids"][0, 1].tolist() == ab + de + [eos] + [-1] * 3
  assert batch["attention_mask"][0].tolist() == [[1] * 4 + [0] * 4, [1] * 5 + [0] * 3]
  assert batch["loss_mask"][0].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
  assert batch["loss_mask"][1].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
  with pytest.raises(DataError, match=r"pair 0 \(chosen\): 4 tokens do not fit the padded length 3"):
    pd.pad_pairs(rows, 3, 0)


# ---------------------------------------------------------------------------- KTO


def test_unpaired_from_preferences_and_native(tok):
  pairs = [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, layouts("p2", "c2", "r2")[2]]
  out = pd.unpaired_examples(pairs, tok, chat=False)
  assert [(e["prompt"], e["completion"], e["desirable"]) for e in out] == [
      ("p1", "c1", True), ("p2", "c2", True), ("p1", "r1", False), ("p2", "r2", False)]  # TRL's order
  native = [{"prompt": "p1", "completion": "c1", "label": True},
            {"prompt": [{"role": "user", "content": "p2"}], "completion": [{"role": "assistant", "content": "r2"}],
             "label": False}]
  assert pd.unpaired_examples(native, tok, chat=False) == [out[0], out[3]]
  with pytest.raises(DataError, match="row 0 has a completion but no 'label'"):
    pd.unpaired_examples([{"prompt": "p", "completion": "c"}], tok, chat=False)
  with pytest.raises(DataError, match="row 0: label must be true/false"):
    pd.unpaired_examples([{"prompt": "p", "completion": "c", "label": "yes"}], tok, chat=False)


def test_kto_kl_rows_take_the_previous_completion(tok):
  examples = [{"prompt": p, "completion": c, "desirable": d}
              for p, c, d in (("aaaa", "x", True), ("b", "yyyyy", False), ("cc", "zz", True))]
  rows, truncated = pd.tokenize_unpaired(examples, tok, max_length=16, chat=True)
  assert truncated == 0
  batch = pd.pad_unpaired(rows, 8, pad_id=0)
  assert batch["desirable"].tolist() == [True, False, True]
  assert all(batch[k].shape == (3, 8) for k in batch if k != "desirable")

  def text(prefix, r, mask):
    ids = batch[f"{prefix}input_ids"][r]
    return tok.decode(ids[batch[f"{prefix}{mask}"][r] == 1])

  assert [text("", r, "loss_mask") for r in range(3)] == ["x<|im_end|>", "yyyyy<|im_end|>", "zz<|im_end|>"]
  # KL row i = prompt i + completion of row (i - 1) mod B
  assert [text("kl_", r, "loss_mask") for r in range(3)] == ["zz<|im_end|>", "x<|im_end|>", "yyyyy<|im_end|>"]
  assert [text("kl_", r, "attention_mask") for r in range(3)] == [
      "aaaazz<|im_end|>", "bx<|im_end|>", "ccyyyyy<|im_end|>"]  # the last one (8 tokens) fills the row
  tight = pd.pad_unpaired(rows, 7, pad_id=0)  # "cc" + 6 tokens > 7: its KL prompt is cut from the left
  assert tok.decode(tight["kl_input_ids"][2][tight["kl_attention_mask"][2] == 1]) == "cyyyyy<|im_end|>"
  with pytest.raises(DataError, match="at least 2 rows"):
    pd.pad_unpaired(rows[:1], 8)


# ---------------------------------------------------------------------------- reward pairs


def test_reward_pairs_from_sentiment_split(tok):
  rows = pd.load_json_rows(os.path.join(ROOT, "data", "sentiment", "validation.jsonl"))
  pairs = pd.reward_pairs(rows, n_pairs=300, seed=0)
  assert len(pairs) == 300 and pairs == pd.reward_pairs(rows, n_pairs=300, seed=0)
  assert pairs != pd.reward_pairs(rows, n_pairs=300, seed=1)
  score = {r["text"]: r["score"] for r in rows}
  for p in pairs:
    assert p["chosen_score"] > p["rejected_score"]
    assert (score[p["chosen"]], score[p["rejected"]]) == (p["chosen_score"], p["rejected_score"])
    assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"])
  assert len({frozenset((p["chosen"], p["rejected"])) for p in pairs}) == 300
  wide = pd.reward_pairs(rows, n_pairs=50, seed=0, min_diff=2.0)
  assert min(p["margin"] for p in wide) >= 2.0
  with pytest.raises(DataError, match="found only"):
    pd.reward_pairs(rows[:3], n_pairs=10, seed=0)

  assert [pd.rating_buckets(d, s) for d, s in ((2.0, True), (1.5, True), (-1.5, False), (0.3, False))] == [
      ">=2", "1-2 same polarity", "1-2 opposite polarity", "<1"]
  assert set(pd.BUCKETS) == {">=2", "1-2 same polarity", "1-2 opposite polarity", "<1"}

  ex = pd.reward_examples(pairs[:2], tok, "Review: {text}", chat=False)
  assert ex[0] == {"chosen": "Review: " + pairs[0]["chosen"], "rejected": "Review: " + pairs[0]["rejected"],
                   "margin": pairs[0]["margin"]}
  chat = pd.reward_examples(pairs[:1], tok, "Review: {text}", chat=True)
  assert chat[0]["chosen"] == f"<|im_start|>user\nReview: {pairs[0]['chosen']}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------- the real LLaMA-Factory files

CACHE = os.path.join(ROOT, "data", "llamafactory")


def test_llamafactory_files_parse(tok):
  # `make test` fetches them first; a bare pytest run needs the script once.
  assert os.path.isdir(CACHE), "data/llamafactory/ is absent: run scripts/fetch_llamafactory_data.py (needs PyPI)"
  alpaca = pd.load_json_rows(os.path.join(CACHE, "alpaca_en_demo.json"))
  assert len(alpaca) == 999
  assert len(pd.instruction_examples(alpaca, tok)) == 999
  train, held = data.split_rows(alpaca)
  assert (len(train), len(held)) == (899, 100)
  dpo = pd.load_json_rows(os.path.join(CACHE, "dpo_en_demo.json"))
  pairs = pd.preference_examples(dpo, tok, chat=True, where="dpo_en_demo.json")
  assert len(pairs) == len(dpo) == 300
  assert all(p["prompt"].endswith("<|im_start|>assistant\n") for p in pairs)
  assert len(pd.unpaired_examples(dpo, tok, chat=True)) == 600


def test_token_ids_outside_the_vocabulary_name_the_row():
  import numpy as np

  from jft import data

  rows = [(np.array([1, 2, 3]), np.array([1, 1, 1])), {"chosen": (np.array([4, 300]), np.array([1, 1]))}]
  data.check_token_ids(rows[:1], 258, "pairs.jsonl")
  with pytest.raises(data.DataError, match=r"pairs\.jsonl: row 1 has token id 300, outside the model's vocabulary "
                                           r"\(0\.\.257\)"):
    data.check_token_ids(rows, 258, "pairs.jsonl")
