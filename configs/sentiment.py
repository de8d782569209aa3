"""Rotten Tomatoes sentiment (embedded data), SmolLM2-135M-Instruct, any method.

    jft train --config configs/sentiment.py:method=lora --workdir runs/sentiment-lora
    jft train --config configs/sentiment.py:method=qlora,mode=local --workdir runs/x

Arguments: method = full | lora | qlora | dora | adapters | prefix | prompt | ptuning | bitfit | ia3;
mode = demo (the README quickstart: fits 10 minutes on a 2-core CPU) | full | local (a smoke run).
Classification as generation: the model answers " positive" or " negative"; accuracy compares
those two words' logits after "Sentiment:".
"""

import os

from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))

# method -> (jft method name, hyperparameters, quantized base format, learning rate)
METHODS = {
    "full": ("full", dict(), "", 1e-5),
    "lora": ("lora", dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")), "", 5e-4),
    "qlora": ("lora", dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")), "nf4", 5e-4),
    "dora": ("dora", dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")), "", 5e-4),
    "adapters": ("adapters", dict(style="houlsby", size=32), "", 5e-4),
    "prefix": ("prefix", dict(num_virtual_tokens=16), "", 1e-2),
    "prompt": ("prompt", dict(num_virtual_tokens=16), "", 1e-2),
    "ptuning": ("ptuning", dict(num_virtual_tokens=16, encoder="mlp", encoder_hidden=128), "", 1e-3),
    "bitfit": ("bitfit", dict(), "", 1e-3),
    "ia3": ("ia3", dict(), "", 5e-3),
}


def get_config(arg=None):
  arg = parse_arg(arg, method="lora", mode="demo")
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}; choose one of {', '.join(METHODS)}")
  name, hparams, quant_format, lr = METHODS[arg.method]
  c = default_config()
  c.method.name = name
  c.method.hparams = hparams
  c.quant.format = quant_format
  # A plain prompt (no chat template): half the tokens of the chat form, and a stronger zero-shot
  # baseline for SmolLM2 (label-word accuracy 0.81 vs 0.65 with its chat template, 200 validation reviews).
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "sentiment"), task="classification",
                chat=False, template="Review: {text}\nSentiment:", labels=("negative", "positive"), max_length=96)
  c.optim.update(lr=lr, warmup_steps=10, schedule="cosine")
  c.eval.update(batch_size=32, metric="accuracy")
  if arg.mode == "demo":  # the README quickstart: ~10 minutes on a 2-core CPU, all of it included
    c.train.update(steps=180, batch_size=8, log_every=10, eval_every=0, save_every=60)
    c.data.update(max_eval_examples=300, bucket=8)
    c.eval.zero_shot_split = "test"  # before and after on the same 1,006 test reviews
  elif arg.mode == "full":
    c.train.update(steps=1000, batch_size=16, log_every=20, eval_every=250, save_every=250)
    c.data.update(bucket=8)
  elif arg.mode == "local":  # a smoke run for a laptop or CI
    c.train.update(steps=6, batch_size=4, log_every=2, eval_every=3, save_every=3)
    c.data.update(max_train_examples=64, max_eval_examples=16, max_test_examples=16)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose demo, full or local")
  return c
