"""`jft export` of a trained run, through the CLI, for every registered method and every format.

Each method trains one tiny run (one step, `configs/tiny.py`), once per module; every (method, format)
pair is then exported with `jft export` and read back by the library that format is for: a peft folder
by `peft` on the transformers model, a merged folder by `transformers`, the trainable leaves by
safetensors, each giving what the run itself gives. A format a method cannot have is one named error
(exit 2, one line), never a silent half export.
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from method_contract import compare, peft_logits

from jft import cli, run
from jft.core import rules
from jft import config as cfg
from jft import peft as jpeft
from jft.run.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# test_reliability_cli's ONE_STEP, without validation (its compile; exports then read the latest step)
ONE_STEP = [("train.steps", "1"), ("data.max_train_examples", "8"), ("data.eval_split", ""),
            ("data.test_split", ""), ("eval.zero_shot", "false")]
FORMATS = ("peft", "merged", "trainable")

# registered method -> the tiny config's argument that trains it (and its hyperparameters, where the
# config has none): standalone methods by name, `compose` with two parts, `score_head` through the
# reward objective, which composes it with the configured method.
RUNS = {name: (f"method={name}", None) for name, c in jpeft.METHODS.items() if c.standalone and name != "compose"}
RUNS["compose"] = ("method=compose", {"methods": ({"method": "lora", "rank": 2}, {"method": "bitfit"})})
RUNS["score_head"] = ("method=lora,objective=reward", None)

NO_PEFT = "method {!r} has no peft equivalent"
CANNOT_MERGE = r"{} cannot be merged into the base weights \(its leaves are not beside a kernel\)"
NO_PLACE = r"{} cannot be merged into a llama transformers checkpoint: it has no place for {}"
# (method, format) -> the one-line error that export must end with; every other pair exports.
REFUSED = {
    ("bitfit", "peft"): NO_PEFT.format("bitfit"),
    ("bitfit", "merged"): NO_PLACE.format("bitfit", r"layers/mlp/down_proj/bias"),  # Llama has no biases
    ("bottleneck", "peft"): NO_PEFT.format("bottleneck"),
    ("bottleneck", "merged"): CANNOT_MERGE.format("bottleneck"),
    ("compose", "peft"): r"method 'compose': a peft folder holds one adapter, this has \['lora', 'bitfit'\]",
    ("compose", "merged"): NO_PLACE.format(r"lora\+bitfit", "layers/mlp/down_proj/bias"),
    ("full", "peft"): NO_PEFT.format("full"),
    ("prefix", "merged"): CANNOT_MERGE.format("prefix"),
    ("prompt", "merged"): CANNOT_MERGE.format("prompt"),
    ("ptuning", "merged"): NO_PLACE.format("ptuning", "prompt/embeddings"),
    ("score_head", "merged"): NO_PLACE.format(r"lora\+score_head", "score/kernel"),  # a causal LM has no head
}
IDS = np.random.RandomState(0).randint(0, 256, (2, 10)).astype(np.int64)  # bytes: never the special tokens
MASK = np.ones_like(IDS)


def _train(name: str, base: str, workdir: str):
  arg, hparams = RUNS[name]
  config = cfg.build(f"{TINY}:{arg}", [("model.name", base), *ONE_STEP])
  if hparams is not None:
    with config.unlocked():
      config.method.hparams = hparams
  train(config, workdir, echo=lambda *_: None)


def _outputs(r, params):
  """What the restored run computes on IDS with `params`: logits, or a reward model's rewards."""
  ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
  if "score" in params:
    from jft.objectives.reward_model import _rewards
    return np.asarray(_rewards(r.model, params, ids, mask))
  return np.asarray(r.model.apply({"params": params}, ids, attention_mask=mask))


@pytest.fixture(scope="module")
def runs(byte_model, tmp_path_factory):
  """name -> (run folder, the restored run, its outputs on IDS): each method trained once, when first asked."""
  import transformers

  root = tmp_path_factory.mktemp("export_cli")
  base = peft_logits(transformers.AutoModelForCausalLM.from_pretrained(byte_model).eval(), IDS, MASK, False)
  done = {}

  def get(name):
    if name not in done:
      workdir = str(root / name)
      _train(name, byte_model, workdir)
      r = run.restore(workdir, "latest")
      trained = _outputs(r, r.params())
      # the run differs from where it started: an export that lost its trained leaves cannot pass for it
      start = _outputs(r, r.params(r.init.trainable)) if trained.ndim == 1 else base  # rewards: no base head
      assert np.abs(trained - start).max() > 1e-3, name
      done[name] = workdir, r, trained
    return done[name]

  return get


def test_every_registered_method_is_exported():
  assert set(RUNS) == set(jpeft.METHODS)
  # peft refuses exactly the methods without a peft equivalent (and compositions of several adapters).
  refused = {name for (name, fmt) in REFUSED if fmt == "peft"}
  assert refused == {n for n, c in jpeft.METHODS.items() if c.standalone and c.peft_type is None} | {"compose"}


def _hf_base(base: str, sequence_classifier: bool):
  import transformers

  if sequence_classifier:  # the reward head: peft's SEQ_CLS task on a one-output classifier
    pad = json.load(open(os.path.join(base, "config.json")))["pad_token_id"]
    return transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
  return transformers.AutoModelForCausalLM.from_pretrained(base)


def _check_peft(out, r, expected, base):
  import peft as hf_peft
  import torch

  assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
  config = json.load(open(os.path.join(out, "adapter_config.json")))
  method = r.method.methods[0] if isinstance(r.method, jpeft.Compose) else r.method
  assert config["peft_type"] == method.peft_type
  seqcls = config["task_type"] == "SEQ_CLS"
  model = hf_peft.PeftModel.from_pretrained(_hf_base(base, seqcls), out).eval()
  if seqcls:
    with torch.no_grad():
      got = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
  else:
    virtual = config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING")
    assert compare(expected, peft_logits(model, IDS, MASK, virtual), MASK) <= 1e-4


def _check_merged(out, expected):
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert compare(expected, peft_logits(model, IDS, MASK, False), MASK) <= 1e-4


def _check_trainable(out, r):
  from safetensors.numpy import load_file

  assert sorted(os.listdir(out)) == ["method.json", "trainable.safetensors"]
  leaves, want = load_file(os.path.join(out, "trainable.safetensors")), rules.flatten(r.trainable)
  assert set(leaves) == set(want)  # P-tuning: its encoder, not the prompt it makes
  for path, value in want.items():
    np.testing.assert_array_equal(leaves[path], np.asarray(value), err_msg=path)
  rebuilt = jpeft.from_hparams(json.load(open(os.path.join(out, "method.json"))))
  assert type(rebuilt) is type(r.method)
  assert json.loads(json.dumps(rebuilt.hparams())) == json.loads(json.dumps(r.method.hparams()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_export(name, fmt, runs, byte_model, tmp_path, capsys):
  workdir, r, expected = runs(name)
  out = str(tmp_path / "out")
  capsys.readouterr()
  code = cli.main(["export", "--workdir", workdir, "--format", fmt, "--out", out])
  err = capsys.readouterr().err
  if (name, fmt) in REFUSED:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jft export: error: "), err
    assert re.search(REFUSED[name, fmt], lines[0]), lines[0]
    assert not os.path.exists(out) and os.listdir(tmp_path) == []  # nothing half written
    return
  assert code == 0, err
  if fmt == "peft":
    _check_peft(out, r, expected, byte_model)
  elif fmt == "merged":
    _check_merged(out, expected)
  else:
    _check_trainable(out, r)


def test_init_from_a_vera_run_folds_in_its_shared_projections(runs, byte_model):
  """`--init-from` merges the earlier run through the same restore: VeRA's frozen pair included."""
  import jft

  workdir, _, expected = runs("vera")
  model, base = jft.load_pretrained(byte_model)
  merged = run.merged_base(workdir, byte_model, base)
  got = np.asarray(model.apply({"params": merged}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
  assert compare(expected, got, MASK) <= 1e-4
