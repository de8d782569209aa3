"""The rows of jft's local harness tasks, read from the embedded data (lm_eval's `custom_dataset` hook)."""

import os

import datasets

from jft import data

HOLDOUT = 0.1  # the held-out fraction of one-file data sets, seed 0: what `data.holdout=0.1` makes the eval split


def data_dir(**metadata) -> str:
  """`data_dir` from the TaskManager's metadata, else JFT_DATA, else the checkout's data/ folder."""
  here = os.path.dirname(os.path.abspath(__file__))
  return metadata.get("data_dir") or os.environ.get("JFT_DATA") or os.path.join(here, "..", "..", "..", "data")


def _file(path: str, how: str) -> str:
  if not os.path.exists(path):
    raise data.DataError(f"{path}: missing; {how}")
  return path


def sentiment(**metadata):
  """The embedded test reviews (data/sentiment/test.jsonl: text, label)."""
  folder = _file(os.path.join(data_dir(**metadata), "sentiment"), "it ships with jft (scripts/prepare_data.py "
                 "rebuilds it)")
  return datasets.DatasetDict({"test": data.load_split(folder, "test")})


def alpaca_heldout(**metadata):
  """The held-out rows of the Alpaca demo set (instruction, input, output)."""
  path = _file(os.path.join(data_dir(**metadata), "llamafactory", "alpaca_en_demo.json"),
               "fetch it once with scripts/fetch_llamafactory_data.py (make test does)")
  rows = data.load_split(path, "validation", train_split="train", holdout=HOLDOUT)
  return datasets.DatasetDict({"validation": rows})


def chat(**metadata):
  """The held-out chat pairs, each with every response the file gives its prompt (`responses`)."""
  path = _file(os.path.join(data_dir(**metadata), "chat", "train.jsonl"), "it ships with jft")
  answers = {}
  for row in data.load_split(path):
    answers.setdefault(row["prompt"], []).append(row["response"])
  held = data.load_split(path, "validation", train_split="train", holdout=HOLDOUT)
  held = held.map(lambda row: {"responses": answers[row["prompt"]]})
  return datasets.DatasetDict({"validation": held})
