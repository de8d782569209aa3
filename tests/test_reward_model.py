"""The reward model against its references: PEFT's sequence-classification adapter (LoRA + `score` in
`modules_to_save`) imported into jft gives transformers' rewards; jft's reward objective gives TRL's
`RewardTrainer.compute_loss` and the same gradients; jft's export loads back into PEFT."""

import types

import jax
import numpy as np
import pytest

import jft
from jft import objectives, peft as jpeft
from jft.objectives.reward_model import _rewards
from jft.peft.peft_format import export_peft, import_peft

from conftest import build_hf_model

PAD = 0


@pytest.fixture(scope="module")
def seqcls(tmp_path_factory):
  """(base folder, peft adapter folder, torch peft model): a tiny Llama as a reward model with LoRA."""
  import peft
  import torch
  import transformers

  folder = str(tmp_path_factory.mktemp("base"))
  build_hf_model("llama", folder)
  torch.manual_seed(1)
  model = transformers.LlamaForSequenceClassification.from_pretrained(folder, num_labels=1, pad_token_id=PAD)
  model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name or "score" in name:
        p.copy_(0.3 * torch.randn_like(p))
  adapter = str(tmp_path_factory.mktemp("adapter"))
  model.save_pretrained(adapter)
  return folder, adapter, model.eval()


def pairs_batch(b=3, t=10, seed=0):
  """[B, 2, T] right-padded rows of real tokens (never PAD) of different lengths, and margins."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, 101, (b, 2, t)).astype(np.int32)
  mask = np.ones((b, 2, t), np.int32)
  for i, n in enumerate(rng.randint(3, t, (b, 2)).ravel()):
    mask.reshape(-1, t)[i, n:] = 0
  ids = np.where(mask == 1, ids, PAD)
  return {"input_ids": ids, "attention_mask": mask, "margin": rng.uniform(0, 1, b).astype(np.float32)}


def test_imported_reward_model_gives_transformers_rewards_and_exports_back(seqcls, tmp_path):
  import peft
  import torch
  import transformers

  folder, adapter, torch_model = seqcls
  model, params = jft.load_pretrained(folder)
  method, adapted = import_peft(adapter, params, model.config)
  assert isinstance(method, jpeft.Compose) and "score" in adapted
  batch = pairs_batch()
  ids, mask = batch["input_ids"].reshape(6, -1), batch["attention_mask"].reshape(6, -1)
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
  got = np.asarray(_rewards(method.configure(model), method.materialize(adapted), ids, mask))
  np.testing.assert_allclose(got, want, atol=1e-5)

  out = export_peft(method, adapted, model.config, str(tmp_path / "exported"))
  base = transformers.LlamaForSequenceClassification.from_pretrained(folder, num_labels=1, pad_token_id=PAD)
  reloaded = peft.PeftModel.from_pretrained(base, out).eval()
  with torch.no_grad():
    again = reloaded(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
  np.testing.assert_allclose(again, want, atol=1e-5)


def test_reward_objective_matches_trl_loss_and_gradients(seqcls):
  import torch
  from trl import RewardTrainer

  folder, adapter, torch_model = seqcls
  model, params = jft.load_pretrained(folder)
  method, adapted = import_peft(adapter, params, model.config)
  batch = pairs_batch(seed=1)
  b, _, t = batch["input_ids"].shape
  # TRL's layout: all chosen rows, then all rejected rows.
  halves = lambda x: np.concatenate([x[:, 0], x[:, 1]])
  inputs = {"input_ids": torch.tensor(halves(batch["input_ids"]), dtype=torch.long),
            "attention_mask": torch.tensor(halves(batch["attention_mask"]), dtype=torch.long),
            "margin": torch.tensor(batch["margin"])}
  trainer = object.__new__(RewardTrainer)
  metrics = {"eval": {k: [] for k in ("min_reward", "mean_reward", "max_reward", "accuracy", "margin")}}
  trainer.__dict__.update(  # TRL's own compute_loss, on a trainer without its setup (evaluation mode)
      model=types.SimpleNamespace(training=False), _total_train_tokens=0, _tp_size=1, _metrics=metrics,
      args=types.SimpleNamespace(center_rewards_coefficient=None),
      accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
  torch_model.zero_grad()
  loss = trainer.compute_loss(torch_model, inputs)
  loss.backward()

  objective = objectives.build("reward", margin_scale=1.0)
  trainable, frozen = jpeft.split(method, adapted)
  policy = method.configure(model)

  def loss_fn(trainable):
    forward = objectives.Forward(policy, policy, method.materialize(jpeft.combine(trainable, frozen)))
    return objective.loss(forward, batch)

  (ours, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  assert abs(float(ours) - loss.item()) < 1e-5 and abs(loss.item() - np.log(2)) > 0.01
  assert float(metrics["accuracy"]) == trainer._metrics["eval"]["accuracy"][-1]
  torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters() if p.grad is not None}
  score = next(g for n, g in torch_grads.items() if "score" in n)
  np.testing.assert_allclose(np.asarray(grads["score"]["kernel"]).T, score, atol=1e-4)
  q_b = next(g for n, g in torch_grads.items() if "layers.0.self_attn.q_proj.lora_B" in n)
  ours_b = np.asarray(grads["layers"]["self_attn"]["q_proj"]["lora"]["b"])
  ours_b = ours_b[0] if ours_b.ndim == 3 else ours_b  # layer-stacked
  np.testing.assert_allclose(ours_b.T, q_b, atol=1e-4)
