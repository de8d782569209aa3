"""Learning from preferences: DPO (sigmoid, IPO, hinge, robust), ORPO, KTO.

Data: a preference file or folder in any layout `jft.data.preference` reads
(prompt/chosen/rejected, TRL's conversations, ShareGPT). A batch of pairs is
`[B, 2, L]` (0 = chosen, 1 = rejected), run as one `[2B, L]` forward pass.

The reference log-probabilities come from the base view of the policy's own
tree (`Forward.reference`: the method's leaves switched off), computed in the
same step under `stop_gradient`; no second model exists. The losses are
`jft.objectives.losses`'s, checked against TRL.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.objectives import losses
from jft.models import head
from jft.data import preference as pd
from jft.core.fields import Choice, Float
from jft.objectives import api


def pairs_flat(batch):
  """[B, 2, L] -> [2B, L] (rows 2i, 2i + 1 are pair i's chosen and rejected)."""
  return [batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "attention_mask", "loss_mask")]


def split_pairs(x):
  x = x.reshape(-1, 2)
  return x[:, 0], x[:, 1]


def policy_logps(forward: api.Forward, ids, mask, completion):
  """[B, T] completion-token log-probs under the policy (dropout as in training).

  With a plain, frozen output projection the head runs fused with the
  log-softmax and only at completion tokens (`jft.models.head.head_logps`): no
  `[B, T, vocab]` logits, no head matmul over the prompts.
  """
  return head.model_logps(forward.apply, forward.params, ids, mask, completion, forward.trained)


def reference_logps(forward: api.Forward, ids, mask, completion):
  """[B, T] completion-token log-probs under the reference: the base view, deterministic, no gradient."""
  return jax.lax.stop_gradient(head.model_logps(forward.apply_reference, forward.reference, ids, mask, completion))


@dataclasses.dataclass(frozen=True)
class PairObjective(api.Objective):
  """Preference pairs from `data.path`: rows, batches, evaluation = the loss and its metrics."""

  def examples(self, d, tokenizer, split, limit):
    rows = pd.split_of(d.path, split, train_split=d.train_split, holdout=d.holdout, seed=0)
    return pd.preference_examples(rows[:limit], tokenizer, chat=d.chat, template=d.template, system=d.system,
                                  where=f"{d.path} ({split})")

  def rows(self, examples, tokenizer, d):
    rows, _ = pd.tokenize_pairs(examples, tokenizer, d.max_length, d.chat, d.truncation)
    return rows

  def row_length(self, row):
    return pd.pair_length(row)

  def collate(self, rows, length, pad_id):
    return pd.pad_pairs(rows, length, pad_id)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    rows = self.rows(examples, tokenizer, config.data)
    return api.mean_loss(self, forward, rows, config.eval.batch_size, tokenizer.pad_token_id or 0)


@dataclasses.dataclass(frozen=True)
class DPO(PairObjective):
  """Direct preference optimisation against the base view; `loss_type` sigmoid | ipo | hinge | robust."""
  name: ClassVar[str] = "dpo"
  uses_reference: ClassVar[bool] = True
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  hparam_rules: ClassVar[dict] = {"beta": Float(0, lo_open=True), "loss_type": Choice(lambda: losses.PREFERENCE_LOSSES),
                                  "label_smoothing": Float(0, 0.5, hi_open=True)}

  def loss(self, forward, batch):
    ids, mask, completion = pairs_flat(batch)
    logps = policy_logps(forward, ids, mask, completion).sum(-1)
    ref = reference_logps(forward, ids, mask, completion).sum(-1)
    lengths = completion.sum(-1)
    (chosen, rejected), (ref_chosen, ref_rejected), (n_chosen, n_rejected) = map(
        split_pairs, (logps, ref, lengths))
    return losses.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                 loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                 chosen_lengths=n_chosen, rejected_lengths=n_rejected)


@dataclasses.dataclass(frozen=True)
class ORPO(PairObjective):
  """Odds-ratio preference optimisation: SFT on the chosen completion plus a log-odds term; no reference."""
  name: ClassVar[str] = "orpo"
  beta: float = 0.1
  hparam_rules: ClassVar[dict] = {"beta": Float(0, lo_open=True)}

  def loss(self, forward, batch):
    ids, mask, completion = pairs_flat(batch)
    # One pass: TRL's NLL term needs the chosen rows' prompt and completion, the odds ratio both completions.
    everything = (jnp.asarray(mask) != 0).at[:, 0].set(False)
    logps = policy_logps(forward, ids, mask, everything.at[1::2].set(completion[1::2] != 0))
    lengths = completion.sum(-1)
    (chosen, rejected), (n_chosen, n_rejected) = map(
        split_pairs, (jnp.where(completion != 0, logps, 0.0).sum(-1), lengths))
    nll = -logps[0::2].sum() / jnp.maximum(everything[0::2].sum(), 1)
    return losses.orpo_loss(chosen, rejected, n_chosen, n_rejected, nll, beta=self.beta)


@dataclasses.dataclass(frozen=True)
class KTO(api.Objective):
  """Kahneman-Tversky optimisation on unpaired feedback (desirable or not), with TRL's batch KL estimate.

  A preference file gives each pair as two rows (chosen desirable, rejected
  not); TRL's prompt/completion/label layout is read as is.
  """
  name: ClassVar[str] = "kto"
  uses_reference: ClassVar[bool] = True
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  hparam_rules: ClassVar[dict] = {"beta": Float(0, lo_open=True), "desirable_weight": Float(0, lo_open=True),
                                  "undesirable_weight": Float(0, lo_open=True)}

  def examples(self, d, tokenizer, split, limit):
    rows = pd.split_of(d.path, split, train_split=d.train_split, holdout=d.holdout, seed=0)
    return pd.unpaired_examples(rows[:limit], tokenizer, chat=d.chat, template=d.template, system=d.system,
                                where=f"{d.path} ({split})")

  def rows(self, examples, tokenizer, d):
    rows, _ = pd.tokenize_unpaired(examples, tokenizer, d.max_length, d.chat, d.truncation)
    return rows

  def row_length(self, row):
    return pd.unpaired_length(row)

  def collate(self, rows, length, pad_id):
    return pd.pad_unpaired(rows, length, pad_id)

  def loss(self, forward, batch):
    seqs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    kl_seqs = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"])
    logps = policy_logps(forward, *seqs).sum(-1)
    kl_logps = jax.lax.stop_gradient(policy_logps(forward, *kl_seqs).sum(-1))  # TRL: under no_grad
    ref, ref_kl = reference_logps(forward, *seqs).sum(-1), reference_logps(forward, *kl_seqs).sum(-1)
    return losses.kto_loss(logps, ref, batch["desirable"], kl_logps, ref_kl, beta=self.beta,
                          desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    rows = self.rows(examples, tokenizer, config.data)
    return api.mean_loss(self, forward, rows, max(config.eval.batch_size, 2), tokenizer.pad_token_id or 0)
