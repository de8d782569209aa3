"""Build jft's embedded datasets from packages on PyPI (no dataset hub needed).

sentiment: the vaderSentiment 3.3.2 source archive ships Hutto & Gilbert's
  (ICWSM 2014) ground truth for 10,605 Rotten Tomatoes review snippets
  (id, mean human sentiment in [-4, 4], text). Snippets with |score| < 0.5
  are dropped; label = positive if score > 0. A seeded stratified
  80/10/10 split is written to data/sentiment/{train,validation,test}.jsonl.
chat: the English YAML files of the chatterbot-corpus wheel, as
  prompt/response pairs in data/chat/train.jsonl.

Each folder gets a SHA256SUMS file; `jft.data` checks it when loading.

    python scripts/prepare_data.py            # downloads with pip, writes data/
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _download(spec: str, folder: str, source: bool) -> str:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, spec]
  if source:
    cmd[5:5] = ["--no-binary", ":all:"]
  subprocess.run(cmd, check=True)
  (name,) = os.listdir(folder)
  return os.path.join(folder, name)


def write_jsonl(folder: str, splits: dict[str, list[dict]]):
  os.makedirs(folder, exist_ok=True)
  sums = []
  for split, rows in splits.items():
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(os.path.join(folder, f"{split}.jsonl"), "wb") as f:
      f.write(data)
    sums.append(f"{hashlib.sha256(data).hexdigest()}  {split}.jsonl\n")
  with open(os.path.join(folder, "SHA256SUMS"), "w") as f:
    f.writelines(sums)


def sentiment_rows(archive: str) -> list[dict]:
  with tarfile.open(archive) as outer:
    member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
    inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read()))
    member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
    text = inner.extractfile(member).read().decode("utf-8", errors="replace")
  rows = []
  for line in text.splitlines():
    parts = line.split("\t")
    if len(parts) < 3:
      continue
    score = float(parts[1])
    if abs(score) < 0.5:
      continue
    rows.append({"id": int(parts[0]), "text": parts[2].strip(), "score": score,
                 "label": "positive" if score > 0 else "negative"})
  return rows


def stratified_split(rows, seed=0, fractions=(0.8, 0.1, 0.1)):
  rng = np.random.default_rng(seed)
  out = {"train": [], "validation": [], "test": []}
  for label in sorted({r["label"] for r in rows}):
    group = [r for r in rows if r["label"] == label]
    order = rng.permutation(len(group))
    n_train = int(round(fractions[0] * len(group)))
    n_val = int(round(fractions[1] * len(group)))
    for i, idx in enumerate(order):
      split = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
      out[split].append(group[idx])
  for split in out:  # interleave the labels again, deterministically
    out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
  return out


def chat_rows(wheel: str) -> list[dict]:
  import yaml

  rows = []
  with zipfile.ZipFile(wheel) as z:
    for name in sorted(n for n in z.namelist() if "/data/english/" in n and n.endswith(".yml")):
      doc = yaml.safe_load(z.read(name).decode("utf-8"))
      topic = os.path.basename(name)[:-4]
      for conv in doc.get("conversations", []):
        for prompt, response in zip(conv, conv[1:]):
          if isinstance(prompt, str) and isinstance(response, str):
            rows.append({"topic": topic, "prompt": prompt.strip(), "response": response.strip()})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join(ROOT, "data"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(f"{tmp}/v"), os.makedirs(f"{tmp}/c")
    rows = sentiment_rows(_download("vaderSentiment==3.3.2", f"{tmp}/v", source=True))
    splits = stratified_split(rows)
    write_jsonl(os.path.join(args.out, "sentiment"), splits)
    print("sentiment:", {k: len(v) for k, v in splits.items()})
    chat = chat_rows(_download("chatterbot-corpus==1.3.3", f"{tmp}/c", source=False))
    write_jsonl(os.path.join(args.out, "chat"), {"train": chat})
    print("chat:", len(chat), "pairs")


if __name__ == "__main__":
  main()
