"""Configs and CLI errors, data pipelines, and a tiny end-to-end run with kill/resume, eval and export."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jft
from jft import cli, config as cfg, data, peft, run
from jft.run.step import make_train_step
from jft.run.train import TrainingError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


# ---------------------------------------------------------------------------- configs


def test_config_arguments_and_overrides_are_typed():
  c = cfg.build(f"{ROOT}/configs/sentiment.py:method=qlora,mode=local",
                [("optim.lr", "3e-4"), ("train.steps", "7"), ("data.chat", "false"),
                 ("method.hparams.targets", "q_proj,k_proj")])
  assert c.optim.lr == 3e-4 and c.train.steps == 7 and c.data.chat is False
  assert c.quant.format == "nf4" and c.method.name == "lora"
  assert tuple(c.method.hparams.targets) == ("q_proj", "k_proj")


@pytest.mark.parametrize("spec, overrides, message", [
    ("configs/sentiment.py:methd=lora", [], r"'methd' is unknown.*did you mean method"),
    ("configs/sentiment.py:method=lorra", [], r"method='lorra'"),
    ("configs/sentiment.py", [("optim.lrr", "1")], r"unknown config field 'optim.lrr'.*did you mean optim.lr"),
    ("configs/sentiment.py", [("train.steps", "many")], r"train.steps: expected an int, got 'many'"),
    ("configs/sentiment.py", [("data.chat", "maybe")], r"data.chat: expected a bool"),
    ("configs/tiny.py", [], r"required config field\(s\) not set: model.name"),
    ("configs/nope.py", [], r"does not exist"),
])
def test_config_errors_name_the_field(spec, overrides, message):
  with pytest.raises(cfg.ConfigError, match=message):
    cfg.build(os.path.join(ROOT, spec.split(":")[0]) + (":" + spec.split(":")[1] if ":" in spec else ""),
              overrides)


def test_cli_reports_config_errors_before_compute(capsys, tmp_path):
  code = cli.main(["train", "--config", TINY, "--config.optim.lr=fast", "--workdir", str(tmp_path / "r")])
  assert code == 2
  assert "optim.lr: expected a float, got 'fast'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "r")  # nothing was started
  with pytest.raises(SystemExit):
    cli.main(["eval", "--workdir", str(tmp_path), "--bogus"])
  for command in ("train", "eval", "export", "generate"):
    with pytest.raises(SystemExit) as exit_:
      cli.main([command, "--help"])
    assert exit_.value.code == 0


# ---------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tokenizer():
  return jft.load_tokenizer("smollm2-135m")


def test_prompt_masking_token_by_token(tokenizer):
  ex = {"prompt": "Is it good?", "response": "positive"}
  (ids, mask), = data.tokenize([ex], tokenizer, max_length=64, chat=False)
  prompt = tokenizer("Is it good?")["input_ids"]
  response = tokenizer(" positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  assert ids.tolist() == prompt + response
  assert mask.tolist() == [0] * len(prompt) + [1] * len(response)
  # Too long: the prompt loses its beginning, the response is kept whole.
  long = {"prompt": "word " * 50 + "Is it good?", "response": "positive"}
  (ids, mask), = data.tokenize([long], tokenizer, max_length=12, chat=False)
  assert len(ids) == 12 and ids[-len(response):].tolist() == response and mask.sum() == len(response)
  assert tokenizer.decode(ids[: 12 - len(response)]).endswith("Is it good?")
  with pytest.raises(data.DataError, match="does not fit"):
    data.tokenize([ex], tokenizer, max_length=2, chat=False)


def test_chat_examples_use_the_chat_template(tokenizer):
  rows = [{"text": "A fine film.", "label": "positive"}]
  (ex,) = data.classification_examples(rows, tokenizer, text_field="text", label_field="label",
                                       labels=("negative", "positive"), template="Review: {text}", chat=True)
  assert ex["prompt"].startswith("<|im_start|>") and ex["prompt"].endswith("<|im_start|>assistant\n")
  assert ex["label"] == 1
  with pytest.raises(data.DataError, match="label 'meh'"):
    data.classification_examples([{"text": "x", "label": "meh"}], tokenizer, text_field="text",
                                 label_field="label", labels=("negative", "positive"), template="{text}", chat=True)
  with pytest.raises(data.DataError, match="no field 'review'"):
    data.classification_examples(rows, tokenizer, text_field="review", label_field="label",
                                 labels=("negative", "positive"), template="{text}", chat=True)


def test_packing_keeps_attention_inside_each_example(tiny_model):
  model, params = jft.load_pretrained(tiny_model)
  rows = [(np.arange(5, 12, dtype=np.int32), np.asarray([0, 0, 0, 1, 1, 1, 1], np.int32)),
          (np.arange(20, 25, dtype=np.int32), np.asarray([0, 0, 1, 1, 1], np.int32)),
          (np.arange(40, 43, dtype=np.int32), np.asarray([0, 1, 1], np.int32))]
  packed = data.pack_rows(rows, length=16)
  assert packed["input_ids"].shape == (1, 16)
  assert packed["attention_mask"][0].tolist() == [1] * 7 + [2] * 5 + [3] * 3 + [0]
  assert packed["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0]
  out = np.asarray(model.apply({"params": params}, jnp.asarray(packed["input_ids"]),
                               attention_mask=jnp.asarray(packed["attention_mask"])))[0]
  start = 0
  for ids, _ in rows:  # each packed example computes exactly what it computes alone
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[None])))[0]
    np.testing.assert_allclose(out[start:start + len(ids)], alone, atol=1e-5)
    start += len(ids)


def test_batches_resume_exactly_across_epochs():
  rows = [(np.arange(n, dtype=np.int32) + 1, np.ones(n, np.int32)) for n in range(3, 40)]
  for kwargs in (dict(), dict(bucket=4), dict(pack=True)):
    reference = data.Batches(rows, batch_size=4, max_length=48, seed=3, **kwargs)
    stream = [next(reference) for _ in range(25)]  # several epochs
    for cut in (1, 7, 11):
      first = data.Batches(rows, batch_size=4, max_length=48, seed=3, **kwargs)
      for _ in range(cut):
        next(first)
      resumed = data.Batches(rows, batch_size=4, max_length=48, seed=3, **kwargs)
      resumed.restore(json.loads(json.dumps(first.state())))
      for expected in stream[cut:]:
        got = next(resumed)
        for k in expected:
          np.testing.assert_array_equal(got[k], expected[k])
  other = data.Batches(rows, batch_size=4, max_length=48, seed=4)
  assert not np.array_equal(next(other)["input_ids"], stream[0]["input_ids"])
  with pytest.raises(data.DataError, match="seed 3"):
    other.restore(reference.state())


def test_local_files_of_every_kind(tmp_path):
  rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "t.csv").write_text("text,label\ngood,positive\nbad,negative\n")
  (tmp_path / "t.tsv").write_text("text\tlabel\ngood\tpositive\nbad\tnegative\n")
  import datasets
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
  for source in (str(tmp_path), str(tmp_path / "t.csv"), str(tmp_path / "t.tsv"), str(tmp_path / "t.parquet"),
                 datasets.Dataset.from_list(rows), datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})):
    ds = data.load_split(source, "train")
    assert [r["text"] for r in ds] == ["good", "bad"]
  with pytest.raises(data.DataError, match="no file for split 'test'"):
    data.load_split(str(tmp_path), "test")


@pytest.mark.parametrize("objective", ["classification", "sft", "lm", "grpo", "instruct", "dpo"])
def test_one_data_file_is_split_by_holdout_for_every_objective(objective, tmp_path):
  """One file given for a run with evaluation: the validation and test rows are held out of training
  (seeded, the same for every objective), and with data.holdout=0 evaluation is refused by name."""
  from jft import objectives

  rows = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative", "prompt": f"q{i}",
           "response": f"a{i}", "instruction": f"do {i}", "output": f"done {i}", "chosen": f"c{i}",
           "rejected": f"r{i}"} for i in range(40)]
  path = str(tmp_path / "one.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  c = cfg.build(f"{TINY}:objective={objective}", [("model.name", "/m"), ("data.path", path), ("data.template", "{text}"),
                                                 ("data.chat", "false")] + ([("objective.hparams.reward", "x:y")]
                                                                            if objective == "grpo" else []))
  objective_ = objectives.from_config(c)
  seen = {split: objective_.examples(c.data, None, split, None) for split in ("train", "validation", "test")}
  key = lambda ex: json.dumps(ex, sort_keys=True)
  train_, validation = {key(ex) for ex in seen["train"]}, {key(ex) for ex in seen["validation"]}
  assert len(seen["train"]) == 36 and len(seen["validation"]) == 4 and not train_ & validation
  assert seen["validation"] == seen["test"]
  assert data.split_record(c.data, "validation", 4) == {"source": path, "rows": 4, "holdout": True}
  with c.unlocked():
    c.data.holdout = 0.0
  assert len(objective_.examples(c.data, None, "train", None)) == 40
  with pytest.raises(data.DataError, match=r"one\.jsonl: one file serves every split and data\.holdout=0, so the "
                                           r"'validation' split would be the training rows"):
    objective_.examples(c.data, None, "validation", None)


def test_embedded_data_checksums():
  with open(os.path.join(ROOT, "data", "sentiment", "SHA256SUMS")) as f:
    assert len(f.read().split()) == 6
  sizes = {s: len(data.load_split(os.path.join(ROOT, "data", "sentiment"), s)) for s in ("train", "validation", "test")}
  assert sizes == {"train": 8058, "validation": 1008, "test": 1006}
  assert len(data.load_split(os.path.join(ROOT, "data", "chat"), "train")) > 2000


# ---------------------------------------------------------------------------- train step details


def test_nonfinite_steps_are_skipped_or_stop_the_run(tiny_model, tmp_path):
  model, params = jft.load_pretrained(tiny_model)
  method, tx = peft.LoRA(rank=2), optax.sgd(0.1)
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  trainable = jax.tree.map(lambda x: x * jnp.nan, trainable)
  batch = {"input_ids": jnp.ones((2, 8), jnp.int32), "attention_mask": jnp.ones((2, 8), jnp.int32)}
  step = make_train_step(model, method, tx, donate=False, skip_nonfinite=True)
  new, _, metrics = step(trainable, tx.init(trainable), frozen, batch, jax.random.PRNGKey(0))
  assert int(metrics["skipped"]) == 1
  c = cfg.build(TINY, [("model.name", tiny_model), ("optim.clip_norm", "0"), ("optim.name", "sgd"),
                       ("optim.warmup_steps", "0"), ("eval.zero_shot", "false")])
  with c.unlocked():
    c.optim.lr = float("nan")  # the schema refuses a NaN learning rate; set behind its back to force NaN losses
  with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+; stopped. The last good checkpoint"):
    train(c, str(tmp_path / "nan"), echo=lambda *_: None)


# ---------------------------------------------------------------------------- end to end


def _jft(*args, **kw):
  return subprocess.Popen([sys.executable, "-m", "jft.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def _losses(workdir):
  """step -> loss, the last record of each step (a resumed run logs some steps again)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["kind"] == "train":
        out[rec["step"]] = rec["loss"]
  return out


@pytest.mark.slow  # model-scale / long: make test-slow (the default suite stays under 15 min)
def test_kill_resume_equals_uninterrupted_then_eval_and_export(tiny_model, tmp_path, capsys):
  args = ["train", "--config", TINY, f"--config.model.name={tiny_model}", "--config.train.steps=10"]
  reference = str(tmp_path / "reference")
  p = _jft(*args, "--workdir", reference)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err
  assert "zero-shot accuracy before training" in out and "after training, test split" in out and reference in out
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, 11))

  # SIGKILL mid-run (after a checkpoint), then --resume: the same losses, bit for bit.
  killed = str(tmp_path / "killed")
  p = _jft(*args, "--workdir", killed)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "4")):
    assert p.poll() is None and time.time() < deadline, "run ended before its step-4 checkpoint"
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  p = _jft(*args, "--workdir", killed)
  _, err = p.communicate(timeout=600)
  assert p.returncode != 0 and "already holds checkpoints" in err  # no silent restart from scratch
  p = _jft(*args, "--workdir", killed, "--resume")
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err
  assert "resumed from step" in err or "resumed from step" in _
  assert _losses(killed) == expected

  # SIGTERM: the run saves where it is and exits cleanly; resuming finishes identically.
  termed = str(tmp_path / "termed")
  p = _jft(*args, "--workdir", termed)
  deadline = time.time() + 300
  while not os.path.isfile(os.path.join(termed, "metrics.jsonl")) or len(_losses(termed)) < 3:
    assert p.poll() is None and time.time() < deadline
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0, err
  if "stopped by signal" in err:
    p = _jft(*args, "--workdir", termed, "--resume")
    assert p.wait(timeout=600) == 0
  assert _losses(termed) == expected

  # The run folder holds what reproduces it.
  for name in ("config.json", "versions.json", "base.json", "summary.md", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(reference, name)), name
  assert os.listdir(os.path.join(reference, "tb"))
  assert json.load(open(os.path.join(reference, "versions.json")))["jax"] == jax.__version__

  # eval and export from the run, in-process.
  assert cli.main(["eval", "--workdir", reference, "--limit", "8"]) == 0
  for fmt in ("peft", "merged", "trainable"):
    assert cli.main(["export", "--workdir", reference, "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
  assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "peft"))
  assert set(os.listdir(tmp_path / "trainable")) == {"trainable.safetensors", "method.json"}
  capsys.readouterr()
  assert cli.main(["export", "--workdir", reference, "--format", "adapters", "--out", str(tmp_path / "old")]) == 0
  assert "--format adapters is deprecated; use --format trainable" in capsys.readouterr().err
  assert set(os.listdir(tmp_path / "old")) == {"trainable.safetensors", "method.json"}
  # Exports never overwrite by accident, and never the run or its base.
  before = sorted(os.listdir(tmp_path / "peft"))
  assert cli.main(["export", "--workdir", reference, "--format", "merged", "--out", str(tmp_path / "peft")]) == 2
  assert "not empty; pass --overwrite" in capsys.readouterr().err and sorted(os.listdir(tmp_path / "peft")) == before
  assert cli.main(["export", "--workdir", reference, "--format", "merged", "--out", str(tmp_path / "peft"),
                   "--overwrite"]) == 0
  assert "model.safetensors" in os.listdir(tmp_path / "peft")
  for target in (reference, tiny_model, str(tmp_path)):
    assert cli.main(["export", "--workdir", reference, "--format", "peft", "--out", target, "--overwrite"]) == 2
    assert "refusing to write over or into" in capsys.readouterr().err
  assert "model.safetensors" in os.listdir(tmp_path / "merged")
  _, model, _, params, _ = run.restore_params(reference)
  merged_model, merged_params = jft.load_pretrained(str(tmp_path / "merged"))
  ids = jnp.asarray([[1, 2, 3, 4, 5]])
  np.testing.assert_allclose(merged_model.apply({"params": merged_params}, ids),
                             model.apply({"params": params}, ids), atol=1e-4)

  # A different base is refused.
  other = str(tmp_path / "other_base")
  import shutil
  shutil.copytree(tiny_model, other)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(other, "model.safetensors"))
  tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
  save_file(tensors, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(reference, "base.json")) as f:
    recorded = json.load(f)
  with pytest.raises(run.RunError, match="refusing to mix"):
    run.check_base(reference, run.base_identity(other))
  assert recorded["sha256"] == run.base_identity(tiny_model)["sha256"]


def _optim_config(tiny_model, **optim):
  return cfg.build(TINY, [("model.name", tiny_model)] + [(f"optim.{k}", str(v)) for k, v in optim.items()])


def _perturbed(tree, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(tree)))
  return jax.tree.unflatten(jax.tree.structure(tree), [a + 0.1 * jax.random.normal(k, a.shape, a.dtype)
                                                       for a, k in zip(jax.tree.leaves(tree), keys)])


@pytest.mark.parametrize("schedule, warmup", [("cosine", 3), ("linear", 3), ("constant", 3), ("cosine", 0),
                                              ("linear", 50)])
def test_learning_rate_is_linear_warmup_then_the_schedule(schedule, warmup, tiny_model):
  """optim.schedule: lr * s / w for the w warmup steps (w at most steps - 1), then the decay from lr to
  lr * final_lr_ratio over the remaining steps (cosine or linear), or lr throughout; held at its end after."""
  from jft.run.optim import make_optimizer

  lr, ratio, steps = 0.1, 0.2, 11
  c = _optim_config(tiny_model, name="sgd", momentum=0, clip_norm=0, lr=lr, schedule=schedule,
                    warmup_steps=warmup, final_lr_ratio=ratio)
  w = min(warmup, steps - 1)
  end, decay_steps = lr * ratio, steps - w

  def want(s):
    if s < w:
      return lr * s / w
    t = min(s - w, decay_steps) / decay_steps
    return {"cosine": end + (lr - end) * 0.5 * (1 + np.cos(np.pi * t)), "linear": lr + (end - lr) * t,
            "constant": lr}[schedule]

  params, grads = {"w": jnp.ones(3)}, {"w": jnp.asarray([1.0, -2.0, 0.5])}
  tx = make_optimizer(c.optim, steps, params)
  state = tx.init(params)
  for s in range(steps + 2):  # plain SGD: the update is -lr(s) * gradient
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -want(s) * grads["w"], rtol=1e-5, atol=1e-9, err_msg=f"step {s}")


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_weight_decay_only_where_the_rules_and_the_method_allow(name, tiny_model):
  """optim.weight_decay decays the trainable leaves except those `optim.decay_rules` exempt (default: every
  bias and scale) and those the method exempts (DoRA's magnitude): with a zero gradient the update is
  -lr * wd * param where decay applies and exactly 0 elsewhere. (Adafactor: -wd * param, not scaled by lr:
  optax's adafactor adds the decay after its learning rate, so the same optim.weight_decay decays far
  harder there than under adamw or sgd.)"""
  from jft.run.optim import make_optimizer

  _, params = jft.load_pretrained(tiny_model)
  method = peft.Compose(methods=(peft.LoRA(rank=2, dora=True), peft.BitFit()))
  trainable, _ = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  trainable = _perturbed(trainable)  # LoRA's b starts at 0, where decay would change nothing
  lr, wd = 0.1, 0.25
  coef = wd if name == "adafactor" else lr * wd
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  for extra_rules, exempt in [((), r".*/(bias|lora/magnitude)"),
                              (((r".*/lora/b", False),), r".*/(bias|lora/magnitude|lora/b)")]:
    c = _optim_config(tiny_model, name=name, lr=lr, weight_decay=wd, warmup_steps=0, schedule="constant",
                      momentum=0)
    c.optim.decay_rules = tuple(extra_rules) + tuple(map(tuple, c.optim.decay_rules))
    tx = make_optimizer(c.optim, c.train.steps, trainable, method)
    updates, _ = tx.update(zeros, tx.init(trainable), trainable)
    flat, values = jft.core.rules.flatten(updates), jft.core.rules.flatten(trainable)
    assert any(p.endswith("/bias") for p in flat) and any(p.endswith("lora/magnitude") for p in flat)
    for path, u in flat.items():
      if re.fullmatch(exempt, path):
        np.testing.assert_array_equal(u, 0, err_msg=f"{name} {extra_rules}: {path}")
      else:
        np.testing.assert_allclose(u, -coef * values[path], rtol=1e-5, err_msg=f"{name} {extra_rules}: {path}")


def test_gradient_accumulation_equals_one_batch_k_times_bigger(tiny_model):
  """optim.grad_accum=2: the first micro-batch changes nothing; after the second, the update (AdamW, clipping,
  the schedule) is the one step on both micro-batches as one batch would make, round after round."""
  from jft.run.optim import make_optimizer

  model, params = jft.load_pretrained(tiny_model)
  method = peft.LoRA(rank=2)
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  rng = np.random.default_rng(0)
  big = [{"input_ids": jnp.asarray(rng.integers(5, 1000, (4, 8)), jnp.int32),
          "attention_mask": jnp.ones((4, 8), jnp.int32)} for _ in range(2)]
  # A run of 8 micro-batch steps with grad_accum=2 is a run of 4 steps on batches twice as big.
  txs = {k: make_optimizer(_optim_config(tiny_model, grad_accum=k, warmup_steps=0).optim, 4 * k, trainable, method)
         for k in (1, 2)}
  steps = {k: make_train_step(model, method, tx, donate=False) for k, tx in txs.items()}
  ref, ref_state = trainable, txs[1].init(trainable)
  acc, acc_state = trainable, txs[2].init(trainable)
  key = jax.random.PRNGKey(0)
  for batch in big:
    start = acc
    half, acc_state, _ = steps[2](acc, acc_state, frozen, {k: v[:2] for k, v in batch.items()}, key)
    for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(start)):
      np.testing.assert_array_equal(a, b)  # accumulated, not applied
    acc, acc_state, _ = steps[2](half, acc_state, frozen, {k: v[2:] for k, v in batch.items()}, key)
    ref, ref_state, _ = steps[1](ref, ref_state, frozen, batch, key)
    for path, value in jft.core.rules.flatten(ref).items():
      np.testing.assert_allclose(jft.core.rules.flatten(acc)[path], value, atol=1e-6, err_msg=path)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(trainable)))
  assert moved > 1e-3, moved  # two real AdamW steps (lr 1e-2), not a comparison of nothing


def test_packed_batches_hold_every_example_they_take_and_give_the_unpacked_loss(tiny_model):
  """data.pack: each batch packs the next examples of the epoch into batch_size rows of max_length, several
  to a row, each whole under its own segment id; attention stays inside each, so the SFT loss of a packed
  batch is the loss of the same examples padded one to a row."""
  from jft.run.step import make_loss_fn

  rng = np.random.default_rng(0)
  rows = [(rng.integers(5, 1000, n).astype(np.int32), (np.arange(n) >= n // 3).astype(np.int32))
          for n in rng.integers(4, 30, 40)]
  batches = data.Batches(rows, batch_size=2, max_length=48, seed=0, pack=True)
  taken = batches._epoch_batches(0)
  model, params = jft.load_pretrained(tiny_model)
  method = peft.LoRA(rank=2)
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  loss_fn = jax.jit(make_loss_fn(model, method))
  loss = lambda b: float(loss_fn(trainable, frozen, {k: jnp.asarray(v) for k, v in b.items()},
                                 jax.random.PRNGKey(0))[0])
  for i, chosen in enumerate(taken):
    packed, examples = next(batches), [rows[j] for j in chosen]
    assert packed["input_ids"].shape == (2, 48) and len(examples) > 2  # several examples share a row
    got = [(ids[seg == s], mask[seg == s])
           for ids, seg, mask in zip(packed["input_ids"], packed["attention_mask"], packed["loss_mask"])
           for s in range(1, seg.max() + 1)]
    n_taken, n_packed = len(examples), len(got)
    assert n_packed == n_taken, f"batch {i} took {n_taken} examples and packed {n_packed}"
    for (ids, mask), (got_ids, got_mask) in zip(examples, got):
      np.testing.assert_array_equal(got_ids, ids)
      np.testing.assert_array_equal(got_mask, mask)
    if i < 2:
      np.testing.assert_allclose(loss(packed), loss(data.pad_batch(examples, 48)), rtol=1e-5)


def test_exact_match_from_greedy_generation(tiny_model):
  from jft.objectives import evaluate
  from jft.models.generate import Sampling, generate

  model, params = jft.load_pretrained(tiny_model)
  tok = jft.load_tokenizer(tiny_model)
  prompts = ["Review: fine\nSentiment:", "Review: awful\nSentiment:"]
  outs = generate(model, params, [tok(p)["input_ids"] for p in prompts], Sampling(max_new_tokens=2))
  examples = [{"prompt": p, "response": tok.decode(o, skip_special_tokens=True).strip()} for p, o in zip(prompts, outs)]
  assert evaluate.exact_match(model, params, tok, examples, chat=False, max_new_tokens=2)["exact_match"] == 1.0
  examples[0]["response"] = "something else entirely"
  assert evaluate.exact_match(model, params, tok, examples, chat=False, max_new_tokens=2)["exact_match"] == 0.5


def test_chat_sft_local_run_packs_and_trains(tiny_model, tmp_path):
  c = cfg.build(os.path.join(ROOT, "configs", "chat_sft.py") + ":mode=local", [("model.name", tiny_model)])
  results = train(c, str(tmp_path / "chat"), echo=lambda *_: None)
  assert results["steps"] == c.train.steps and not results["interrupted"]
  with open(tmp_path / "chat" / "metrics.jsonl") as f:
    losses = [json.loads(l)["loss"] for l in f if json.loads(l)["kind"] == "train"]
  assert len(losses) == c.train.steps // c.train.log_every and all(np.isfinite(losses))
  # Packed: every logged step trained on all the examples its batch took (their response tokens).
  from jft import objectives
  from jft.run.train import examples_for
  tokenizer = jft.load_tokenizer(tiny_model)
  objective = objectives.from_config(c)
  examples = examples_for(c, tokenizer, c.data.train_split, c.data.max_train_examples or None)
  rows = objective.rows(examples, tokenizer, c.data)
  taken = data.Batches(rows, c.train.batch_size, c.data.max_length, seed=c.seed, pack=True)._epoch_batches(0)
  with open(tmp_path / "chat" / "metrics.jsonl") as f:
    records = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert c.data.pack and len(taken) >= c.train.steps and all(len(t) > c.train.batch_size for t in taken)
  for r in records:
    want = sum(int(rows[i][1].sum()) for i in taken[r["step"] - 1])
    assert r["loss_tokens"] == want, f"step {r['step']}: {r['loss_tokens']} of its examples' {want} response tokens"


def test_bfloat16_compute_keeps_float32_trainable_state(tiny_model, tmp_path):
  c = cfg.build(TINY + ":steps=2", [("model.name", tiny_model), ("model.dtype", "bfloat16"),
                                     ("eval.zero_shot", "false"), ("data.test_split", "")])
  results = train(c, str(tmp_path / "bf16"), echo=lambda *_: None)
  assert np.isfinite(results["validation"]["loss"])
  _, model, method, params, _ = run.restore_params(str(tmp_path / "bf16"), "latest")
  assert model.dtype == jnp.bfloat16
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert params["layers"]["self_attn"]["q_proj"]["lora"]["a"].dtype == jnp.float32


@pytest.mark.slow  # a sweep point in a subprocess, then export, a compile and decoding (about a minute)
def test_compare_methods_script_writes_a_table(tiny_model, tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare_methods.py"), "--config", TINY,
                        "--mode", "", "--methods", "ia3", "--set", f"model.name={tiny_model}", "--set",
                        "train.steps=2", "--new-tokens", "4", "--out", str(tmp_path / "cmp")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert "| ia3 | 192 | 0.012 |" in out.stdout and "(peft)" in out.stdout
  with open(tmp_path / "cmp" / "compare.csv") as f:
    row = next(csv.DictReader(f))
  assert row["method"] == "ia3" and int(row["storage_bytes"]) > 0 and float(row["compiled_step_mib"]) > 0
  assert float(row["decode_unmerged_ms"]) > 0 and float(row["decode_merged_ms"]) > 0
  assert os.path.getsize(tmp_path / "cmp" / "accuracy-vs-params.png") > 1000


def test_dry_run_writes_where_arrays_live(tiny_model, tmp_path, capsys):
  workdir = str(tmp_path / "dry")
  assert cli.main(["train", "--config", TINY, f"--config.model.name={tiny_model}", "--workdir", workdir,
                   "--dry-run"]) == 0
  layout = json.load(open(os.path.join(workdir, "shardings.json")))
  assert layout["mesh"]["shape"] == {"data": 1, "fsdp": 1, "tensor": 1} and layout["mesh"]["processes"] == 1
  memory = layout["compiled_step_memory"]
  assert memory["total"] > memory["arguments"] > 0
  leaves = {(leaf["group"], leaf["path"]): leaf for leaf in layout["leaves"]}
  lora_a = leaves[("params", "layers/self_attn/q_proj/lora/a")]
  assert lora_a["shape"] == [2, 32, 4] and lora_a["spec"] == [None, "fsdp", None]
  assert lora_a["bytes_per_device"] == 2 * 32 * 4 * 4
  assert any(g == "opt_state" and p.endswith("mu/layers/self_attn/q_proj/lora/a") for g, p in leaves)
  assert layout["per_device_bytes"]["params"] == sum(v["bytes_per_device"] for (g, _), v in leaves.items()
                                                     if g == "params")
  assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(os.path.join(workdir, "checkpoints"))
  assert "dry run: wrote" in capsys.readouterr().out


def _write_legacy_layout(directory):
  """Rewrite every orbax step under `directory` as an older jft wrote it: `q_proj/lora_a` beside the
  kernel instead of `q_proj/lora/a`, and step/rng as arrays in the state."""
  import orbax.checkpoint as ocp

  def legacy(node):
    if not isinstance(node, dict):
      return np.asarray(node) if hasattr(node, "shape") else node
    node = {k: legacy(v) for k, v in node.items()}
    node.update({f"lora_{k}": v for k, v in node.pop("lora", {}).items()})
    return node

  mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  for step in mngr.all_steps():
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    old = legacy(_as_dicts(out["state"]))
    if "opt_state" in old:
      old.update(step=np.int32(step), rng=np.zeros(2, np.uint32))
    mngr.delete(step)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave(out["meta"])),
              force=True)
  mngr.wait_until_finished()


def _as_dicts(node):
  """Orbax's raw tree (dicts and lists) as nested dicts keyed by str (list index -> "0", "1", ...)."""
  if isinstance(node, (list, tuple)):
    return {str(i): _as_dicts(v) for i, v in enumerate(node)}
  if isinstance(node, dict):
    return {k: _as_dicts(v) for k, v in node.items()}
  return node


@pytest.mark.slow  # model-scale / long: make test-slow (the default suite stays under 15 min)
def test_checkpoints_of_the_older_layout_restore(tiny_model, tmp_path):
  """Runs saved before methods grouped their leaves (`lora_a` beside the kernel) still load and resume."""
  import orbax.checkpoint as ocp

  workdir = str(tmp_path / "old")
  c = cfg.build(TINY + ":steps=6", [("model.name", tiny_model), ("eval.zero_shot", "false"),
                                     ("data.test_split", "")])
  train(c, workdir, echo=lambda *_: None)
  expected = _losses(workdir)
  ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")).delete(6)
  _, _, _, new_params, _ = run.restore_params(workdir, "latest")  # step 4
  for sub in ("checkpoints", "best"):
    _write_legacy_layout(os.path.join(workdir, sub))
  _, _, _, old_params, _ = run.restore_params(workdir, "latest")
  for path, value in jft.core.rules.flatten(new_params).items():
    np.testing.assert_array_equal(np.asarray(jft.core.rules.flatten(old_params)[path]), np.asarray(value), err_msg=path)
  run.restore_params(workdir, "best")
  train(c, workdir, resume=True, echo=lambda *_: None)  # optimizer state restored too: the same losses
  assert _losses(workdir) == expected


def test_compose_from_a_config(tiny_model, tmp_path):
  c = cfg.build(TINY + ":steps=2,method=compose", [("model.name", tiny_model), ("eval.zero_shot", "false"),
                                                     ("data.test_split", "")])
  with c.unlocked():
    c.method.hparams = {"methods": ({"method": "lora", "rank": 2}, {"method": "bitfit"})}
  results = train(c, str(tmp_path / "compose"), echo=lambda *_: None)
  lora = 2 * ((32 * 2 + 2 * 32) + (32 * 2 + 2 * 16))  # r=2 on q (32 -> 32) and v (32 -> 16), 2 layers
  bitfit = 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)  # a bias on every projection
  assert results["counts"]["trainable"] == lora + bitfit
  _, _, method, _, _ = run.restore_params(str(tmp_path / "compose"), "latest")
  assert [m.name for m in method.methods] == ["lora", "bitfit"]


def test_accumulated_updates_follow_the_whole_schedule():
  """grad_accum=2 over 8 steps: the schedule of a 4-update run with warmup 2 steps = 1 update (the clock counts
  updates: counting micro-batches, the run would end halfway through its decay, at [0, 0.5, 1, 0.85])."""
  from jft.run import optim

  c = cfg.build(TINY, [("model.name", "/m")]).optim
  with c.unlocked():
    c.update(name="sgd", momentum=0.0, weight_decay=0.0, clip_norm=0.0, schedule="linear", warmup_steps=2,
             final_lr_ratio=0.1, lr=1.0, grad_accum=2)
  params = {"w": jnp.zeros(())}
  tx = optim.make_optimizer(c, 8, params)
  state, rates = tx.init(params), []
  for _ in range(8):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    rates.append(-float(updates["w"]))
  emitted = rates[1::2]
  assert rates[0::2] == [0.0] * 4  # nothing moves between the micro-batches of an update
  with c.unlocked():
    c.warmup_steps = 1
  np.testing.assert_allclose(emitted, [float(optim.schedule(c, 4)(i)) for i in range(4)], rtol=1e-6)
  np.testing.assert_allclose(emitted, [0.0, 1.0, 0.7, 0.4], rtol=1e-6)  # warmup 1 update, then linear to 0.1
