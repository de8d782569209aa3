"""Knowledge distillation: GKD's generalized Jensen-Shannon divergence to a frozen teacher (Agarwal et al.,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", 2024).

The teacher is a model name or folder, or a jft run folder (its best adapter
folded into its base); it must share the student's tokenizer, since the loss
compares the two next-token distributions token by token (`check_teacher`
refuses another one before any weight is read). Its params are frozen: an
argument of the step beside the frozen base, never in the optimizer state
(`jft.run.step.make_train_step(..., teacher=...)`).

The loss, on the positions that predict a loss-carrying token (the batch's
`loss_mask`, as SFT's):

    loss = alpha * next-token loss + (1 - alpha) * generalized JSD(student, teacher; beta, temperature)

beta = 0 is KL(teacher || student), beta = 1 KL(student || teacher) (TRL's
convention). Both heads run fused, chunk by chunk
(`jft.models.head.head_divergence`): neither model's `[batch, length, vocab]`
logits exist. `generalized_jsd_loss` is the same divergence on full logits,
equal to TRL 1.16's `GKDTrainer.generalized_jsd_loss` (`tests/test_distill.py`).

With `on_policy`, a fraction `lmbda` of the steps (drawn from the step's seed,
so a resumed run draws the same) trains on the student's own completions of the
batch's prompts, sampled outside the step at `temperature` with the KV-cache
decoder (GKD's on-policy mode). Rows, evaluation and samples are those of the
next-token objective `data_objective` (classification, sft, lm, instruct).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jft import data
from jft.core.fields import Choice, Flag, Float, Int, Text
from jft.models import head
from jft.models.generate import Sampling, generate, stop_token_ids
from jft.models.pretrained import load_tokenizer, model_config, resolve
from jft.objectives import api, language

__all__ = ["generalized_jsd_loss"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


class TeacherError(api.ObjectiveError):
  """A distillation's teacher that cannot teach this student (missing, another tokenizer, no teacher given)."""


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
  """GKD's generalized JSD of `[B, T, V]` logits, as TRL 1.16's `GKDTrainer.generalized_jsd_loss`.

  `labels` [B, T]: positions holding -100 are left out. `batchmean` divides the sum by the positions kept
  (with `labels`, at least 1) or by B (without), `mean` by the number of terms kept (positions x vocab);
  `num_items_in_batch` divides the sum by it instead. `none` returns the `[B, T, V]` terms with the
  left-out positions zero (TRL returns only the kept rows: `terms[labels != -100]`).
  """
  if not 0 <= beta <= 1:
    raise api.ObjectiveError(f"generalized_jsd_loss: beta={beta}: expected a float in [0, 1]")
  if not temperature > 0:
    raise api.ObjectiveError(f"generalized_jsd_loss: temperature={temperature}: expected a float > 0")
  if reduction not in REDUCTIONS:
    raise api.ObjectiveError(f"generalized_jsd_loss: reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
  terms = head.jsd_terms(jnp.asarray(student_logits), jnp.asarray(teacher_logits), float(beta), float(temperature))
  keep = None if labels is None else (jnp.asarray(labels) != -100)
  if keep is not None:
    terms = jnp.where(keep[..., None], terms, 0.0)
  if reduction == "none":
    return terms
  total = terms.sum()
  if num_items_in_batch is not None:
    return total / num_items_in_batch
  if reduction == "batchmean":
    return total / (jnp.maximum(keep.sum(), 1) if keep is not None else max(terms.shape[0], 1))
  if reduction == "sum":
    return total
  return total / ((keep.sum() if keep is not None else terms[..., 0].size) * terms.shape[-1])


@dataclasses.dataclass(frozen=True)
class TeacherForward(api.Forward):
  """The step's `Forward` with the teacher beside the policy: its model (deterministic) and frozen params."""
  teacher_model: Any = None
  teacher: Any = None

  def apply_teacher(self, input_ids, attention_mask, **kwargs):
    return self.teacher_model.apply({"params": self.teacher}, input_ids, attention_mask=attention_mask, **kwargs)


def _next_token_objectives() -> list[str]:
  return sorted(n for n, c in api.OBJECTIVES.items() if issubclass(c, language.SFT) and n != Distill.name)


@dataclasses.dataclass(frozen=True)
class Distill(api.Objective):
  """Distil a frozen teacher into the student (GKD); optionally on the student's own samples."""
  name: ClassVar[str] = "distill"
  uses_teacher: ClassVar[bool] = True  # the step passes the teacher's params (`with_teacher`)
  teacher: str = ""
  beta: float = 0.5
  temperature: float = 1.0
  alpha: float = 0.0
  on_policy: bool = False
  lmbda: float = 0.5
  max_new_tokens: int = 32
  data_objective: str = "classification"
  hparam_rules: ClassVar[dict] = {
      "teacher": Text(note="a model name or folder, or a jft run folder (its adapter applied); required"),
      "beta": Float(0, 1, note="0 = KL(teacher || student), 1 = KL(student || teacher)"),
      "temperature": Float(0, lo_open=True, note="softens both distributions; also the on-policy sampling's"),
      "alpha": Float(0, 1, note="weight of the next-token loss; 1 - alpha weighs the divergence"),
      "on_policy": Flag(), "lmbda": Float(0, 1, note="fraction of steps on the student's own completions"),
      "max_new_tokens": Int(1, note="length of an on-policy completion"),
      "data_objective": Choice(_next_token_objectives, note="whose rows, evaluation and samples to use")}

  @property
  def online(self) -> bool:
    return self.on_policy and self.lmbda > 0

  @property
  def packable(self) -> bool:  # on-policy prompts are read off each row: one example per row
    return self.rows_of().packable and not self.on_policy

  def rows_of(self) -> api.Objective:
    """The next-token objective whose rows, evaluation and samples this distillation uses."""
    return api.build(self.data_objective)

  def rows_per_batch(self, batch_size: int) -> int:
    if not self.teacher:
      raise TeacherError("objective distill: no teacher; set objective.hparams.teacher to a model name or folder, "
                         "or a jft run folder")
    return batch_size

  # -- the teacher ---------------------------------------------------------------

  def with_teacher(self, forward: api.Forward, teacher_model, teacher_params) -> TeacherForward:
    """The step's `forward` with the teacher attached (`jft.run.step.make_loss_fn`)."""
    fields = {f.name: getattr(forward, f.name) for f in dataclasses.fields(api.Forward)}
    return TeacherForward(**fields, teacher_model=teacher_model, teacher=teacher_params)

  def check_teacher(self, student: str, teacher: str, where: str):
    """Refuse, from metadata and tokenizers alone, a teacher whose vocabulary is not the student's."""
    try:
      path = resolve(teacher)
    except FileNotFoundError as e:
      raise TeacherError(f"{where}: {e}") from None
    ours, theirs = model_config(student).vocab_size, model_config(teacher).vocab_size
    if ours != theirs:
      raise TeacherError(f"{where}: the teacher's vocabulary has {theirs} tokens, the student {student}'s {ours}; "
                         "distillation compares the two next-token distributions token by token, so the teacher "
                         "must share the student's tokenizer")
    if path == resolve(student):
      return
    mine, other = load_tokenizer(student).get_vocab(), load_tokenizer(teacher).get_vocab()
    differ = sorted(set(mine.items()) ^ set(other.items()), key=lambda kv: kv[1])
    if differ:
      token, index = differ[0]
      raise TeacherError(f"{where}: the teacher's tokenizer is not the student {student}'s ({len(differ)} "
                         f"token/id pairs differ, e.g. {token!r} = {index}); distillation compares the two "
                         "next-token distributions token by token, so the teacher must share the student's tokenizer")

  # -- data, evaluation, samples: the next-token objective's -----------------------

  def examples(self, d, tokenizer, split, limit):
    return self.rows_of().examples(d, tokenizer, split, limit)

  def rows(self, examples, tokenizer, d):
    return self.rows_of().rows(examples, tokenizer, d)

  def row_length(self, row):
    return self.rows_of().row_length(row)

  def collate(self, rows, length, pad_id):
    return self.rows_of().collate(rows, length, pad_id)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    return self.rows_of().evaluate(config, forward, tokenizer, examples, mesh=mesh)

  def samples(self, config, forward, tokenizer, examples):
    return self.rows_of().samples(config, forward, tokenizer, examples)

  # -- the step --------------------------------------------------------------------

  def rollout(self, batch, forward: api.Forward, tokenizer, seed: int, where: str):
    """A fraction `lmbda` of the steps (drawn from `seed`): each row's prompt (the tokens before its first
    loss token) completed by the student, the loss then on the completion (up to and with its stop token)."""
    if not np.random.default_rng(seed).random() < self.lmbda:
      return batch, {"on_policy": 0.0}
    prompts = []
    for ids, attention, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
      real = np.asarray(attention) != 0
      ids, loss = np.asarray(ids)[real], np.asarray(loss)[real]
      first = int(np.argmax(loss != 0)) if loss.any() else len(ids)
      prompts.append([int(i) for i in ids[:max(first, 1)]])  # a row all loss (lm) keeps its first token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature)
    completions = generate(forward.model, forward.params, prompts, sampling,
                           stop_tokens=stop_token_ids(forward.model, tokenizer), seed=seed, pad_id=pad)
    rows = [(np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32))
            for p, c in zip(prompts, completions)]
    longest = max(len(x) for x, _ in rows)
    out = data.pad_batch(rows, max(-(-longest // 16) * 16, np.shape(batch["input_ids"])[1]), pad)
    return out, {"on_policy": 1.0, "completions/mean_length": float(np.mean([len(c) for c in completions]))}

  def loss(self, forward, batch):
    if not isinstance(forward, TeacherForward) or forward.teacher is None:
      raise TeacherError("objective distill: the step runs without a teacher (build it with "
                         "jft.run.step.make_train_step(..., teacher=(model, params)))")
    mask = batch.get("loss_mask", batch["attention_mask"])
    loss, metrics = head.model_divergence(forward.apply, forward.params, forward.apply_teacher, forward.teacher,
                                          batch["input_ids"], batch["attention_mask"], mask, self.beta,
                                          self.temperature, self.alpha, forward.trained)
    return loss, jax.lax.stop_gradient(metrics)
