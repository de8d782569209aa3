"""Rotten Tomatoes sentiment (embedded data), SmolLM2-135M-Instruct, any method.

    jft train --config configs/sentiment.py:method=lora --workdir runs/sentiment-lora
    jft train --config configs/sentiment.py:method=qlora,mode=local --workdir runs/x

Arguments: method = any registered method (full, lora, dora, bottleneck, prefix, prompt, ptuning,
bitfit, ia3, ... each with its own `recipe`: learning rate and hyperparameters) or qlora (LoRA on an
NF4 base); mode = demo (the README quickstart: fits 10 minutes on a 2-core CPU) | full | study (a sweep
point: about 3 minutes, 96 validation and 200 test reviews) | local (a smoke run);
lr_scale multiplies the method's recipe learning rate (what the sweep varies, so one grid fits every method).
Classification as generation: the model answers " positive" or " negative"; accuracy compares
those two words' logits after "Sentiment:".
"""

import dataclasses
import os

from jft import peft
from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def methods():
  """method -> (jft method name, hyperparameters, quantized base format, learning rate), from the registry."""
  rows = {}
  for name, cls in sorted(peft.METHODS.items()):
    if name == "compose" or not cls.standalone:
      continue
    recipe = dict(cls.recipe)
    lr = recipe.pop("lr")
    # every hyperparameter is in the config, so any can be overridden (--config.method.hparams.rank=16)
    hparams = {**{f.name: f.default for f in dataclasses.fields(cls)}, **recipe}
    rows[name] = (name, hparams, "", lr)
  rows["qlora"] = ("lora", rows["lora"][1], "nf4", rows["lora"][3])
  rows.update({old: rows[new] for old, new in peft.ALIASES.items()})  # deprecated names keep working
  return rows


def get_config(arg=None):
  arg = parse_arg(arg, method="lora", mode="demo", lr_scale=1.0)
  table = methods()
  if arg.method not in table:
    raise ValueError(f"method={arg.method!r}; choose one of {', '.join(table)}")
  name, hparams, quant_format, lr = table[arg.method]
  c = default_config()
  c.method.name = name
  c.method.hparams = hparams
  c.quant.format = quant_format
  # A plain prompt (no chat template): half the tokens of the chat form, and a stronger zero-shot
  # baseline for SmolLM2 (label-word accuracy 0.81 vs 0.65 with its chat template, 200 validation reviews).
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "sentiment"),
                chat=False, template="Review: {text}\nSentiment:", labels=("negative", "positive"), max_length=96)
  c.optim.update(lr=lr * arg.lr_scale, warmup_steps=10, schedule="cosine")
  c.eval.update(batch_size=32, metric="accuracy")
  if arg.mode == "demo":  # the README quickstart: ~10 minutes on a 2-core CPU, all of it included
    c.train.update(steps=180, batch_size=8, log_every=10, eval_every=0, save_every=60)
    c.data.update(max_eval_examples=300, bucket=8)
    c.eval.zero_shot_split = "test"  # before and after on the same 1,006 test reviews
  elif arg.mode == "full":
    c.train.update(steps=1000, batch_size=16, log_every=20, eval_every=250, save_every=250)
    c.data.update(bucket=8)
  elif arg.mode == "study":  # one point of a sweep on a 2-core CPU: short, but enough reviews to rank points
    c.train.update(steps=30, batch_size=8, log_every=5, eval_every=10, save_every=10)
    c.data.update(max_eval_examples=96, max_test_examples=200, bucket=8)
  elif arg.mode == "local":  # a smoke run for a laptop or CI
    c.train.update(steps=6, batch_size=4, log_every=2, eval_every=3, save_every=3)
    c.data.update(max_train_examples=64, max_eval_examples=16, max_test_examples=16)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose demo, full, study or local")
  return c


def sweep(arg=None):
  """Which method, which LoRA rank, which learning rate (relative to each method's recipe).

  `jft sweep --config configs/sentiment.py:mode=local --workdir runs/grid` sweeps them all;
  naming a method (`:mode=study,method=lora`) sweeps only its hyperparameters.
  """
  from jft.studies.space import Space, grid

  lr = grid(0.5, 1.0, 2.0)
  chosen = parse_arg(arg, method="", mode="demo", lr_scale=1.0).method
  if chosen:
    rank = {"method.hparams.rank": grid(4, 8, 16)} if chosen in ("lora", "qlora", "dora") else {}
    return Space({**rank, "arg:lr_scale": lr}, trials=6)
  return [Space({"arg:method": grid("lora", "dora", "qlora"), "method.hparams.rank": grid(4, 8, 16),
                 "arg:lr_scale": lr}, trials=12),
          Space({"arg:method": grid("ia3", "bitfit", "bottleneck", "prompt", "prefix"), "arg:lr_scale": lr},
                trials=6)]
