"""Chat SFT on the embedded chatterbot-corpus pairs (loss on responses only, packed sequences).

    jft train --config configs/chat_sft.py:method=lora --workdir runs/chat
"""

import os

from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, method="lora", mode="full")
  c = default_config()
  c.method.name = {"qlora": "lora"}.get(arg.method, arg.method)
  c.method.hparams = (dict(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
                      if arg.method in ("lora", "qlora", "dora") else {})
  c.quant.format = "nf4" if arg.method == "qlora" else ""
  c.objective.name = "sft"
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "chat"), chat=True,
                template="{text}", prompt_field="prompt", response_field="response", max_length=128,
                pack=True, eval_split="", test_split="")
  c.optim.update(lr=3e-4)
  c.eval.update(zero_shot=False, metric="loss")
  if arg.mode == "full":
    c.train.update(steps=500, batch_size=8, log_every=10, save_every=100)
  elif arg.mode == "local":
    c.train.update(steps=4, batch_size=2, log_every=2, save_every=2)
    c.data.update(max_train_examples=64)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose full or local")
  return c
