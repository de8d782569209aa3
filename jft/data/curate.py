"""Data curation before training (`jft data`): stats, exact and near dedup, rule filters, decontamination.

Layer 1 (imports core/ and data/ only): nothing here needs a model. Scoring rows with one
(`jft data select`) lives in `jft.studies.select`, which reads and writes through the helpers here.

Every command reads JSON (a list of rows) or JSONL files, writes a new file `OUT` (the rows kept, in
their input order; `.json` or `.jsonl` after OUT's name) and `OUT.report.json`, whose `removed` lists
each dropped row: its 0-based `row` in its input (with `file` when there are several inputs), the
`reason`, and for a duplicate the row `kept` in its place. Inputs are never modified; an existing OUT
is replaced only with `overwrite`; every check (inputs, fields, thresholds, OUT) runs before anything
is written.

Text. `fields` names the text of a row: one field (`text`) or several (`instruction,input,output`:
their values joined by a newline). Comparisons read the normalised text (`normalize`): Unicode NFKC,
lower case, punctuation (Unicode category P*) deleted, whitespace collapsed to single spaces; its
words are the whitespace-separated tokens of that.

- exact dedup: rows with the same normalised text; the first occurrence is kept.
- near dedup (`near=J`): word shingles (`shingle` consecutive normalised words; a row with fewer
  words is one shingle, its whole text), MinHash (datasketch, 128 permutations, seeded) and
  MinHashLSH with bands chosen so that a pair at Jaccard J is missed with probability < 1e-6; each
  LSH candidate is confirmed with the true Jaccard of the two shingle sets, so an LSH false positive
  never removes a row. Rows are visited in order; a row is dropped when a row kept before it has
  Jaccard >= J with it (the most similar such row is named as kept). With 5-word shingles one
  word changed in a 60-word row gives J = 0.84, two adjacent words 0.81, three scattered 0.58.
- decontaminate (`ngram=n`): a row is dropped when it shares an n-gram of normalised words with any
  row of the evaluation files; a row with fewer than n words (on either side) compares on its
  whole text, i.e. matches only a row with the same normalised text.
- filter: the rules of `RULES` (Gopher's, Rae et al. 2021, App. A, on whitespace words of the raw text).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
import unicodedata

from jft.core import files
from jft.data import DataError, text_of
from jft.data.preference import load_json_rows

COMMANDS = ("stats", "dedup", "filter", "decontaminate", "select")
FORMATS = {".jsonl": "jsonl", ".json": "json"}
NUM_PERM = 128
MISS_PROBABILITY = 1e-6  # of a pair at exactly the threshold, through the LSH bands


class CurationError(DataError):
  """A `jft data` input refused before anything is written (a command, file, field or setting)."""


# ---------------------------------------------------------------------------- inputs and outputs

@dataclasses.dataclass
class Table:
  """The rows of one or more input files, in order, and where each came from."""
  paths: list  # input files
  rows: list  # dicts, as read
  origin: list  # (file index, row number in that file)
  fields: tuple  # the text fields
  texts: list  # each row's fields joined by newlines

  def where(self, i: int) -> dict:
    """{"row": n} of row i in its file, with "file" when there are several inputs."""
    f, row = self.origin[i]
    return {"file": self.paths[f], "row": row} if len(self.paths) > 1 else {"row": row}


def parse_fields(spec) -> tuple:
  names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec))
  if not names or not all(names):
    raise CurationError(f"--field {spec!r}: give one field name or several separated by commas (instruction,output)")
  return names


def command(name: str) -> str:
  if name not in COMMANDS:
    raise CurationError(f"unknown data command {name!r}; commands: {', '.join(COMMANDS)}")
  return name


def read_table(paths, fields, flag: str = "input") -> Table:
  """The rows of `paths` (JSON lists or JSONL), each with every field of `fields` as text; a missing file
  or field is an error naming it (and the fields the rows do have)."""
  fields = parse_fields(fields)
  paths = [str(p) for p in paths]
  if not paths:
    raise CurationError(f"no {flag} file given")
  rows, origin, texts = [], [], []
  for f, path in enumerate(paths):
    if not os.path.isfile(path):
      raise CurationError(f"{flag} {path}: no such file")
    if os.path.splitext(path)[1] not in FORMATS:
      raise CurationError(f"{flag} {path}: expected a .json (a list of rows) or .jsonl file")
    for n, row in enumerate(load_json_rows(path)):
      missing = [name for name in fields if name not in row]
      if missing:
        raise CurationError(f"{path}: row {n} has no field {', '.join(map(repr, missing))}; fields present: "
                            f"{', '.join(sorted(row))} (choose with --field)")
      texts.append("\n".join(text_of(row, name, path, n) for name in fields))
      rows.append(row)
      origin.append((f, n))
  return Table(paths, rows, origin, fields, texts)


def output_paths(out: str, suffixes=(".report.json",)) -> list:
  return [out] + [out + s for s in suffixes]


def check_outputs(out: str, inputs, overwrite: bool, suffixes=(".report.json",), formats=True) -> list:
  """The files a command will write (OUT and its companions), checked before any work: never an input,
  an existing file only with `overwrite`, OUT ending .json or .jsonl (when it holds rows)."""
  if not out:
    raise CurationError("--out: name the output file")
  if formats and os.path.splitext(out)[1] not in FORMATS:
    raise CurationError(f"--out {out}: name a .jsonl or .json file (the rows kept are written in that format)")
  sources = {os.path.realpath(p) for p in inputs}
  paths = output_paths(out, suffixes)
  for path in paths:
    if os.path.realpath(path) in sources:
      raise CurationError(f"--out {out}: {path} is an input; inputs are never modified, name a new file")
    files.check_output(path, overwrite=overwrite, folder=False)
  return paths


def write_rows(path: str, rows):
  """Rows as JSONL (one object a line) or a JSON list (indented, as LLaMA-Factory's files are), by extension."""
  with files.write_file(path) as f:
    if FORMATS[os.path.splitext(path)[1]] == "jsonl":
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
      json.dump(list(rows), f, ensure_ascii=False, indent=2)
      f.write("\n")


def finish(out: str, table: Table, keep, removed: list, report: dict, t0: float) -> dict:
  """Write the kept rows to OUT and the report beside it; -> the report."""
  keep = sorted(keep)
  report = {"command": report.pop("command"), "inputs": table.paths,
            "input_sha256": {p: digest(p) for p in table.paths}, "fields": list(table.fields), "out": out,
            "rows_in": len(table.rows), "rows_out": len(keep), **report,
            "removed": sorted(removed, key=lambda r: (table.paths.index(r.get("file", table.paths[0])), r["row"]))}
  report["seconds"] = round(time.time() - t0, 3)
  write_rows(out, [table.rows[i] for i in keep])
  files.write_json(out + ".report.json", report)
  return report


# ---------------------------------------------------------------------------- normalised text

def normalize(text: str) -> str:
  """NFKC, lower case, punctuation deleted, whitespace collapsed: the text every comparison reads."""
  text = unicodedata.normalize("NFKC", text).lower()
  text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
  return " ".join(text.split())


def shingles(words, k: int) -> set:
  """The set of `k`-word shingles (joined by spaces); fewer than k words: one shingle, the whole text."""
  if len(words) < k:
    return {" ".join(words)} if words else set()
  return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, miss: float = MISS_PROBABILITY) -> tuple:
  """(bands, rows per band) for MinHashLSH: the most rows per band (fewest false candidates) that still
  miss a pair at Jaccard `threshold` with probability < `miss`: (1 - threshold**r)**b < miss."""
  best = (num_perm, 1)
  for r in range(1, num_perm + 1):
    b = num_perm // r
    if (1 - threshold ** r) ** b < miss:
      best = (b, r)
  return best


def check_fraction(flag: str, value: float):
  if not (isinstance(value, (int, float)) and 0 < value <= 1):
    raise CurationError(f"{flag} {value}: must be in (0, 1]")


def check_positive(flag: str, value: int):
  if not isinstance(value, int) or value < 1:
    raise CurationError(f"{flag} {value}: must be an integer >= 1")


# ---------------------------------------------------------------------------- stats

def stats(inputs, out: str, *, fields="text", lengths=None, unit: str = "words", bins: int = 40,
          overwrite: bool = False) -> dict:
  """Rows, fields, lengths (in `unit`: `lengths(texts)` -> counts, default whitespace words) with a
  histogram at OUT.png, exact duplicates; written as JSON to OUT (and OUT.report.json, nothing removed)."""
  t0 = time.time()
  check_positive("--bins", bins)
  table = read_table(inputs, fields)
  check_outputs(out, table.paths, overwrite, suffixes=(".png", ".report.json"), formats=False)
  counts = list(lengths(table.texts)) if lengths else [len(t.split()) for t in table.texts]
  present = collections.Counter(name for row in table.rows for name in row)
  first, duplicates, across = {}, 0, 0
  for i, text in enumerate(table.texts):
    key = normalize(text)
    if key in first:
      duplicates += 1
      across += table.origin[first[key]][0] != table.origin[i][0]
    else:
      first[key] = i
  ordered = sorted(counts)
  pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
  result = {"inputs": table.paths, "rows": len(table.rows),
            "rows_per_file": {p: sum(1 for f, _ in table.origin if f == k) for k, p in enumerate(table.paths)},
            "fields": dict(sorted(present.items())), "text_fields": list(table.fields),
            "length_unit": unit,
            "length": {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 2), "median": pick(0.5),
                       "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1], "total": sum(ordered)},
            "empty_rows": sum(1 for t in table.texts if not normalize(t)),
            "exact_duplicates": duplicates, "distinct_texts": len(first)}
  if len(table.paths) > 1:
    result["exact_duplicates_across_files"] = across
  plt = files.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.hist(counts, bins=bins, color="#4c72b0")
  ax.set_xlabel(f"length ({unit})")
  ax.set_ylabel("rows")
  ax.set_title(f"{len(counts)} rows, median {pick(0.5)} {unit}", fontsize=10)
  fig.tight_layout()
  files.save_figure(fig, out + ".png")
  plt.close(fig)
  files.write_json(out, result)
  files.write_json(out + ".report.json", {"command": "stats", "inputs": table.paths, "out": out,
                                          "rows_in": len(table.rows), "removed": [],
                                          "seconds": round(time.time() - t0, 3)})
  return result


# ---------------------------------------------------------------------------- dedup

def dedup(inputs, out: str, *, fields="text", near: float | None = None, shingle: int = 5, seed: int = 1,
          overwrite: bool = False) -> dict:
  """Exact duplicates of the normalised text (first occurrence kept); with `near`, then near duplicates at
  Jaccard >= near over word shingles (MinHash LSH candidates, confirmed exactly). -> the report."""
  t0 = time.time()
  if near is not None:
    check_fraction("--near", near)
  check_positive("--shingle", shingle)
  table = read_table(inputs, fields)
  check_outputs(out, table.paths, overwrite)
  removed, keep, first = [], [], {}
  counts = {"exact": 0}
  keys = [normalize(t) for t in table.texts]
  for i, key in enumerate(keys):
    if key in first:
      removed.append({**table.where(i), "reason": "exact duplicate", "kept": table.where(first[key])})
    else:
      first[key] = i
      keep.append(i)
  counts["exact"] = len(removed)
  settings = {"normalization": "NFKC, lower case, punctuation deleted, whitespace collapsed"}
  if near is not None:
    near_removed, candidates, bands = _near(table, keys, keep, near, shingle, seed)
    dropped = {i for i, _ in near_removed}
    keep = [i for i in keep if i not in dropped]
    removed += [entry for _, entry in near_removed]
    counts["near"] = len(near_removed)
    counts["near_candidates"] = candidates
    settings.update(near=near, shingle=shingle, num_perm=NUM_PERM, seed=seed, lsh_bands=list(bands))
  if len(table.paths) > 1:
    for kind in [k for k in ("exact", "near") if k in counts]:
      reason = "exact duplicate" if kind == "exact" else "near duplicate"
      counts[f"{kind}_across_files"] = sum(1 for r in removed
                                           if r["reason"] == reason and r["kept"]["file"] != r["file"])
  return finish(out, table, keep, removed, {"command": "dedup", "settings": settings, "counts": counts}, t0)


def _near(table: Table, keys, order, threshold: float, k: int, seed: int):
  """-> ([(row index, removed entry)], LSH candidates examined, (bands, rows)) over the rows in `order`."""
  from datasketch import MinHash, MinHashLSH

  sets = {i: shingles(keys[i].split(), k) for i in order}
  scored = [i for i in order if sets[i]]  # an empty text has no shingles: exact dedup already handled it
  hashes = MinHash.bulk([[s.encode("utf-8") for s in sets[i]] for i in scored], num_perm=NUM_PERM, seed=seed)
  bands = lsh_bands(threshold)
  lsh = MinHashLSH(num_perm=NUM_PERM, params=bands)
  found, examined = [], 0
  for i, mh in zip(scored, hashes):
    best = None
    for j in lsh.query(mh):
      examined += 1
      sim = jaccard(sets[i], sets[j])
      if sim >= threshold and (best is None or sim > best[0] or (sim == best[0] and j < best[1])):
        best = (sim, j)
    if best is None:
      lsh.insert(i, mh, check_duplication=False)
    else:
      found.append((i, {**table.where(i), "reason": "near duplicate", "jaccard": round(best[0], 4),
                        "kept": table.where(best[1])}))
  return found, examined, bands


# ---------------------------------------------------------------------------- filter

# Gopher's quality rules (Rae et al. 2021, Appendix A.1.1), on whitespace-separated words of the raw text.
# Its word-count bounds (50..100,000) are for web pages: the default minimum here is 1 (only empty rows),
# as short rows such as one-sentence reviews are the data, not noise.
RULES = {
    "min_words": ("fewer words than", 1),
    "max_words": ("more words than", 100_000),
    "dup_lines": ("fraction of lines that repeat an earlier line above", 0.30),
    "top_ngram": ("characters in the most frequent 2-gram above (3-gram: -0.02, 4-gram: -0.04)", 0.20),
    "dup_ngram": ("characters in repeated 5-grams above (one less hundredth per n up to 10-grams)", 0.15),
    "non_text": ("fraction of non-space characters that are not letters or digits above", 0.30),
}


def _chars(words) -> int:
  return sum(len(w) for w in words)


def top_ngram_fraction(words, n: int) -> float:
  """Characters of the most frequent n-gram times its count (when it repeats), over all words' characters."""
  total = _chars(words)
  if len(words) < n or not total:
    return 0.0
  grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  gram, count = grams.most_common(1)[0]
  return _chars(gram) * count / total if count > 1 else 0.0


def dup_ngram_fraction(words, n: int) -> float:
  """Characters of the words in every repeat (after the first occurrence) of an n-gram, repeats not
  overlapping one another, over all words' characters (Gopher's duplicate n-gram fraction)."""
  total = _chars(words)
  if len(words) < n or not total:
    return 0.0
  seen, covered, i = set(), 0, 0
  while i <= len(words) - n:
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered += _chars(gram)
      i += n
    else:
      seen.add(gram)
      i += 1
  return covered / total


def _worst(words, measure, ns, threshold: float, step: float) -> tuple:
  """(largest excess of measure(words, n) over its threshold, that n, the measure) over `ns`: the threshold of
  the first n is `threshold`, each next n's `step` lower (never below 0)."""
  best = None
  for k, n in enumerate(ns):
    value = measure(words, n)
    excess = value - max(threshold - step * k, 0.0)
    if best is None or excess > best[0]:
      best = (excess, n, value)
  return best


def rule_failures(text: str, limits: dict) -> dict:
  """The rules of `RULES` that `text` fails, each with its measured value (at `limits`' thresholds)."""
  words = text.split()
  failed = {}
  if len(words) < limits["min_words"]:
    failed["min_words"] = len(words)
  if len(words) > limits["max_words"]:
    failed["max_words"] = len(words)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  dup_lines = (len(lines) - len(set(lines))) / len(lines) if lines else 0.0
  if dup_lines > limits["dup_lines"]:
    failed["dup_lines"] = round(dup_lines, 4)
  excess, n, value = _worst(words, top_ngram_fraction, (2, 3, 4), limits["top_ngram"], 0.02)
  if excess > 0:
    failed["top_ngram"] = {"n": n, "fraction": round(value, 4)}
  excess, n, value = _worst(words, dup_ngram_fraction, range(5, 11), limits["dup_ngram"], 0.01)
  if excess > 0:
    failed["dup_ngram"] = {"n": n, "fraction": round(value, 4)}
  solid = [ch for ch in text if not ch.isspace()]
  non_text = sum(1 for ch in solid if not ch.isalnum()) / len(solid) if solid else 0.0
  if non_text > limits["non_text"]:
    failed["non_text"] = round(non_text, 4)
  return failed


def filter_rows(inputs, out: str, *, fields="text", min_words: int = RULES["min_words"][1],
                max_words: int = RULES["max_words"][1], max_dup_lines: float = RULES["dup_lines"][1],
                max_top_ngram: float = RULES["top_ngram"][1], max_dup_ngram: float = RULES["dup_ngram"][1],
                max_non_text: float = RULES["non_text"][1], overwrite: bool = False) -> dict:
  """Drop rows failing any rule of `RULES`; the report counts each rule's failures (a row may fail several;
  its entry names them all) and gives the thresholds."""
  t0 = time.time()
  if not isinstance(min_words, int) or min_words < 0:
    raise CurationError(f"--min-words {min_words}: must be an integer >= 0")
  if not isinstance(max_words, int) or max_words < max(min_words, 1):
    raise CurationError(f"--max-words {max_words}: must be an integer >= --min-words ({min_words}) and >= 1")
  for flag, value in (("--max-dup-lines", max_dup_lines), ("--max-top-ngram", max_top_ngram),
                      ("--max-dup-ngram", max_dup_ngram), ("--max-non-text", max_non_text)):
    check_fraction(flag, value)
  table = read_table(inputs, fields)
  check_outputs(out, table.paths, overwrite)
  limits = {"min_words": min_words, "max_words": max_words, "dup_lines": max_dup_lines, "top_ngram": max_top_ngram,
            "dup_ngram": max_dup_ngram, "non_text": max_non_text}
  counts = {name: 0 for name in limits}
  keep, removed = [], []
  for i, text in enumerate(table.texts):
    failed = rule_failures(text, limits)
    for name in failed:
      counts[name] += 1
    if failed:
      removed.append({**table.where(i), "reason": next(iter(failed)), "rules": failed})
    else:
      keep.append(i)
  rules = {name: {"rule": RULES[name][0], "threshold": limits[name], "removed": counts[name]} for name in limits}
  return finish(out, table, keep, removed, {"command": "filter", "rules": rules}, t0)


# ---------------------------------------------------------------------------- decontaminate

def _grams(words, n: int):
  """The n-grams of a word list; a shorter list is one key, its whole text (`\\x00` marks it whole)."""
  if len(words) < n:
    return ["\x00" + " ".join(words)] if words else []
  return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def decontaminate(inputs, out: str, *, against, fields="text", against_fields=None, ngram: int = 13,
                  overwrite: bool = False) -> dict:
  """Drop the rows of `inputs` that share an `ngram`-gram of normalised words with any row of the `against`
  files (rows shorter than n words: the same whole normalised text); the report names the evaluation file,
  row and the shared words."""
  t0 = time.time()
  check_positive("--ngram", ngram)
  if not against:
    raise CurationError("--against: name at least one evaluation file")
  table = read_table(inputs, fields)
  evals = read_table(against, against_fields or fields, flag="--against")
  check_outputs(out, table.paths + evals.paths, overwrite)
  index = {}
  for e, text in enumerate(evals.texts):
    for gram in _grams(normalize(text).split(), ngram):
      index.setdefault(gram, e)
  keep, removed = [], []
  for i, text in enumerate(table.texts):
    hit = next((g for g in _grams(normalize(text).split(), ngram) if g in index), None)
    if hit is None:
      keep.append(i)
      continue
    f, row = evals.origin[index[hit]]
    whole = hit.startswith("\x00")
    removed.append({**table.where(i), "reason": "whole text in an eval row" if whole else f"shares a {ngram}-gram",
                    "eval": {"file": evals.paths[f], "row": row}, "ngram": hit.lstrip("\x00")})
  settings = {"ngram": ngram, "against": evals.paths, "against_rows": len(evals.rows),
              "normalization": "NFKC, lower case, punctuation deleted, whitespace collapsed",
              "short_rows": f"rows under {ngram} words match only the same whole normalised text"}
  counts = {"contaminated": len(removed),
            "by_eval_file": dict(collections.Counter(r["eval"]["file"] for r in removed))}
  return finish(out, table, keep, removed, {"command": "decontaminate", "settings": settings, "counts": counts}, t0)


def digest(path: str) -> str:
  """SHA-256 of an input file, recorded in the report (which bytes the output was made from)."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def kept_count(fraction: float, rows: int) -> int:
  """Rows kept by `select --fraction`: ceil(fraction * rows) (at least one), rounding error aside."""
  return max(1, math.ceil(round(fraction * rows, 9)))
