"""Workload races: the jobs users run, end to end, jft against the tools they would pick instead.

    python benchmarks/race.py --workload demo            # the README's main job against HF Trainer + peft
    python benchmarks/race.py --workload sft             # chat SFT against TRL's SFTTrainer (packing, padding-free)
    python benchmarks/race.py --workload dpo             # DPO against TRL's DPOTrainer with a peft LoRA
    python benchmarks/race.py --workload demo --steps 40 --eval-rows 200   # a reduced budget
    python benchmarks/race.py --workload demo --quick    # a tiny random model: checks the race runs

One setup process first (not timed) builds what both sides share from the
config jft runs (`configs/sentiment.py`, `chat_sft.py`, `dpo.py`): the base as
an HF folder (`jft.models.pretrained.save_pretrained` of the weights jft loads,
for the demo decoded from the same GGUF), jft's initial adapter as a peft folder
(the run's own `build_state` with its seed: both sides start from the same LoRA
A and B), the order of the training examples jft's `Batches` draws, and the
tokenized rows. Then the sides run, alternating, each in its own process: jft
as `jft train` (with `--config.train.log_every=1` so every step's time is
recorded), the peer as a script of transformers `Trainer` / TRL with the
config's optimizer (AdamW, betas, eps 1e-8, weight decay, clipping), schedule
(linear warmup, cosine to `final_lr_ratio`), steps, batch size and threads.

The demo's peer tokenizes the review files itself with the converted tokenizer
(checked equal to jft's rows), trains on jft's batches in jft's order with
labels -100 everywhere but the response (the label word and its end token, as
jft's loss mask), and evaluates as `Trainer.evaluate` with
`preprocess_logits_for_metrics` keeping the two label words' logits at the
answer position: the same comparison as jft's accuracy. Its wall clock runs
from its process start to the printed test accuracy, so the peer's imports and
its load of the converted folder count as its load, as jft's GGUF decoding and
imports count as jft's. jft runs twice: cold (a fresh `JFT_CACHE_DIR`: the
GGUF decoded and every program compiled) and warm (the same cache again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The peer as measured: a different version changes what is raced, so the race refuses to start.
PEER_VERSIONS = {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.22.0", "trl": "1.16.0",
                 "accelerate": "1.16.0", "datasets": "5.2.0"}

WORKLOADS = {
    # config spec, overrides of --quick (the tiny model's folder is added), the peer's trainer
    "demo": dict(spec="configs/sentiment.py:method=lora",
                 quick=dict(**{"train.steps": 4, "train.save_every": 2, "data.max_train_examples": 64,
                               "data.max_eval_examples": 16, "data.max_test_examples": 16})),
    "sft": dict(spec="configs/chat_sft.py:method=lora",
                quick=dict(**{"train.steps": 4, "train.save_every": 4, "data.max_train_examples": 96})),
    "dpo": dict(spec="configs/dpo.py",
                quick=dict(**{"train.steps": 3, "train.save_every": 3, "train.batch_size": 2, "train.eval_every": 0,
                              "data.max_train_examples": 12, "data.max_eval_examples": 4, "data.max_length": 128})),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)


class RaceError(Exception):
  """A side that failed or a race that cannot start (named, one line)."""


def check_versions():
  from importlib import metadata
  wrong = []
  for name, want in PEER_VERSIONS.items():
    try:
      got = metadata.version(name)
    except metadata.PackageNotFoundError:
      got = "not installed"
    if got.split("+")[0] != want:
      wrong.append(f"{name} {got} (pinned {want})")
  if wrong:
    raise RaceError("the peer's versions differ from the pinned ones: " + ", ".join(wrong) +
                    "; install the pins (`pip install -e '.[test]'`) or update PEER_VERSIONS with a new race")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sha(rows) -> str:
  import hashlib
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps([[int(t) for t in part] for part in row]).encode())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------
# Setup (one process, not timed): what both sides share
# ----------------------------------------------------------------------------

def tiny_folder(folder: str):
  """A random tiny Llama with SmolLM2's tokenizer (its vocabulary and chat template are real)."""
  import torch
  import transformers

  import jft
  tokenizer = jft.load_tokenizer("smollm2-135m")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY)
  transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
  tokenizer.save_pretrained(folder)


def short_pairs(path: str, n: int = 16) -> str:
  """Preference pairs from the chat data (chosen: a prompt's response, rejected: the next row's): --quick only."""
  with open(os.path.join(ROOT, "data", "chat", "train.jsonl")) as f:
    rows = [json.loads(line) for _, line in zip(range(n + 1), f)]
  with open(path, "w") as f:
    for a, b in zip(rows, rows[1:]):
      f.write(json.dumps({"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]}) + "\n")
  return path


def worker_setup(args) -> dict:
  import jax
  import numpy as np

  from jft import config as jconfig
  from jft import data, objectives, peft, run
  from jft.models import pretrained, sharding
  from jft.peft import peft_format
  from jft.run.train import examples_for

  overrides = json.loads(args.overrides)
  if args.quick:
    tiny_folder(os.path.join(args.out, "tiny"))
    overrides["model.name"] = os.path.join(args.out, "tiny")
    if args.workload == "dpo":  # the shipped pairs run to 1,280 tokens: short ones keep the smoke run short
      overrides["data.path"] = short_pairs(os.path.join(args.out, "pairs.jsonl"))
  c = jconfig.build(os.path.join(ROOT, WORKLOADS[args.workload]["spec"]), list(overrides.items()))
  mesh = sharding.make_mesh(c.train.mesh.to_dict())
  model, base, method, tokenizer = run.build_model(c, mesh)
  hf_dir, adapter_dir = os.path.join(args.out, "hf"), os.path.join(args.out, "adapter")
  pretrained.save_pretrained(model, base, hf_dir, tokenizer=tokenizer)
  params = int(sum(np.size(x) for x in jax.tree.leaves(base)))
  st = run.build_state(c, method, base, mesh)  # takes `base` over (its buffers are donated)
  peft_format.export_peft(method, peft.combine(st.trainable, st.frozen), model.config, adapter_dir)
  objective = objectives.from_config(c)
  d = c.data
  rows = {}
  for split, limit in ((d.train_split, d.max_train_examples), (d.eval_split, d.max_eval_examples),
                       (d.test_split, d.max_test_examples)):
    if split:
      rows[split] = objective.rows(examples_for(c, tokenizer, split, limit or None), tokenizer, d)
  train = rows[d.train_split]
  indexed = [(r, i) for i, r in enumerate(train)]
  # the batches `jft train` takes, as example indices: jft's own Batches with a collate that keeps the indices
  batches = data.Batches(indexed, objective.rows_per_batch(c.train.batch_size), d.max_length, seed=c.seed,
                         pack=d.pack, bucket=d.bucket, collate=lambda rs, length, pad: [i for _, i in rs],
                         length=lambda r: objective.row_length(r[0]))
  order = [] if d.pack else [next(batches) for _ in range(c.train.steps)]
  as_lists = lambda r: [np.asarray(x).tolist() for x in r]
  plan = {
      "workload": args.workload, "hf": hf_dir, "adapter": adapter_dir, "model": c.model.name,
      "config": c.to_dict(), "order": order, "params": params,
      "trainable": peft.count(method, peft.combine(st.trainable, st.frozen)).trainable,
      "rows": {split: [as_lists(r) for r in rs] for split, rs in rows.items()},
      "rows_sha": {split: sha(as_lists(r) for r in rs) for split, rs in rows.items()},
      "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
  }
  if args.workload == "demo":
    from jft.objectives import evaluate
    plan["label_ids"] = evaluate.label_token_ids(tokenizer, tuple(d.labels), d.chat)
  with open(os.path.join(args.out, "plan.json"), "w") as f:
    json.dump(plan, f)
  return {"plan": os.path.join(args.out, "plan.json")}


# ----------------------------------------------------------------------------
# The peer: transformers Trainer + peft, TRL
# ----------------------------------------------------------------------------

def peer_args(cls, plan, out, **extra):
  """The run config's optimizer, schedule, steps and batch as (SFT/DPO)TrainingArguments."""
  c = plan["config"]
  o, t = c["optim"], c["train"]
  if o["name"] != "adamw" or o["schedule"] != "cosine" or o["grad_accum"] != 1:
    raise RaceError(f"the peer mirrors AdamW with a cosine schedule and no accumulation, not {o['name']} "
                    f"{o['schedule']} x{o['grad_accum']}")
  return cls(output_dir=out, max_steps=t["steps"], per_device_train_batch_size=t["batch_size"],
             per_device_eval_batch_size=c["eval"]["batch_size"], learning_rate=o["lr"],
             lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": o["final_lr_ratio"]},
             warmup_steps=min(o["warmup_steps"], max(t["steps"] - 1, 0)), optim="adamw_torch",
             adam_beta1=o["b1"], adam_beta2=o["b2"], adam_epsilon=1e-8, weight_decay=o["weight_decay"],
             max_grad_norm=o["clip_norm"] if o["clip_norm"] > 0 else 0.0, logging_steps=1,
             save_strategy="steps", save_steps=t["save_every"], report_to="none", use_cpu=True, seed=c["seed"],
             disable_tqdm=True, dataloader_pin_memory=False, **extra)


def peer_model(plan, threads: int):
  import peft
  import torch
  import transformers
  torch.set_num_threads(threads)
  tokenizer = transformers.AutoTokenizer.from_pretrained(plan["hf"])
  model = transformers.AutoModelForCausalLM.from_pretrained(plan["hf"], dtype=torch.float32,
                                                            attn_implementation="sdpa")
  model = peft.PeftModel.from_pretrained(model, plan["adapter"], is_trainable=True)  # jft's initial A and B
  return model, tokenizer


def step_clock():
  """A TrainerCallback recording each step's seconds and logged loss."""
  import transformers

  class Clock(transformers.TrainerCallback):
    def __init__(self):
      self.times, self.losses, self.metrics, self._t = [], [], [], None

    def on_step_begin(self, args, state, control, **kw):
      self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.times.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and "loss" in logs:
        self.losses.append(float(logs["loss"]))
      if logs:
        self.metrics.append(dict(logs))
  return Clock()


def demo_rows(plan, tokenizer, split: str) -> list:
  """The peer's own preprocessing of the review files: prompt + " label" + eos, cut from the left."""
  d = plan["config"]["data"]
  path = os.path.join(d["path"], f"{split}.jsonl")
  limit = {d["train_split"]: d["max_train_examples"], d["eval_split"]: d["max_eval_examples"],
           d["test_split"]: d["max_test_examples"]}[split]
  out = []
  with open(path) as f:
    for line in f:
      if limit and len(out) >= limit:
        break
      row = json.loads(line)
      prompt = tokenizer(d["template"].format(text=row[d["text_field"]]))["input_ids"]
      response = tokenizer(" " + row[d["label_field"]], add_special_tokens=False)["input_ids"]
      response += [tokenizer.eos_token_id]
      room = d["max_length"] - len(response)
      prompt = prompt[-room:] if len(prompt) > room else prompt
      out.append((prompt + response, [0] * len(prompt) + [1] * len(response)))
  return out


def worker_peer_demo(args) -> dict:
  marks = {"start": float(args.t0)}
  import torch
  import transformers
  with open(args.plan) as f:
    plan = json.load(f)
  d = plan["config"]["data"]
  model, tokenizer = peer_model(plan, args.threads)
  rows = {split: demo_rows(plan, tokenizer, split) for split in (d["train_split"], d["eval_split"], d["test_split"])}
  same = all(sha(rs) == plan["rows_sha"][split] for split, rs in rows.items())
  as_example = lambda r: {"input_ids": r[0], "labels": [t if m else -100 for t, m in zip(*r)]}
  train = [as_example(rows[d["train_split"]][i]) for batch in plan["order"] for i in batch]
  pad = plan["pad_id"]

  def collate(examples):
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
      k = len(e["input_ids"])
      ids[r, :k], labels[r, :k], mask[r, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

  label_ids = torch.tensor(plan["label_ids"])

  def at_answer(logits, labels):  # the label words' logits where the prompt ends: no [N, T, V] kept
    logits = logits[0] if isinstance(logits, tuple) else logits
    answer = (labels != -100).int().argmax(1) - 1
    return logits[torch.arange(logits.shape[0]), answer][:, label_ids]

  def accuracy(pred):
    scores, labels = pred.predictions, pred.label_ids
    first = labels[range(len(labels)), (labels != -100).argmax(1)]
    return {"accuracy": float(((scores.argmax(-1) == 1) == (first == plan["label_ids"][1])).mean())}

  clock = step_clock()
  with tempfile.TemporaryDirectory() as out:
    trainer = transformers.Trainer(model=model, args=peer_args(transformers.TrainingArguments, plan, out,
                                                               train_sampling_strategy="sequential"),
                                   train_dataset=train, data_collator=collate, compute_metrics=accuracy,
                                   preprocess_logits_for_metrics=at_answer, callbacks=[clock])
    marks["load"] = time.time()
    test = [as_example(r) for r in rows[d["test_split"]]]
    zero = trainer.evaluate(eval_dataset=test, metric_key_prefix="zero")
    marks["zero-shot"] = time.time()
    trainer.train()
    marks["train"] = time.time()
    val = trainer.evaluate(eval_dataset=[as_example(r) for r in rows[d["eval_split"]]], metric_key_prefix="eval")
    marks["eval"] = time.time()
    final = trainer.evaluate(eval_dataset=test, metric_key_prefix="test")
    marks["test"] = time.time()
  print(f"test accuracy {final['test_accuracy']:.4f}", flush=True)
  return {"marks": marks, "times": clock.times, "losses": clock.losses, "tokens_equal": same,
          "zero_shot": zero["zero_accuracy"], "validation": val["eval_accuracy"], "test": final["test_accuracy"],
          "rss_mib": peak_rss_mib()}


def worker_peer_sft(args) -> dict:
  marks = {"start": float(args.t0)}
  import datasets
  import trl
  with open(args.plan) as f:
    plan = json.load(f)
  c = plan["config"]
  model, tokenizer = peer_model(plan, args.threads)
  train = datasets.Dataset.from_list([{"input_ids": ids, "completion_mask": mask}
                                      for ids, mask in plan["rows"][c["data"]["train_split"]]])
  counted = []

  class Counting(trl.SFTTrainer):
    def compute_loss(self, model, inputs, *a, **kw):
      counted.append(int((inputs["labels"] != -100).sum()))
      return super().compute_loss(model, inputs, *a, **kw)

  clock = step_clock()
  with tempfile.TemporaryDirectory() as out:
    config = peer_args(trl.SFTConfig, plan, out, packing=True, packing_strategy="bfd", padding_free=True,
                       completion_only_loss=True, max_length=c["data"]["max_length"])
    trainer = Counting(model=model, args=config, train_dataset=train, processing_class=tokenizer, callbacks=[clock])
    marks["load"] = time.time()
    trainer.train()
    marks["train"] = time.time()
  return {"marks": marks, "times": clock.times, "losses": clock.losses, "response_tokens": counted,
          "rss_mib": peak_rss_mib()}


def worker_peer_dpo(args) -> dict:
  marks = {"start": float(args.t0)}
  import datasets
  import trl
  with open(args.plan) as f:
    plan = json.load(f)
  c, d = plan["config"], plan["config"]["data"]
  hp = c["objective"]["hparams"]
  model, tokenizer = peer_model(plan, args.threads)
  as_pair = lambda r: {"prompt_ids": r[0], "chosen_ids": r[1], "rejected_ids": r[2]}
  train = datasets.Dataset.from_list([as_pair(plan["rows"][d["train_split"]][i])
                                      for batch in plan["order"] for i in batch])
  evals = datasets.Dataset.from_list([as_pair(r) for r in plan["rows"].get(d["eval_split"], [])])

  class Tokenized(trl.DPOTrainer):
    """jft's tokenized pairs as they are (the same tokens on both sides)."""
    def _prepare_dataset(self, dataset, *a, **kw):
      return dataset

  clock = step_clock()
  with tempfile.TemporaryDirectory() as out:
    config = peer_args(trl.DPOConfig, plan, out, beta=hp.get("beta", 0.1), loss_type=[hp.get("loss_type", "sigmoid")],
                       max_length=None, train_sampling_strategy="sequential", precompute_ref_log_probs=False)
    trainer = Tokenized(model=model, args=config, train_dataset=train, eval_dataset=evals if len(evals) else None,
                        processing_class=tokenizer, callbacks=[clock])
    marks["load"] = time.time()
    trainer.train()
    marks["train"] = time.time()
    ev = trainer.evaluate() if len(evals) else {}
    marks["eval"] = time.time()
  return {"marks": marks, "times": clock.times, "losses": clock.losses,
          "accuracy": ev.get("eval_rewards/accuracies", float("nan")), "rss_mib": peak_rss_mib()}


WORKERS = {"setup": worker_setup, "peer-demo": worker_peer_demo, "peer-sft": worker_peer_sft,
           "peer-dpo": worker_peer_dpo}


# ----------------------------------------------------------------------------
# The jft side: `jft train` as a user runs it
# ----------------------------------------------------------------------------

def jft_command() -> list[str]:
  exe = os.path.join(os.path.dirname(sys.executable), "jft")
  return [exe] if os.path.exists(exe) else [sys.executable, "-m", "jft.cli"]


def run_jft(plan, overrides: dict, cache: str, workdir: str, say) -> dict:
  """`jft train` in a subprocess under `cache` as JFT_CACHE_DIR (its compiled programs too); the wall
  clock from the process start to the printed test line, or to its exit when the run has no test split."""
  env = dict(os.environ, JFT_CACHE_DIR=cache, TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # under JFT_CACHE_DIR/xla, as `jft` sets it itself
  spec = os.path.join(ROOT, WORKLOADS[plan["workload"]]["spec"])
  cmd = jft_command() + ["train", "--config", spec, "--workdir", workdir, "--config.train.log_every=1"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  start = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  printed, tail = None, []
  for line in proc.stdout:
    tail = (tail + [line.rstrip()])[-5:]
    if printed is None and (line.startswith("test ") or line.startswith("after training, test split")):
      printed = time.time()
  proc.wait()
  end = time.time()
  if proc.returncode:
    raise RaceError(f"jft train exited {proc.returncode}: " + " / ".join(tail)[-400:])
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  steps = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("kind") == "train":
        steps.append(record)
  say(f"    jft: {(printed or end) - start:.1f} s")
  return {"wall": (printed or end) - start, "exit": end - start, "results": results, "steps": steps}


def spawn(kind: str, say, **kw) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--t0", repr(time.time())]
  for k, v in kw.items():
    cmd += [f"--{k.replace('_', '-')}", str(v)]
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
  cmd[cmd.index("--t0") + 1] = repr(time.time())
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
    raise RaceError(f"{kind} failed: " + " / ".join(tail)[-500:])
  out = json.loads(lines[-1])
  if "marks" in out:
    say(f"    {kind}: {max(out['marks'].values()) - out['marks']['start']:.1f} s")
  return out


# ----------------------------------------------------------------------------
# Summaries and the report
# ----------------------------------------------------------------------------

def step_summary(times: list) -> dict:
  """First step (its compile or warm-up) apart from the steady median; `compile` adds every step past 2x the
  median (a new padded length compiles a new program)."""
  if not times:
    return {"first": float("nan"), "median": float("nan"), "compile": float("nan"), "rest": float("nan")}
  rest = times[1:] or times
  median = statistics.median(rest)
  extra = sum(t - median for t in times if t > 2 * median)
  return {"first": times[0], "median": median, "compile": extra, "rest": sum(rest) if len(times) > 1 else times[0]}


def jft_phases(run: dict) -> dict:
  """jft's phases from its results.json; load = the rest of the wall clock (imports, re-exec, GGUF, data, state)."""
  p = run["results"].get("phases", {})
  out = {"zero-shot": p.get("zero-shot", 0.0), "train": p.get("training steps", 0.0) + p.get("checkpoints", 0.0),
         "eval": p.get("evaluation", 0.0) + p.get("samples", 0.0), "test": p.get("test", 0.0)}
  out["load"] = run["wall"] - sum(out.values())
  return out


def peer_phases(rec: dict) -> dict:
  m, out, last = rec["marks"], {}, rec["marks"]["start"]
  for name in ("load", "zero-shot", "train", "eval", "test"):
    if name in m:
      out[name], last = m[name] - last, m[name]
  return out


def fmt(x, spec=".1f") -> str:
  return "-" if x is None or x != x else format(x, spec)


def demo_rows_md(plan, cold, warm, peer) -> tuple[list, list]:
  c = plan["config"]
  lines = [f"Demo: {c['model']['name']} ({plan['params']:,} parameters), LoRA r={c['method']['hparams']['rank']} on "
           f"{'/'.join(c['method']['hparams']['targets'])} ({plan['trainable']:,} trainable), "
           f"{c['train']['steps']} steps x {c['train']['batch_size']} reviews, zero-shot and test on "
           f"{len(plan['rows'][c['data']['test_split']])} test reviews, validation on "
           f"{len(plan['rows'][c['data']['eval_split']])}. Peer: transformers Trainer + peft on the converted "
           f"folder, jft's batches in jft's order, the same label-word loss and accuracy; tokens equal: "
           f"{'yes' if peer['tokens_equal'] else 'NO'}.", "",
           "| side | wall s to test accuracy | load | zero-shot | train | eval | test | first step s | "
           "compile s (all shapes) | steady step s | loss step 1 | zero-shot acc | test acc | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  out = {}
  for name, run in (("jft cold", cold), ("jft warm", warm)):
    if run is None:
      continue
    ph, st = jft_phases(run), step_summary([s["step_seconds"] for s in run["steps"]])
    r = run["results"]
    out[name] = (run["wall"], r.get("test", {}).get("accuracy", float("nan")))
    lines.append(f"| {name} | {run['wall']:.1f} | " + " | ".join(fmt(ph[k]) for k in ("load", "zero-shot", "train",
                                                                                       "eval", "test")) +
                 f" | {fmt(st['first'])} | {fmt(st['compile'])} | {fmt(st['median'], '.2f')} | "
                 f"{fmt(run['steps'][0]['loss'] if run['steps'] else None, '.4f')} | "
                 f"{fmt(r.get('zero_shot', {}).get('accuracy'), '.3f')} | {fmt(out[name][1], '.3f')} | "
                 f"{fmt(r.get('peak_rss_mib'), '.0f')} |")
  ph, st = peer_phases(peer), step_summary(peer["times"])
  wall = peer["marks"]["test"] - peer["marks"]["start"]
  lines.append(f"| peer | {wall:.1f} | " + " | ".join(fmt(ph.get(k)) for k in ("load", "zero-shot", "train", "eval",
                                                                                 "test")) +
               f" | {fmt(st['first'])} | {fmt(st['compile'])} | {fmt(st['median'], '.2f')} | "
               f"{fmt(peer['losses'][0] if peer['losses'] else None, '.4f')} | {peer['zero_shot']:.3f} | "
               f"{peer['test']:.3f} | {peer['rss_mib']:.0f} |")
  ratios = []
  for name, (w, acc) in out.items():
    ratios.append(f"peer / {name} wall clock = {wall / w:.2f}x (target >= 1.3); test accuracy {acc:.3f} vs "
                  f"{peer['test']:.3f} (|diff| {abs(acc - peer['test']):.3f}, target <= 0.01)")
  return lines, ratios


def sft_rows_md(plan, run, peer) -> tuple[list, list]:
  c = plan["config"]
  st = step_summary([s["step_seconds"] for s in run["steps"]])
  j_tokens = sum(s.get("loss_tokens", 0) for s in run["steps"][1:])
  j_rate = j_tokens / max(sum(s["step_seconds"] for s in run["steps"][1:]), 1e-9)
  pst = step_summary(peer["times"])
  p_rate = sum(peer["response_tokens"][1:]) / max(sum(peer["times"][1:]), 1e-9)
  k = max(1, len(run["steps"]) // 5)
  j_loss = statistics.mean(s["loss"] for s in run["steps"][-k:])
  p_loss = statistics.mean(peer["losses"][-k:]) if peer["losses"] else float("nan")
  lines = [f"SFT: {c['model']['name']}, LoRA r={c['method']['hparams']['rank']} on "
           f"{'/'.join(c['method']['hparams']['targets'])}, {c['train']['steps']} steps, batch "
           f"{c['train']['batch_size']} x {c['data']['max_length']} packed (jft) / TRL SFTTrainer packing bfd + "
           "padding-free, completion-only loss, on jft's tokenized rows; both from jft's initial adapter.", "",
           "| side | response tok/s (after step 1) | first step s | steady step s | final loss (last 20% of steps) "
           "| peak RSS MiB |", "|---|---:|---:|---:|---:|---:|",
           f"| jft | {j_rate:.0f} | {fmt(st['first'])} | {fmt(st['median'], '.2f')} | {j_loss:.4f} | "
           f"{fmt(run['results'].get('peak_rss_mib'), '.0f')} |",
           f"| TRL | {p_rate:.0f} | {fmt(pst['first'])} | {fmt(pst['median'], '.2f')} | {p_loss:.4f} | "
           f"{peer['rss_mib']:.0f} |"]
  ratios = [f"jft / TRL response tokens/s = {j_rate / p_rate:.2f}x (target >= 1.3); final loss "
            f"{j_loss:.4f} vs {p_loss:.4f} ({(j_loss / p_loss - 1) * 100:+.1f}%, target within 2%)"]
  return lines, ratios


def dpo_rows_md(plan, run, peer) -> tuple[list, list]:
  c = plan["config"]
  b = c["train"]["batch_size"]
  st, pst = step_summary([s["step_seconds"] for s in run["steps"]]), step_summary(peer["times"])
  j_rate = b * (len(run["steps"]) - 1) / max(sum(s["step_seconds"] for s in run["steps"][1:]), 1e-9)
  p_rate = b * (len(peer["times"]) - 1) / max(sum(peer["times"][1:]), 1e-9)
  j_acc = run["results"].get("validation", {}).get("rewards/accuracies", float("nan"))
  j_rss, p_rss = run["results"].get("peak_rss_mib", float("nan")), peer["rss_mib"]
  lines = [f"DPO: {c['model']['name']}, LoRA r={c['method']['hparams']['rank']} on "
           f"{'/'.join(c['method']['hparams']['targets'])}, {c['train']['steps']} steps x {b} pairs (max length "
           f"{c['data']['max_length']}), {os.path.basename(c['data']['path'])} (jft's configs/dpo.py data, not "
           "`jft pairs` output; --quick: pairs made from the chat data), reference = the adapter switched off on "
           "both sides; TRL DPOTrainer on jft's "
           "tokenized pairs in jft's order.", "",
           "| side | pairs/s (after step 1) | first step s | steady step s | eval reward accuracy | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|",
           f"| jft | {j_rate:.2f} | {fmt(st['first'])} | {fmt(st['median'], '.2f')} | {fmt(j_acc, '.3f')} | "
           f"{fmt(j_rss, '.0f')} |",
           f"| TRL | {p_rate:.2f} | {fmt(pst['first'])} | {fmt(pst['median'], '.2f')} | "
           f"{fmt(peer['accuracy'], '.3f')} | "
           f"{p_rss:.0f} |"]
  ratios = [f"jft / TRL pairs/s = {j_rate / p_rate:.2f}x (target >= 1.2); reward accuracy {fmt(j_acc, '.3f')} vs "
            f"{fmt(peer['accuracy'], '.3f')}; peak RSS {fmt(j_rss, '.0f')} vs {p_rss:.0f} MiB (target <=)"]
  return lines, ratios


def load_note() -> str:
  try:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "load average unknown"


def write_section(path: str, workload: str, body: list):
  """Replace this workload's part of the "## Workloads" section of results.md (kept when race.py rewrites it)."""
  text = open(path).read() if os.path.exists(path) else "# jft vs the PyTorch peer\n"
  head, _, rest = text.partition("\n## Workloads\n")
  parts, current = {}, None
  section_end = re.search(r"\n## ", rest)
  tail = rest[section_end.start():] if section_end else ""
  for line in (rest[:section_end.start()] if section_end else rest).splitlines():
    m = re.match(r"### (\w+)", line)
    if m:
      current = m.group(1)
      parts[current] = []
    elif current:
      parts[current].append(line)
  parts[workload] = [""] + body + [""]
  lines = [head.rstrip("\n"), "", "## Workloads", ""]
  for name in ("demo", "sft", "dpo"):
    if name in parts:
      lines += [f"### {name}"] + parts[name]
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n" + tail)


# ----------------------------------------------------------------------------
# The race
# ----------------------------------------------------------------------------

def budget_overrides(args) -> dict:
  o = dict(WORKLOADS[args.workload]["quick"]) if args.quick else {}
  if args.steps:
    o["train.steps"] = args.steps
    o["train.save_every"] = min(o.get("train.save_every", args.steps), args.steps)
  if args.eval_rows:
    o["data.max_eval_examples"] = args.eval_rows
    if args.workload == "demo":
      o["data.max_test_examples"] = args.eval_rows
  if args.max_length:
    o["data.max_length"] = args.max_length
  return o


def race(args) -> str:
  """Run one workload race; -> the report's markdown (also written into results.md unless --quick)."""
  check_versions()
  say = lambda msg: print(msg, file=sys.stderr, flush=True)
  overrides = budget_overrides(args)
  started = datetime.datetime.now()
  load_before = load_note()
  with tempfile.TemporaryDirectory(prefix="jft-race-") as tmp:
    say(f"{args.workload}: setup (converted folder, jft's initial adapter, batch order) ...")
    spawn("setup", say, workload=args.workload, out=tmp, overrides=json.dumps(overrides), quick=int(args.quick))
    with open(os.path.join(tmp, "plan.json")) as f:
      plan = json.load(f)
    jft_over = dict(overrides)
    if args.quick:
      jft_over["model.name"] = plan["model"]
      jft_over["data.path"] = plan["config"]["data"]["path"]
    cache = os.path.join(tmp, "cache")
    os.makedirs(cache)
    peer_kind = f"peer-{args.workload}"
    say("  jft (cold cache) ...")
    cold = run_jft(plan, jft_over, cache, os.path.join(tmp, "run-cold"), say)
    say(f"  peer ({peer_kind}) ...")
    peer = spawn(peer_kind, say, plan=os.path.join(tmp, "plan.json"), threads=args.threads)
    warm = None
    if args.workload == "demo":
      say("  jft (warm cache) ...")
      warm = run_jft(plan, jft_over, cache, os.path.join(tmp, "run-warm"), say)
    if args.workload == "demo":
      table, ratios = demo_rows_md(plan, cold, warm, peer)
    elif args.workload == "sft":
      table, ratios = sft_rows_md(plan, cold, peer)
    else:
      table, ratios = dpo_rows_md(plan, cold, peer)
  from race import cpu_name, versions  # noqa: E402  (benchmarks/ is the script's folder)
  body = [f"Run {started:%Y-%m-%d %H:%M} on {cpu_name()}, {os.cpu_count()} cores ({load_before} at the start, "
          f"{load_note()} at the end: the cores are shared); {versions()}, trl "
          f"{PEER_VERSIONS['trl']}; torch threads {args.threads}, XLA every core."
          + (" --quick: a tiny random model, the numbers mean nothing." if args.quick else "")
          + (f" Budget overrides: {', '.join(f'{k}={v}' for k, v in overrides.items())}." if overrides else ""),
          ""] + table + [""] + [f"- {r}" for r in ratios]
  if not args.quick or args.out:
    path = args.out or os.path.join(HERE, "results.md")
    write_section(path, args.workload, body)
    say(f"wrote the {args.workload} rows into {path}")
  return "\n".join([f"## Workloads: {args.workload}", ""] + body) + "\n"


def add_arguments(parser):
  parser.add_argument("--workload", choices=sorted(WORKLOADS),
                      help="race a whole job instead of single steps: demo (README's main job vs HF Trainer + peft), "
                           "sft (vs TRL SFTTrainer), dpo (vs TRL DPOTrainer)")
  parser.add_argument("--eval-rows", type=int, help="--workload: evaluation rows per split (a reduced budget)")
  parser.add_argument("--max-length", type=int, help="--workload: data.max_length (sft, dpo)")


def worker_main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", choices=sorted(WORKERS), required=True)
  for name in ("t0", "plan", "workload", "out", "overrides"):
    parser.add_argument(f"--{name}")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--quick", type=int, default=0)
  args = parser.parse_args()
  print(json.dumps(WORKERS[args.worker](args)), flush=True)


if __name__ == "__main__":
  worker_main()
