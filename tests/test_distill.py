"""Distillation (jft/objectives/distill.py): GKD's generalized JSD equals TRL 1.16's, the fused two-head
divergence equals it on full logits without forming them, and `jft train` distils a teacher (a model folder
or a run folder) into a LoRA student, on- and off-policy; bad teachers and settings get one named error each.

TRL's `GKDTrainer.generalized_jsd_loss` is a static method: called as is, on fixed logits.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
import jft.align
from jft import config as cfg, data, objectives, peft
from jft.cli import main
from jft.models import head
from jft.objectives import distill
from jft.run import assemble
from jft.run.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
QUICK = ["--config.train.eval_every=0", "--config.eval.zero_shot=false", "--config.data.test_split=",
         "--config.data.max_eval_examples=4"]


def _logits(seed, shape=(3, 7, 11)):
  rng = np.random.RandomState(seed)
  student, teacher = (2 * rng.randn(*shape)).astype(np.float32), (2 * rng.randn(*shape)).astype(np.float32)
  labels = rng.randint(0, shape[-1], shape[:2])
  labels[0, :3] = -100  # a prompt
  labels[2, 5:] = -100  # padding
  return student, teacher, labels


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_loss_equals_trl_gkd(beta, temperature, masked):
  import torch
  from trl.experimental.gkd import GKDTrainer

  student, teacher, labels = _logits(int(10 * beta + temperature))
  labels = labels if masked else None
  s = torch.tensor(student, requires_grad=True)
  want = GKDTrainer.generalized_jsd_loss(s, torch.tensor(teacher), None if labels is None else torch.tensor(labels),
                                         beta=beta, temperature=temperature)
  want.backward()
  fn = lambda x: jft.align.generalized_jsd_loss(x, teacher, labels, beta=beta, temperature=temperature)
  got, grad = jax.value_and_grad(fn)(student)
  assert abs(float(got) - want.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(grad), s.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_generalized_jsd_reductions_equal_trl_and_its_name_is_exported():
  import torch
  from trl.experimental.gkd import GKDTrainer

  student, teacher, labels = _logits(7)
  for lab in (None, labels):
    for kwargs in ({"reduction": "sum"}, {"reduction": "mean"}, {"num_items_in_batch": 5}):
      want = GKDTrainer.generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher),
                                             None if lab is None else torch.tensor(lab), beta=0.3, **kwargs)
      got = jft.align.generalized_jsd_loss(student, teacher, lab, beta=0.3, **kwargs)
      np.testing.assert_allclose(float(got), want.item(), rtol=1e-5, atol=1e-5)
  want = GKDTrainer.generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
                                         beta=0.3, reduction="none")
  got = jft.align.generalized_jsd_loss(student, teacher, labels, beta=0.3, reduction="none")
  np.testing.assert_allclose(np.asarray(got)[labels != -100], want.numpy(), atol=1e-6)  # TRL keeps the rows only
  assert jft.align.generalized_jsd_loss is objectives.generalized_jsd_loss
  with pytest.raises(objectives.ObjectiveError, match="reduction='avg': expected one of batchmean"):
    jft.align.generalized_jsd_loss(student, teacher, reduction="avg")


def _heads(rng, tied, vocab, width):
  w = rng.randn(vocab, width) if tied else rng.randn(width, vocab)
  path = "embed_tokens/embedding" if tied else "lm_head/kernel"
  w = w.astype(np.float32)
  params = {"embed_tokens": {"embedding": w}} if tied else {"lm_head": {"kernel": w}}
  return params, head.Head(path, tied)


@pytest.mark.parametrize("tied,teacher_tied,beta,temperature,alpha", [
    (True, True, 0.0, 1.0, 0.0), (True, False, 0.5, 2.0, 0.0), (False, True, 1.0, 1.0, 0.3),
    (False, False, 0.3, 0.7, 1.0)])
def test_chunked_divergence_and_its_gradient_equal_the_loss_on_full_logits(monkeypatch, tied, teacher_tied, beta,
                                                                        temperature, alpha):
  """Both heads run over chunks of 3 positions (several chunks, one skipped: no loss in it); the student
  (width 6) and teacher (width 5) differ in width. Gradients w.r.t. the hidden states and the head."""
  monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 2 * 3 * 11 * head._DIVERGENCE_BUFFERS)
  rng = np.random.RandomState(0)
  b, t, vocab = 2, 10, 11
  x, xt = rng.randn(b, t, 6).astype(np.float32), rng.randn(b, t, 5).astype(np.float32)
  params, student_head = _heads(rng, tied, vocab, 6)
  teacher, teacher_head = _heads(rng, teacher_tied, vocab, 5)
  ids = rng.randint(0, vocab, (b, t))
  mask = (rng.rand(b, t) > 0.4).astype(np.int32)
  mask[:, -4:] = 0
  w = jax.tree.leaves(params)[0]
  wt = jax.tree.leaves(teacher)[0]
  as_params = lambda kernel: jax.tree.map(lambda _: kernel, params)

  def fused(x, kernel):
    return head.head_divergence(x, as_params(kernel), student_head, xt, teacher, teacher_head, ids, mask, beta,
                                temperature, alpha, trainable_head=True)[0]

  def plain(x, kernel):
    logits = x @ (kernel.T if tied else kernel)
    targets, weights = head.shifted_targets(ids, mask)
    teacher_logits = xt @ (wt.T if teacher_tied else wt)
    jsd = jft.align.generalized_jsd_loss(logits, teacher_logits, jnp.where(weights > 0, targets, -100), beta=beta,
                                         temperature=temperature)
    return (1 - alpha) * jsd + alpha * head.next_token_loss(logits, ids, mask)[0]

  got, got_grads = jax.value_and_grad(fused, argnums=(0, 1))(x, w)
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(x, w)
  assert abs(float(got) - float(want)) <= 1e-5 and float(want) > 0.01
  for g, h in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-5, rtol=1e-5)


def _shapes(jaxpr, out):
  """Every intermediate's shape in a jaxpr and the jaxprs inside it (scan, cond, custom_vjp, jit, remat)."""
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _shapes(inner, out)
  return out


def _step_with_teacher(vocab=49152, b=2):
  """A LoRA train step whose teacher has another width, SmolLM2's vocabulary, from shapes alone; -> (step,
  student, its abstract base, args(t): the step's five arguments for b x t tokens)."""
  import optax

  student_config = jft.ModelConfig(family="llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                                   num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=256,
                                   tie_word_embeddings=True)
  student = jft.Transformer(student_config)
  teacher = jft.Transformer(dataclasses.replace(student_config, hidden_size=24, head_dim=12, tie_word_embeddings=False))
  base = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"])
  teacher_params = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(1), jnp.ones((1, 4), jnp.int32))["params"])
  method = peft.build("lora", rank=2, targets=("q_proj", "v_proj"))
  trainable, frozen = jax.eval_shape(lambda p: peft.split(method, method.init(jax.random.PRNGKey(0), p)), base)
  tx = optax.adam(1e-3)
  step = make_train_step(student, method, tx, objective=objectives.build("distill", teacher="t"),
                         teacher=(teacher, teacher_params))

  def args(t):
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}
    return trainable, jax.eval_shape(tx.init, trainable), frozen, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)

  return step, student, base, teacher_params, args


def test_the_train_step_never_forms_batch_x_length_x_vocab_logits():
  """No intermediate of the whole step (forward and backward, both models) is [B, T, vocab] or as large;
  the logits path of the same student has them (so the check would see them)."""
  vocab, b, t = 49152, 2, 64
  step, student, base, teacher_params, args = _step_with_teacher(vocab, b)
  shapes = _shapes(jax.make_jaxpr(step.step)(*args(t), teacher_params).jaxpr, set())
  assert any(s[-1:] == (vocab,) and s[0] == b for s in shapes)  # the chunks' logits are there
  assert not [s for s in shapes if s[-1:] == (vocab,) and np.prod(s) >= b * t * vocab], sorted(shapes)
  logits_path = _shapes(jax.make_jaxpr(lambda p, ids: student.apply({"params": p}, ids))(
      base, args(t)[3]["input_ids"]).jaxpr, set())
  assert (b, t, vocab) in logits_path


@pytest.mark.slow
def test_the_compiled_steps_temporaries_grow_by_less_than_one_logits_buffer():
  """XLA's memory analysis of the compiled step at 64 and 128 positions: the temporaries grow by far less
  than one [B, 64, vocab] float32 buffer (25 MiB), which full logits of either model would add several times."""
  vocab, b = 49152, 2
  step, _, _, _, args = _step_with_teacher(vocab, b)
  temp = {t: step.lower(*args(t)).compile().memory_analysis().temp_size_in_bytes for t in (64, 128)}
  assert temp[128] - temp[64] < b * 64 * vocab * 4 / 4, temp


def _train(workdir, *overrides, model):
  return main(["train", "--config", f"{TINY}:objective=distill,steps=6", f"--config.model.name={model}", *QUICK,
               *overrides, f"--workdir={workdir}"])


def _losses(workdir):
  return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["kind"] == "train"]


def test_distilling_a_run_folder_into_a_lora_student_lowers_the_divergence(byte_model, tmp_path):
  """The teacher: a LoRA run on the same base (its adapter folded in). The student starts as the base."""
  teacher = tmp_path / "teacher"
  assert main(["train", "--config", f"{TINY}:steps=4", f"--config.model.name={byte_model}", *QUICK,
               "--config.data.eval_split=", f"--workdir={teacher}"]) == 0  # no evaluation: its latest step
  student = tmp_path / "student"
  assert _train(student, f"--config.objective.hparams.teacher={teacher}", model=byte_model) == 0
  records = _losses(student)
  assert len(records) == 6 and records[-1]["loss"] < 0.5 * records[0]["loss"], [r["loss"] for r in records]
  assert records[0]["jsd"] == records[0]["loss"] and records[0]["nll"] > 1.0  # alpha = 0: the divergence alone
  results = json.load(open(student / "results.json"))
  assert 0.0 <= results["validation"]["accuracy"] <= 1.0


def test_a_student_equal_to_its_teacher_starts_at_zero_divergence_on_and_off_policy(byte_model, tmp_path):
  """Teacher = the base folder, student = LoRA on it (b = 0): the same model, so the divergence is 0 at the
  first step, also on the student's own samples (lmbda = 1: every step on-policy)."""
  assert _train(tmp_path / "run", f"--config.objective.hparams.teacher={byte_model}", "--config.train.steps=1",
                "--config.objective.hparams.on_policy=true", "--config.objective.hparams.lmbda=1.0",
                "--config.objective.hparams.max_new_tokens=6", "--config.objective.hparams.beta=0.0",
                "--config.data.eval_split=", model=byte_model) == 0
  first = _losses(tmp_path / "run")[0]
  assert abs(first["loss"]) < 1e-5 and first["on_policy"] == 1.0 and 1 <= first["completions/mean_length"] <= 6


def test_on_policy_rollout_is_seeded_and_trains_on_the_completion_only(byte_model):
  model, params = jft.load_pretrained(byte_model)
  tokenizer = jft.load_tokenizer(byte_model)
  objective = objectives.build("distill", teacher=byte_model, on_policy=True, lmbda=0.5, max_new_tokens=5)
  assert objective.online and not objective.packable
  rows = [(np.arange(10, 10 + n, dtype=np.int32), np.asarray([0] * (n - 3) + [1] * 3, np.int32)) for n in (6, 9)]
  batch = data.pad_batch(rows, 16, tokenizer.pad_token_id)
  forward = objectives.Forward(model, model, params)
  drawn = {seed: objective.rollout(batch, forward, tokenizer, seed, "test") for seed in range(6)}
  for seed, (out, info) in drawn.items():
    assert info["on_policy"] == float(np.random.default_rng(seed).random() < 0.5)
    if not info["on_policy"]:
      assert out is batch
      continue
    for (ids, loss), row_ids, row_mask, row_loss in zip(rows, out["input_ids"], out["attention_mask"],
                                                         out["loss_mask"]):
      prompt = len(ids) - 3
      np.testing.assert_array_equal(row_ids[:prompt], ids[:prompt])  # the row's own prompt...
      assert row_loss[:prompt].sum() == 0 and 1 <= row_loss.sum() <= 5  # ...then the sampled completion
      assert (row_mask != 0).sum() == prompt + row_loss.sum()
  seeds = [s for s, (_, info) in drawn.items() if info["on_policy"]]
  assert seeds and len(seeds) < 6
  again, _ = objective.rollout(batch, forward, tokenizer, seeds[0], "test")
  np.testing.assert_array_equal(again["input_ids"], drawn[seeds[0]][0]["input_ids"])


def _config(model, teacher, *more):
  return cfg.build(f"{TINY}:objective=distill", [("model.name", model), ("objective.hparams.teacher", teacher),
                                                 *more])


def test_bad_teachers_and_settings_get_one_named_error_each(byte_model, tmp_path, capsys):
  with pytest.raises(distill.TeacherError, match=r"teacher='/no/such/model': '/no/such/model' is neither an existing"):
    assemble.check_teacher(_config(byte_model, "/no/such/model"))
  other_vocab = tmp_path / "other_vocab"  # 259 tokens: one added to the byte vocabulary
  shutil.copytree(byte_model, other_vocab)
  settings = json.load(open(other_vocab / "config.json"))
  json.dump({**settings, "vocab_size": settings["vocab_size"] + 1}, open(other_vocab / "config.json", "w"))
  with pytest.raises(distill.TeacherError, match=r"the teacher's vocabulary has 259 tokens, the student .*'s 258"):
    assemble.check_teacher(_config(byte_model, str(other_vocab)))
  other_tokenizer = tmp_path / "other_tokenizer"  # same size, two tokens' ids swapped
  shutil.copytree(byte_model, other_tokenizer)
  spec = json.load(open(other_tokenizer / "tokenizer.json"))
  vocab = spec["model"]["vocab"]
  (a, i), (b, j) = list(vocab.items())[:2]
  vocab[a], vocab[b] = j, i
  json.dump(spec, open(other_tokenizer / "tokenizer.json", "w"))
  with pytest.raises(distill.TeacherError, match=r"the teacher's tokenizer is not the student .*'s \(4 token/id pairs"):
    assemble.check_teacher(_config(byte_model, str(other_tokenizer)))
  # through `jft train`: refused before any work (exit 2), nothing trained
  assert _train(tmp_path / "refused", f"--config.objective.hparams.teacher={other_tokenizer}", model=byte_model) == 2
  assert "jft train: error: objective.hparams.teacher=" in capsys.readouterr().err
  assert not os.path.isdir(tmp_path / "refused" / "checkpoints")
  for field, value, allowed in (("beta", 1.5, r"in \[0, 1\]"), ("temperature", 0.0, "> 0"),
                                ("lmbda", -0.1, r"in \[0, 1\]")):
    expected = rf"{field}={value}: expected a finite float {allowed}"
    with pytest.raises(objectives.ObjectiveError, match=rf"objective distill: {expected}"):
      objectives.build("distill", teacher=byte_model, **{field: value})
    with pytest.raises(cfg.ConfigError, match=rf"objective.hparams.{expected}"):
      _config(byte_model, byte_model, (f"objective.hparams.{field}", str(value)))
  with pytest.raises(cfg.ConfigError, match="objective distill: no teacher; set objective.hparams.teacher"):
    _config(byte_model, "")
