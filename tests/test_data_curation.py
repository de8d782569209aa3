"""`jft data`: planted exact and near duplicates, contaminated rows and rule failures are all found, no clean
row is flagged at the documented thresholds, the reports point at the right rows, inputs stay unchanged,
`select` keeps the asked fraction with IFD as computed by hand, and each bad input is one error, nothing written."""

import hashlib
import json
import os

import numpy as np
import pytest

from jft.cli import main
from jft.data import curate

VOCAB = [f"w{i}x" for i in range(400)]


def words(rng, n):
  return [VOCAB[i] for i in rng.choice(len(VOCAB), n, replace=False)]


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


def sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def run(argv, capsys):
  code = main(argv)
  return code, capsys.readouterr()


def report_of(out):
  with open(out + ".report.json") as f:
    return json.load(f)


@pytest.fixture
def planted(tmp_path):
  """60-word rows: 30 clean, 6 hard negatives (half of a clean row, Jaccard ~0.3; two words changed, ~0.7),
  planted exact copies (case, spacing, punctuation) and near copies (Jaccard >= 0.8 at 5-word shingles)."""
  rng = np.random.default_rng(0)
  clean = [words(rng, 60) for _ in range(30)]
  rows = [" ".join(w) for w in clean]
  expect = {}  # row -> (reason, kept row)
  negatives = []
  for k in range(3):  # the first half of a clean row, a new second half
    negatives.append(len(rows))
    rows.append(" ".join(clean[k][:30] + words(rng, 30)))
  for k in range(3, 6):  # two scattered words changed: J = 46/66 = 0.70, an LSH candidate at 0.8, not a duplicate
    w = list(clean[k])
    w[10], w[40] = "zz1", "zz2"
    negatives.append(len(rows))
    rows.append(" ".join(w))
  for k in (6, 7):  # exact copies: upper case, extra spaces, punctuation
    expect[len(rows)] = ("exact duplicate", k)
    rows.append("  " + " ,  ".join(clean[k]).upper() + "!!  ")
  w = list(clean[8])
  w[30] = "changed"  # one word: J = 51/61
  expect[len(rows)] = ("near duplicate", 8)
  rows.append(" ".join(w))
  w = list(clean[9])
  w[20:22] = ["new1", "new2"]  # two adjacent words: J = 50/62
  expect[len(rows)] = ("near duplicate", 9)
  rows.append(" ".join(w))
  w = list(clean[10])
  del w[5]  # one word deleted: J = 51/56
  expect[len(rows)] = ("near duplicate", 10)
  rows.append(". ".join(w).title())  # and case/punctuation on top
  rows += [" ".join(w) for w in (words(rng, 60) for _ in range(5))]  # clean rows after the planted ones
  path = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in enumerate(rows)])
  return path, rows, expect, negatives


def test_dedup_finds_every_planted_duplicate_and_no_clean_row(planted, tmp_path, capsys):
  path, rows, expect, negatives = planted
  before = sha(path)
  out = str(tmp_path / "dedup.jsonl")
  code, _ = run(["data", "dedup", path, "--near", "0.8", "--out", out], capsys)
  assert code == 0
  report = report_of(out)
  found = {r["row"]: (r["reason"], r["kept"]["row"]) for r in report["removed"]}
  assert found == expect  # every planted row, the right kept row, nothing else (hard negatives included)
  assert not set(found) & set(negatives)
  assert report["counts"]["exact"] == 2 and report["counts"]["near"] == 3
  assert report["counts"]["near_candidates"] > 3  # LSH offered the 0.7 pairs; the true Jaccard turned them down
  assert all(r["jaccard"] >= 0.8 for r in report["removed"] if r["reason"] == "near duplicate")
  with open(out) as f:
    kept = [json.loads(line)["id"] for line in f]
  assert kept == [i for i in range(len(rows)) if i not in expect]  # input order, whole rows
  assert sha(path) == before and report["input_sha256"][path] == before


def test_dedup_lower_threshold_and_exact_only(tmp_path, capsys):
  rng = np.random.default_rng(1)
  clean = [words(rng, 60) for _ in range(20)]
  w = list(clean[0])
  for i in (10, 30, 50):  # three scattered words: J = 41/71 = 0.58
    w[i] = f"edit{i}"
  rows = [" ".join(x) for x in clean] + [" ".join(clean[1][:30] + words(rng, 30)), " ".join(w)]
  path = write_jsonl(tmp_path / "r.jsonl", [{"text": t} for t in rows])
  out = str(tmp_path / "near05.jsonl")
  assert run(["data", "dedup", path, "--near", "0.5", "--out", out], capsys)[0] == 0
  assert [(r["row"], r["kept"]["row"]) for r in report_of(out)["removed"]] == [(21, 0)]  # not the J=0.3 row 20
  out = str(tmp_path / "exact.jsonl")
  assert run(["data", "dedup", path, "--out", out], capsys)[0] == 0
  assert report_of(out)["removed"] == [] and "near" not in report_of(out)["counts"]


def test_dedup_across_files_names_file_and_row(tmp_path, capsys):
  a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one two three"}, {"text": "four five six"}])
  b = tmp_path / "b.json"
  b.write_text(json.dumps([{"text": "seven"}, {"text": "Four, five  SIX."}, {"text": "one two three"}]))
  out = str(tmp_path / "ab.json")
  assert run(["data", "dedup", a, str(b), "--out", out], capsys)[0] == 0
  report = report_of(out)
  assert report["removed"] == [
      {"file": str(b), "row": 1, "reason": "exact duplicate", "kept": {"file": a, "row": 1}},
      {"file": str(b), "row": 2, "reason": "exact duplicate", "kept": {"file": a, "row": 0}}]
  assert report["counts"]["exact_across_files"] == 2
  with open(out) as f:  # .json out: a JSON list
    assert [r["text"] for r in json.load(f)] == ["one two three", "four five six", "seven"]


def test_decontaminate_finds_copied_13_grams(tmp_path, capsys):
  rng = np.random.default_rng(2)
  evals = [" ".join(words(rng, 40)) for _ in range(10)] + ["A short eval row."]
  eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in evals])
  train = [" ".join(words(rng, 40)) for _ in range(20)]
  expect = {}
  e = evals[3].split()
  expect[len(train)] = 3  # 13 words of eval row 3 inside other text, case and punctuation changed
  train.append(" ".join(words(rng, 10)) + " " + ", ".join(e[7:20]).upper() + ". " + " ".join(words(rng, 10)))
  expect[len(train)] = 10  # a short row: the same whole text
  train.append("a SHORT eval row")
  clean = [len(train), len(train) + 1]
  train.append(" ".join(words(rng, 10)) + " " + " ".join(evals[5].split()[:12]) + " " + " ".join(words(rng, 10)))
  train.append("short eval")  # a part of a short eval row is not its whole text
  path = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train])
  out = str(tmp_path / "clean.jsonl")
  code, captured = run(["data", "decontaminate", path, "--against", eval_path, "--out", out], capsys)
  assert code == 0, captured.err
  report = report_of(out)
  assert {r["row"]: r["eval"]["row"] for r in report["removed"]} == expect
  assert all(r["eval"]["file"] == eval_path for r in report["removed"])
  assert report["removed"][0]["ngram"] == " ".join(e[7:20])
  assert not set(clean) & {r["row"] for r in report["removed"]}
  assert report["rows_out"] == len(train) - 2
  out12 = str(tmp_path / "clean12.jsonl")  # at 12-grams the 12 shared words count too
  assert run(["data", "decontaminate", path, "--against", eval_path, "--ngram", "12", "--out", out12], capsys)[0] == 0
  assert clean[0] in {r["row"] for r in report_of(out12)["removed"]}


def test_filter_counts_each_rule(tmp_path, capsys):
  rng = np.random.default_rng(3)
  rows = [" ".join(words(rng, 30)) for _ in range(10)]
  plant = {"min_words": len(rows)}
  rows.append("")
  plant["dup_lines"] = len(rows)
  rows.append("\n".join(["same line here"] * 3 + ["another one"]))
  plant["dup_ngram"] = len(rows)
  rows.append(" ".join(words(rng, 10) + ["a1", "b1", "c1", "d1", "e1"] * 4))
  plant["non_text"] = len(rows)
  rows.append("$$$ ### %%% !!! ??? ok")
  path = write_jsonl(tmp_path / "f.jsonl", [{"text": t} for t in rows])
  out = str(tmp_path / "filtered.jsonl")
  assert run(["data", "filter", path, "--out", out], capsys)[0] == 0
  report = report_of(out)
  assert {r["row"] for r in report["removed"]} == set(plant.values())
  for name, row in plant.items():
    entry = next(r for r in report["removed"] if r["row"] == row)
    assert name in entry["rules"], entry
  assert report["rules"]["min_words"]["removed"] == 1 and report["rules"]["non_text"]["removed"] == 1
  assert report["rules"]["dup_ngram"]["threshold"] == 0.15 and report["rows_out"] == 10
  out = str(tmp_path / "long.jsonl")
  assert run(["data", "filter", path, "--min-words", "31", "--out", out], capsys)[0] == 0
  assert report_of(out)["rows_out"] == 0 and report_of(out)["rules"]["min_words"]["removed"] == 14


def test_stats_words_and_tokens(tmp_path, capsys, byte_model):
  path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi there", "answer": "a b c"}, {"prompt": "Hi  there!",
                                                                                       "answer": "A B C"}])
  out = str(tmp_path / "stats.json")
  assert run(["data", "stats", path, "--field", "prompt,answer", "--words", "--out", out], capsys)[0] == 0
  with open(out) as f:
    stats = json.load(f)
  assert stats["rows"] == 2 and stats["exact_duplicates"] == 1 and stats["fields"] == {"answer": 2, "prompt": 2}
  assert stats["length"]["max"] == 5 and os.path.getsize(out + ".png") > 1000
  out = str(tmp_path / "tokens.json")
  assert run(["data", "stats", path, "--field", "prompt", "--model", byte_model, "--out", out], capsys)[0] == 0
  with open(out) as f:
    assert json.load(f)["length"]["max"] == len("Hi  there!")  # one byte token per character


def test_select_keeps_fraction_and_ifd_by_hand(tmp_path, capsys, byte_model):
  import jax

  import jft

  rows = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}"}
          for w in ("cats", "dog!", "tree", "a, b", "rock", "Q: x", "wind", "fish")]  # one length: two shapes compile
  path = write_jsonl(tmp_path / "i.jsonl", rows)
  out = str(tmp_path / "ifd.jsonl")
  code, captured = run(["data", "select", path, "--model", byte_model, "--field", "instruction,input,output",
                        "--score", "ifd", "--fraction", "0.4", "--batch-size", "3", "--out", out], capsys)
  assert code == 0, captured.err
  report = report_of(out)
  scores = report["scores"]
  assert report["rows_out"] == 4 == len(rows) - len(report["removed"])  # ceil(0.4 * 8)
  kept = sorted(set(range(8)) - {r["row"] for r in report["removed"]})
  assert sorted(scores, reverse=True)[:4] == sorted((scores[i] for i in kept), reverse=True)
  with open(out) as f:
    assert [json.loads(line) for line in f] == [rows[i] for i in kept]

  model, params = jft.load_pretrained(byte_model)  # row 1 by hand: full logits, log-softmax, mean over the response
  tok = jft.load_tokenizer(byte_model)
  start = [tok.eos_token_id]  # no bos: the eos token starts the sequence
  prompt = tok("Say dog! twice.\n", add_special_tokens=False)["input_ids"]
  response = tok("dog! dog!", add_special_tokens=False)["input_ids"]

  full, short = start + prompt + response, start + response
  ids = np.zeros((2, len(full)), np.int32)  # right padding: a causal model's earlier positions never see it
  ids[0], ids[1, :len(short)] = full, short
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  mean_loss = lambda r, seq, first: -np.mean([logp[r, t - 1, seq[t]] for t in range(first, len(seq))])
  conditioned, alone = mean_loss(0, full, 1 + len(prompt)), mean_loss(1, short, 1)
  assert report["losses"]["conditioned"][1] == pytest.approx(conditioned, rel=1e-4)
  assert report["losses"]["alone"][1] == pytest.approx(alone, rel=1e-4)
  assert scores[1] == pytest.approx(conditioned / alone, rel=1e-4)

  out = str(tmp_path / "loss.jsonl")  # loss of one text field: every token after the start scored
  assert run(["data", "select", path, "--model", byte_model, "--field", "output", "--fraction", "1",
              "--batch-size", "3", "--out", out], capsys)[0] == 0
  assert report_of(out)["rows_out"] == 8 and all(s > 0 for s in report_of(out)["scores"])


@pytest.mark.parametrize("argv, message", [
    (["data", "shuffle", "IN", "--out", "OUT"], "unknown data command 'shuffle'; commands: stats, dedup, filter, "
                                                "decontaminate, select"),
    (["data", "dedup", "IN", "--ngram", "8", "--out", "OUT"], "--ngram applies to jft data decontaminate, not dedup"),
    (["data", "select", "IN", "--model", "M", "--out", "OUT"], "select needs --fraction F"),
    (["data", "dedup", "MISSING", "--out", "OUT"], "MISSING: no such file"),
    (["data", "dedup", "IN", "--field", "body", "--out", "OUT"], "no field 'body'; fields present: id, text"),
    (["data", "dedup", "IN", "--near", "0", "--out", "OUT"], "--near 0.0: must be in (0, 1]"),
    (["data", "dedup", "IN", "--near", "1.5", "--out", "OUT"], "--near 1.5: must be in (0, 1]"),
    (["data", "select", "IN", "--model", "M", "--fraction", "0", "--out", "OUT"], "--fraction 0.0: must be in (0, 1]"),
    (["data", "select", "IN", "--model", "M", "--fraction", "1.2", "--out", "OUT"], "--fraction 1.2: must be in"),
    (["data", "select", "IN", "--model", "M", "--score", "ifd", "--fraction", "0.5", "--out", "OUT"],
     "--score ifd needs prompt and response fields"),
    (["data", "decontaminate", "IN", "--against", "IN", "--ngram", "0", "--out", "OUT"], "--ngram 0: must be an"),
    (["data", "decontaminate", "IN", "--against", "NOPE", "--out", "OUT"], "--against NOPE: no such file"),
    (["data", "dedup", "IN", "--out", "IN"], "is an input; inputs are never modified"),
    (["data", "dedup", "IN", "--out", "OUT.txt"], "name a .jsonl or .json file"),
])
def test_bad_inputs_one_error_nothing_written(tmp_path, capsys, argv, message):
  path = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "some words here"}])
  before = sha(path)
  argv = [{"IN": path, "OUT": str(tmp_path / "out.jsonl"), "OUT.txt": str(tmp_path / "out.txt"),
           "MISSING": str(tmp_path / "missing.jsonl")}.get(a, a) for a in argv]
  code = main(argv)
  err = capsys.readouterr().err
  assert code == 2 and message.replace("MISSING", str(tmp_path / "missing.jsonl")) in err, err
  assert err.strip().count("\n") == 0 and err.startswith("jft data: error: ")
  assert sorted(os.listdir(tmp_path)) == ["in.jsonl"] and sha(path) == before


def test_existing_out_needs_overwrite(tmp_path, capsys):
  path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "A."}])
  out = tmp_path / "out.jsonl"
  out.write_text("old\n")
  code, captured = run(["data", "dedup", path, "--out", str(out)], capsys)
  assert code == 2 and "exists; pass --overwrite" in captured.err and out.read_text() == "old\n"
  assert not os.path.exists(str(out) + ".report.json")
  assert run(["data", "dedup", path, "--out", str(out), "--overwrite"], capsys)[0] == 0
  assert out.read_text() == '{"text": "a"}\n'


def test_library_pieces():
  assert curate.normalize("  Ｆｕｌｌ-width,\tTEXT!  ") == "fullwidth text"
  assert curate.lsh_bands(0.8) == (32, 4)
  b, r = curate.lsh_bands(0.5)
  assert (1 - 0.5 ** r) ** b < 1e-6
  assert curate.kept_count(0.3, 10) == 3 and curate.kept_count(0.01, 10) == 1
  assert curate.dup_ngram_fraction("a b c d e a b c d e".split(), 5) == 0.5
  with pytest.raises(curate.CurationError, match="unknown data command 'x'; commands: stats, dedup"):
    curate.command("x")
