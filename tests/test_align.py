"""jft.objectives.losses against TRL 1.16, the reference it follows.

DPO (sigmoid, robust, ipo, hinge) and KTO run through TRL's own trainers
(`DPOTrainer.compute_loss`, `KTOTrainer.compute_loss`) on a LoRA of a tiny
random Llama, the same adapter imported into jft: losses, logged metrics and
the LoRA gradients must agree. The ORPO, reward and GRPO losses call TRL's
loss methods on fixed arrays, through an instance built without the
trainer's setup (`_stand_in`); GRPO's advantages and loss are also checked
against numbers worked out by hand.
"""

from __future__ import annotations

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.objectives import losses
from jft.core import rules
from jft.peft import api
from jft.peft.peft_format import import_peft

BETA = 0.5  # the random tiny model moves little under LoRA on q/v: a larger beta makes the margins clear
B_SCALE = 1.0  # LoRA B ~ N(0, 1): nonzero, so the policy differs from the reference (the base)
WIDTH = 24  # jft's batches are right-padded to one width, so each jitted forward compiles once
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
PAIRS = [  # prompts and completions of different lengths; TRL appends EOS to each completion
    ("The capital of France is", " Paris.", " a large city in Europe, I think."),
    ("2 + 2 =", " 4", " 5, or maybe 22"),
    ("Name a colour that rhymes with bed:", " red", " blue"),
]
# case -> (jft loss_type, label_smoothing). TRL 1.16's `sigmoid` ignores label_smoothing, so the
# conservative-DPO case is checked against the cDPO formula on TRL's own log-probs (see the test).
DPO_CASES = {"sigmoid": ("sigmoid", 0.0), "sigmoid_cdpo": ("sigmoid", 0.1), "robust": ("robust", 0.1),
             "ipo": ("ipo", 0.0), "hinge": ("hinge", 0.0)}


def _torch():
  import torch

  torch.set_num_threads(2)
  return torch


def _trl_trainer(kind, folder, tokenizer, dataset, outdir, b_seed=5, **config):
  """TRL's `kind` trainer (DPO, KTO) on a fresh LoRA of `folder`, its B set to nonzero values drawn from `b_seed`.

  TRL seeds before adding the adapter, so A is the same in every trainer too.
  A new adapter (not a loaded PeftModel) makes TRL's reference the base model,
  with the adapter disabled. bf16=False: TRL's configs default to bf16
  autocast (its reference log-probs are computed under it), jft here to float32.
  """
  import peft
  import transformers
  import trl

  torch = _torch()
  args = getattr(trl, f"{kind}Config")(output_dir=outdir, report_to=[], use_cpu=True, seed=0, bf16=False,
                                               **config)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder)
  trainer = getattr(trl, f"{kind}Trainer")(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           peft_config=peft.LoraConfig(**LORA))
  g = torch.Generator().manual_seed(b_seed)
  with torch.no_grad():
    for name, p in trainer.model.named_parameters():
      if "lora_B" in name:
        p.copy_(B_SCALE * torch.randn(p.shape, generator=g))
  return trainer


def _lora_state(trainer):
  return {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _pad(batch, keys):
  """numpy arrays of `keys`, right-padded with zeros to WIDTH (no attention, no completion: logps unchanged)."""
  out = []
  for k in keys:
    a = batch[k].numpy()
    assert a.shape[1] <= WIDTH, "raise WIDTH"
    out.append(jnp.asarray(np.pad(a, [(0, 0), (0, WIDTH - a.shape[1])])))
  return out


def _torch_lora_grads(trainer):
  """{(layer, proj, 'a'|'b'): grad in jft's layout [in, r] / [r, out]} from torch's lora_A/lora_B grads."""
  out = {}
  for n, p in trainer.model.named_parameters():
    if "lora_" in n:
      parts = n.split(".")
      layer, proj = int(parts[parts.index("layers") + 1]), parts[parts.index("self_attn") + 1]
      out[(layer, proj, "a" if "lora_A" in n else "b")] = p.grad.numpy().T  # torch stores [r, in] / [out, r]
  return out


def _jft_lora_grads(grads):
  """The same keys as `_torch_lora_grads` from jft's stacked [L, ...] LoRA gradient leaves."""
  flat = rules.flatten(grads)
  out = {}
  for proj in ("q_proj", "v_proj"):
    for leaf in ("a", "b"):
      g = np.asarray(flat[f"layers/self_attn/{proj}/lora/{leaf}"])
      out.update({(layer, proj, leaf): g[layer] for layer in range(g.shape[0])})
  return out


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
  """TRL's DPO trainer (sigmoid) on the LoRA, its batch, and the same adapter in jft with jitted log-prob functions."""
  import datasets

  tokenizer = jft.load_tokenizer(tiny_model)
  dataset = datasets.Dataset.from_list([dict(prompt=p, chosen=c, rejected=r) for p, c, r in PAIRS])
  trainer = _trl_trainer("DPO", tiny_model, tokenizer, dataset, str(tmp_path_factory.mktemp("dpo")),
                         beta=BETA, loss_type="sigmoid")
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  model, params = jft.load_pretrained(tiny_model)

  def imported(trainer):
    """The trainer's adapter, saved by peft and imported into jft: (method, LoRA params)."""
    folder = str(tmp_path_factory.mktemp("adapter"))
    trainer.model.save_pretrained(folder)
    return import_peft(folder, params, model.config)

  method, adapted = imported(trainer)
  trainable, frozen = api.split(method, adapted)
  base = rules.unflatten({p: v for p, v in rules.flatten(frozen).items() if method.own(p) is None})
  assert set(rules.flatten(base)) == set(rules.flatten(params))  # the frozen tree without LoRA is the base
  policy_model = method.configure(model)
  policy_params = lambda t: method.materialize(api.combine(t, frozen))
  return types.SimpleNamespace(
      tokenizer=tokenizer, dataset=dataset, trainer=trainer, batch=batch, state=_lora_state(trainer),
      trainable=trainable,
      trainable_of=lambda trainer: api.split(method, imported(trainer)[1])[0],
      policy_token_logps=jax.jit(lambda t, *b: losses.token_logps(policy_model, policy_params(t), *b)),
      policy_logps=jax.jit(lambda t, *b: losses.sequence_logps(policy_model, policy_params(t), *b)),
      base_logps=jax.jit(lambda *b: losses.sequence_logps(model, base, *b)))


@pytest.fixture(scope="module")
def jft_dpo(lora):
  """case -> (loss, metrics, LoRA gradients) from jft.

  One jitted jax.value_and_grad through the LoRA model and every case's
  loss, of their sum weighted by a one-hot case selector: one compile.
  """
  ids, attn, cm = _pad(lora.batch, ("input_ids", "attention_mask", "completion_mask"))
  n = ids.shape[0] // 2
  lengths = cm.sum(axis=1)
  ref = lora.base_logps(ids, attn, cm)
  policy_logps = lora.policy_logps

  def selected_loss(trainable, select):
    logps = policy_logps(trainable, ids, attn, cm)
    out = [losses.preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=BETA, loss_type=t, label_smoothing=e,
                                 chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
           for t, e in DPO_CASES.values()]
    values = jnp.stack([loss for loss, _ in out])
    return values @ select, (values, [m for _, m in out])

  step = jax.jit(jax.value_and_grad(selected_loss, has_aux=True))
  results = {}
  for i, case in enumerate(DPO_CASES):
    (_, (values, metrics)), grads = step(lora.trainable, jnp.eye(len(DPO_CASES))[i])
    results[case] = (float(values[i]), {k: float(v) for k, v in metrics[i].items()}, _jft_lora_grads(grads))
  return results


def test_token_logps_match_trl_per_token(lora):
  """Position t holds log p(token t | < t) on completion tokens, 0 elsewhere: TRL's log_probs shifted right by one."""
  torch = _torch()
  b = lora.batch
  labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
  with torch.no_grad():
    theirs = lora.trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                                fused_lm_head=True, use_cache=False).log_probs.numpy()
  ours = np.asarray(lora.policy_token_logps(lora.trainable, *_pad(b, ("input_ids", "attention_mask",
                                                                      "completion_mask"))))
  t = theirs.shape[1] + 1
  completion = b["completion_mask"].numpy() != 0
  assert np.all(ours[:, 0] == 0) and np.all(ours[:, :t][~completion] == 0) and np.all(ours[:, t:] == 0)
  assert np.all(ours[:, :t][completion] < 0)
  np.testing.assert_allclose(ours[:, 1:t], theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_losses_and_lora_gradients_match_trl(case, lora, jft_dpo, tiny_model, tmp_path):
  """TRL's DPOTrainer.compute_loss on the peft model (reference: adapter disabled) vs jft on the imported LoRA."""
  torch = _torch()
  loss_type, smoothing = DPO_CASES[case]
  trainer = _trl_trainer("DPO", tiny_model, lora.tokenizer, lora.dataset, str(tmp_path), beta=BETA,
                         loss_type=loss_type, label_smoothing=smoothing)
  state = _lora_state(trainer)
  assert all(np.array_equal(state[k], v) for k, v in lora.state.items())  # the adapter jft imported
  b = lora.batch
  if case == "sigmoid_cdpo":
    with torch.no_grad():  # logs the metrics; TRL 1.16's sigmoid loss itself ignores label_smoothing
      trainer.compute_loss(trainer.model, dict(b))
    # cDPO on TRL's per-sequence log-probs, computed as its _compute_loss and compute_ref_log_probs do
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    logps = trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                          fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, dict(b))
    chosen, rejected = logps.chunk(2)
    delta = BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
    logsig = torch.nn.functional.logsigmoid
    loss = (-(1 - smoothing) * logsig(delta) - smoothing * logsig(-delta)).mean()
  else:
    loss = trainer.compute_loss(trainer.model, dict(b))
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

  ours, our_metrics, our_grads = jft_dpo[case]
  assert abs(ours - loss.item()) <= 1e-5, (ours, loss.item())
  if case == "sigmoid":
    assert abs(ours - math.log(2)) > 0.01  # the adapter really moves the policy away from the reference
  assert abs(metrics["rewards/margins"]) > 0.05
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(our_metrics[key] - metrics[key]) <= 1e-5, key
  assert our_metrics["rewards/accuracies"] == metrics["rewards/accuracies"]
  for key in ("logps/chosen", "logps/rejected"):
    assert abs(our_metrics[key] - metrics[key]) <= 1e-4, key
  theirs = _torch_lora_grads(trainer)
  assert set(theirs) == set(our_grads)
  assert max(np.abs(g).max() for g in theirs.values()) > 1e-3  # a real gradient, not zeros on both sides
  for key, g in theirs.items():
    np.testing.assert_allclose(our_grads[key], g, atol=1e-4, rtol=1e-4, err_msg=str(key))


def test_kto_matches_trl(lora, tiny_model, tmp_path):
  """TRL's KTOTrainer (KL from completions rotated by one within the batch) vs jft on the same LoRA and batch."""
  import datasets

  torch = _torch()
  rows = [dict(prompt=p, completion=c, label=good) for p, *cs in PAIRS for c, good in zip(cs, (True, False))]
  dataset = datasets.Dataset.from_list(rows)
  # B drawn from seed 10: there the batch KL estimate is positive (0.076; it is clamped to 0 for most seeds)
  trainer = _trl_trainer("KTO", tiny_model, lora.tokenizer, dataset, str(tmp_path), b_seed=10, beta=BETA,
                         per_device_train_batch_size=len(rows), desirable_weight=1.0, undesirable_weight=1.5)
  trainable = lora.trainable_of(trainer)
  b = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, dict(b)).item()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

  main = _pad(b, ("input_ids", "attention_mask", "completion_mask"))
  kl = _pad(b, ("KL_input_ids", "KL_attention_mask", "KL_completion_mask"))
  ours, our_metrics = losses.kto_loss(
      lora.policy_logps(trainable, *main), lora.base_logps(*main), jnp.asarray(b["label"].numpy()),
      lora.policy_logps(trainable, *kl), lora.base_logps(*kl), beta=BETA, desirable_weight=1.0,
      undesirable_weight=1.5)
  assert metrics["kl"] > 0  # the KL term is exercised, not clamped away
  assert abs(float(ours) - loss) <= 1e-5, (float(ours), loss)
  for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(float(our_metrics[key]) - metrics[key]) <= 1e-5, key
  for key in ("logps/chosen", "logps/rejected"):
    assert abs(float(our_metrics[key]) - metrics[key]) <= 1e-4, key


# -- TRL's loss methods on fixed arrays ------------------------------------------------


class _Accelerator:
  """What TRL's loss code asks of `accelerate`, in one process."""
  num_processes = 1
  sync_gradients = True

  def __init__(self):
    self.device = _torch().device("cpu")

  def gather(self, x):
    return x

  gather_for_metrics = gather

  def reduce(self, x, reduction="sum"):
    return x


def _stand_in(cls, **state):
  """An instance of TRL trainer `cls` without its __init__: TRL's own loss methods, reading only `state`."""
  obj = object.__new__(cls)
  obj.__dict__.update(accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
                      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
                      **state)
  return obj


def _grad_close(ours, theirs, atol=1e-6):
  np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), atol=atol, rtol=1e-5)


def test_orpo_matches_trl():
  """`ORPOTrainer.get_batch_loss_metrics` (trl.experimental) with its forward replaced by fixed log-probs."""
  from trl.experimental.orpo import ORPOTrainer

  torch = _torch()
  rng = np.random.RandomState(0)
  lengths_c, lengths_r = np.array([3, 7, 1, 12], np.float32), np.array([5, 2, 4, 9], np.float32)
  sums_c = (-rng.uniform(0.05, 3.0, 4) * lengths_c).astype(np.float32)  # per-token averages either side of -log 2
  sums_r = (-rng.uniform(0.05, 3.0, 4) * lengths_r).astype(np.float32)
  nll = np.float32(2.5)
  tc, tr, tn = (torch.tensor(x, requires_grad=True) for x in (sums_c, sums_r, nll))

  def forward(model, batch):  # what ORPO's concatenated_forward returns: average completion log-probs
    zeros = torch.zeros(4, 3, 5)
    return tc / torch.tensor(lengths_c), tr / torch.tensor(lengths_r), zeros, zeros, tn

  trainer = _stand_in(ORPOTrainer, beta=0.25, concatenated_forward=forward, aux_loss_enabled=False)
  loss, metrics = trainer.get_batch_loss_metrics(None, {})
  loss.backward()
  fn = lambda c, r, n: losses.orpo_loss(c, r, lengths_c, lengths_r, n, beta=0.25)
  (ours, our_metrics), grads = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(sums_c, sums_r, nll)
  assert abs(float(ours) - loss.item()) <= 1e-6
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
    assert abs(float(our_metrics[key]) - metrics[key]) <= 1e-6, key
  for g, t in zip(grads, (tc, tr, tn)):
    _grad_close(g, t)


@pytest.mark.parametrize("margin,center", [(None, None), ([0.5, 0.0, -0.25, 1.0, 0.1], 0.01)])
def test_reward_loss_matches_trl(margin, center):
  """`RewardTrainer.compute_loss` on fixed rewards (its model replaced by one returning them: jft has no
  sequence-classification head, so the check is on the loss and metrics of given rewards)."""
  from trl import RewardTrainer

  torch = _torch()
  chosen = np.array([1.0, -0.5, 0.25, 2.0, -1.0], np.float32)
  rejected = np.array([0.5, 0.5, 0.25, -1.0, -0.75], np.float32)
  rewards = torch.tensor(np.concatenate([chosen, rejected])[:, None], requires_grad=True)
  model = lambda **inputs: types.SimpleNamespace(logits=rewards)
  trainer = _stand_in(RewardTrainer, args=types.SimpleNamespace(center_rewards_coefficient=center),
                      _total_train_tokens=0, _tp_size=1)
  inputs = {"attention_mask": torch.ones(10, 4, dtype=torch.long)}
  if margin is not None:
    inputs["margin"] = torch.tensor(margin)
  loss = trainer.compute_loss(model, inputs)
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  fn = lambda c, r: losses.reward_loss(c, r, margin=None if margin is None else jnp.asarray(margin),
                                      center_rewards_coefficient=center)
  (ours, our_metrics), (gc, gr) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(chosen, rejected)
  assert abs(float(ours) - loss.item()) <= 1e-6
  for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
    assert abs(float(our_metrics[key]) - metrics[key]) <= 1e-6, key
  np.testing.assert_allclose(np.concatenate([gc, gr]), rewards.grad.numpy()[:, 0], atol=1e-6)


def test_group_advantages_by_hand():
  """Two groups of three; TRL scales by the unbiased (Bessel) std + 1e-4."""
  from trl.trainer.utils import nanstd

  torch = _torch()
  rewards = np.array([1.0, 0.0, 0.5, 2.0, -1.0, 0.0], np.float32)
  # group [1, 0, 0.5]: mean 0.5, std 0.5; group [2, -1, 0]: mean 1/3, std sqrt(7/3) = 1.5275252
  s1, s2 = 0.5 + 1e-4, math.sqrt(7 / 3) + 1e-4
  by_hand = [0.5 / s1, -0.5 / s1, 0.0, (5 / 3) / s2, (-4 / 3) / s2, (-1 / 3) / s2]  # 0.9998, ..., 1.09104, ...
  np.testing.assert_allclose(losses.group_advantages(rewards, 3), by_hand, rtol=1e-6)
  grouped = torch.tensor(rewards).view(-1, 3)  # TRL's own formula (GRPOTrainer._generate_and_score_completions)
  trl = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1)[:, None] + 1e-4)
  np.testing.assert_allclose(losses.group_advantages(rewards, 3), trl.view(-1).numpy(), rtol=1e-6)
  np.testing.assert_allclose(losses.group_advantages(rewards, 3, scale=False), [0.5, -0.5, 0, 5 / 3, -4 / 3, -1 / 3],
                             rtol=1e-6)
  batch = (rewards - np.repeat(rewards.reshape(2, 3).mean(1), 3)) / (rewards.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(losses.group_advantages(rewards, 3, scale="batch"), batch, rtol=1e-6)


def test_grpo_loss_by_hand():
  """Two completions, ratios picked so each clip case appears once, one token with KL k3(log 2)."""
  logps = np.array([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], np.float32)
  ratios = np.array([[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]], np.float32)
  old = logps - np.log(ratios)
  ref = logps.copy()
  ref[0, 1] += math.log(2.0)  # k3 = 2 - log 2 - 1 = 0.3068528
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  adv = np.array([1.0, -0.5], np.float32)
  # per token -min(q A, clip(q, 0.8, 1.2) A): [-1.2, -0.9, -1.0] and [0.4, 0.55]; sums -3.1 and 0.95 over 3 + 2 tokens
  k3 = 2 - math.log(2) - 1
  expected = {"grpo": (-3.1 / 3 + 0.95 / 2) / 2 + 0.04 * k3 / 3 / 2,  # -0.2771210
              "bnpo": (-3.1 + 0.95 + 0.04 * k3) / 5,  # -0.4275451
              "dr_grpo": (-3.1 + 0.95 + 0.04 * k3) / (2 * 4)}  # -0.2672157
  for loss_type, value in expected.items():
    loss, metrics = losses.grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, beta=0.04, loss_type=loss_type,
                                    max_completion_length=4)
    assert abs(float(loss) - value) <= 1e-6, loss_type
  assert abs(float(metrics["kl"]) - k3 / 5) <= 1e-6
  assert float(metrics["clip_ratio"]) == pytest.approx(0.4)  # q=1.5 with A>0 and q=0.5 with A<0, of 5 tokens
  assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(0.2)
  assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(0.2)
  loss, metrics = losses.grpo_loss(logps, old, None, adv, mask, beta=0.0)
  assert abs(float(loss) - (-3.1 / 3 + 0.95 / 2) / 2) <= 1e-6 and "kl" not in metrics


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSSES)
def test_grpo_loss_matches_trl(loss_type):
  """`GRPOTrainer._compute_loss` with its forward replaced by fixed per-token log-probs: loss, metrics, gradient."""
  from trl import GRPOTrainer

  torch = _torch()
  rng = np.random.RandomState(1)
  b, t = 6, 7
  logps = -rng.uniform(0.1, 3.0, (b, t)).astype(np.float32)
  old = (logps + rng.normal(0, 0.3, (b, t))).astype(np.float32)  # ratios well outside [0.8, 1.2] for some tokens
  ref = (logps + rng.normal(0, 0.5, (b, t))).astype(np.float32)
  mask = (np.arange(t)[None] < np.array([7, 5, 3, 6, 1, 4])[:, None]).astype(np.float32)
  adv = np.asarray(losses.group_advantages(rng.normal(size=b).astype(np.float32), 3))
  tl = torch.tensor(logps, requires_grad=True)
  trainer = _stand_in(
      GRPOTrainer, beta=0.04, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=10,
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
      use_vllm=False, current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
      aux_loss_enabled=False, args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
      _get_per_token_logps_and_entropies=lambda *a, **k: (tl, torch.zeros_like(tl), None))
  inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": torch.tensor(mask),
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref)}
  loss = trainer._compute_loss(None, inputs)
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  fn = lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=0.04, loss_type=loss_type,
                                  max_completion_length=10)
  (ours, our_metrics), grad = jax.value_and_grad(fn, has_aux=True)(logps)
  assert abs(float(ours) - loss.item()) <= 1e-6
  assert 0 < metrics["clip_ratio/region_mean"] < 1
  pairs = [("kl", "kl"), ("clip_ratio", "clip_ratio/region_mean")] + [(k, k) for k in ("clip_ratio/low_mean",
                                                                                          "clip_ratio/high_mean")]
  for ours_key, key in pairs:
    assert abs(float(our_metrics[ours_key]) - metrics[key]) <= 1e-6, key
  _grad_close(grad, tl)


def test_unknown_loss_types_name_the_choices():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge"):
    losses.preference_loss(x, x, x, x, loss_type="dpo")
  with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo"):
    losses.grpo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, x, jnp.ones((2, 3)), beta=0.0, loss_type="dapo")
  with pytest.raises(ValueError, match="chosen_lengths"):
    losses.preference_loss(x, x, x, x, loss_type="ipo")
  with pytest.raises(ValueError, match="ref_logps"):
    losses.grpo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, x, jnp.ones((2, 3)))
