"""Objectives: each one trains, the reference is the base view (no copy), GRPO learns, bad input is named.

The losses themselves are checked against TRL in test_align.py; here the
objectives run through the real step on a tiny byte-level Llama (`byte_model`).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jft
from jft import cli, config as cfg, objectives, peft
from jft.core import rules
from jft.run.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
LORA = dict(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def pairs_file(path, n=24):
  rows = [{"prompt": f"Question {i}: say yes?", "chosen": "yes " * (1 + i % 3), "rejected": "no"} for i in range(n)]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def write_reward(path, body):
  path.write_text(f"def reward(prompts, completions):\n  {body}\n")
  return f"{path}:reward"


def state(model, params, method, lr=1e-2):
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  tx = optax.adam(lr)
  return trainable, frozen, tx, tx.init(trainable)


@pytest.mark.parametrize("name,hparams", [("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "hinge"}),
                                          ("orpo", {}), ("kto", {}), ("reward", {}), ("lm", {})])
def test_each_objective_lowers_its_loss(byte_model, tmp_path, name, hparams):
  model, params = jft.load_pretrained(byte_model)
  tokenizer = jft.load_tokenizer(byte_model)
  c = cfg.build(f"{TINY}:objective={name}", [("model.name", byte_model), ("data.path", pairs_file(tmp_path / "p.jsonl"))]
                if name in ("dpo", "orpo", "kto") else [("model.name", byte_model)])
  objective = objectives.build(name, **{**c.objective.hparams.to_dict(), **hparams})
  method = objective.method(peft.LoRA(**LORA))
  examples = objective.examples(c.data, tokenizer, "train", 8)
  rows = objective.rows(examples, tokenizer, c.data)[:8]
  batch = objective.collate(rows, -(-max(map(objective.row_length, rows)) // 16) * 16, tokenizer.pad_token_id)
  trainable, frozen, tx, opt = state(model, params, method)
  step = make_train_step(model, method, tx, objective=objective)
  losses, margins = [], []
  for i in range(6):
    trainable, opt, metrics = step(trainable, opt, frozen, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
    margins.append(float(metrics.get("rewards/margins", 0.0)))
  assert np.isfinite(losses).all()
  if name == "kto":  # its loss also moves with the batch KL estimate, which grows from 0 as the policy moves
    assert margins[-1] > margins[0] + 0.01, margins
  else:
    assert losses[-1] < losses[0] - 0.01, losses
  if name == "dpo":  # LoRA starts as the base, so the policy starts equal to its reference
    start = {"sigmoid": np.log(2), "ipo": (1 / (2 * objective.beta)) ** 2, "hinge": 1.0}[objective.loss_type]
    assert losses[0] == pytest.approx(start, abs=1e-4)
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(metrics)


# orpo, kto and grpo (slow) make dpo's calls (grpo's per-token cotangents: test_loss's fused token logps test);
# each case equals the revision before the fused head too (checked by hand)
@pytest.mark.parametrize("name", ["dpo", pytest.param("orpo", marks=pytest.mark.slow),
                                  pytest.param("kto", marks=pytest.mark.slow),
                                  pytest.param("grpo", marks=pytest.mark.slow)])
def test_log_probs_through_the_fused_head_give_the_logits_paths_loss_and_gradients(byte_model, tmp_path, name,
                                                                                   monkeypatch):
  """Policy and reference log-probs come from `loss.head_logps` (no `[B, T, vocab]` logits; the head runs only
  in chunks holding completion tokens): the same loss and LoRA gradients as from the model's logits."""
  from jft.models import head as losses
  from jft.run.step import make_loss_fn

  model, params = jft.load_pretrained(byte_model)
  if name == "grpo":
    objective = objectives.build("grpo", group_size=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 258, (4, 40))
    ends = np.array([[40], [31], [26], [36]])
    positions = np.arange(40)[None]
    batch = {"input_ids": ids, "attention_mask": (positions < ends).astype(np.int32),
             "loss_mask": ((positions >= 12) & (positions < ends)).astype(np.int32),
             "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
  else:
    tokenizer = jft.load_tokenizer(byte_model)
    c = cfg.build(f"{TINY}:objective={name}", [("model.name", byte_model),
                                               ("data.path", pairs_file(tmp_path / "p.jsonl"))])
    objective = objectives.build(name, **c.objective.hparams.to_dict())
    rows = objective.rows(objective.examples(c.data, tokenizer, "train", 4), tokenizer, c.data)[:4]
    batch = objective.collate(rows, -(-max(map(objective.row_length, rows)) // 16) * 16, tokenizer.pad_token_id)
  method = objective.method(peft.LoRA(**LORA))
  trainable, frozen, _, _ = state(model, params, method)
  noise = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(trainable)))  # the policy leaves the reference
  trainable = jax.tree.unflatten(jax.tree.structure(trainable), [
      a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(jax.tree.leaves(trainable), noise)])
  monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 8 * 258 * 4)  # chunks of 2-4 positions
  fused_calls, logits_calls = [], []
  head_logps, logps_of_logits = losses.head_logps, losses.logps_of_logits
  monkeypatch.setattr(losses, "head_logps", lambda *a: fused_calls.append(1) or head_logps(*a))
  monkeypatch.setattr(losses, "logps_of_logits", lambda *a: logits_calls.append(1) or logps_of_logits(*a))
  loss_and_grads = lambda: jax.jit(jax.value_and_grad(make_loss_fn(model, method, objective), has_aux=True))(
      trainable, frozen, batch, jax.random.PRNGKey(0))  # a new function each time: traced with the patch in place
  (fused, _), fused_grads = loss_and_grads()
  # Each path is the one named: every log-prob of the first run through the fused head, of the second
  # through the logits (else the comparison below would compare a path with itself).
  assert len(fused_calls) >= (2 if objective.uses_reference else 1) and not logits_calls, (fused_calls, logits_calls)
  fused_calls.clear()
  monkeypatch.setattr(losses, "output_head", lambda params: None)  # every log-prob from the logits
  (plain, _), plain_grads = loss_and_grads()
  assert not fused_calls and len(logits_calls) >= (2 if objective.uses_reference else 1), (fused_calls, logits_calls)
  np.testing.assert_allclose(float(fused), float(plain), rtol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads)) > 1e-4
  for path, g in rules.flatten(plain_grads).items():
    np.testing.assert_allclose(rules.flatten(fused_grads)[path], g, atol=1e-5, err_msg=path)


def test_reference_is_the_base_view_of_the_same_tree_no_copy():
  """The reference params are the frozen tree's own arrays; the compiled DPO step takes nothing but the
  state and the batch as arguments, and its scratch memory is an SFT step's on the same sequences (a
  copy of the base would add its size)."""
  config = jft.ModelConfig(family="llama", vocab_size=258, hidden_size=256, intermediate_size=1024, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=64, max_position_embeddings=64)
  model = jft.Transformer(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  method = peft.LoRA(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
  trainable, frozen, tx, opt = state(model, params, method)
  view = objectives.base_view(method, frozen)
  flat_view, flat_frozen = rules.flatten(view), rules.flatten(frozen)
  assert set(flat_view) == set(rules.flatten(params)) and all(flat_view[p] is flat_frozen[p] for p in flat_view)
  b, t = 2, 16
  pairs = {"input_ids": jnp.ones((b, 2, t), jnp.int32), "attention_mask": jnp.ones((b, 2, t), jnp.int32),
           "loss_mask": jnp.ones((b, 2, t), jnp.int32).at[..., :4].set(0)}
  rows = {k: v.reshape(2 * b, t) for k, v in pairs.items()}  # the same sequences, as SFT rows
  rng = jax.random.PRNGKey(0)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))

  def memory(name, batch):
    step = make_train_step(model, method, tx, objective=objectives.build(name), donate=False)
    return step.lower(trainable, opt, frozen, batch, rng).compile().memory_analysis()

  dpo, sft = memory("dpo", pairs), memory("sft", rows)
  assert dpo.argument_size_in_bytes <= nbytes((trainable, opt, frozen, pairs, rng))  # (an unused rng is pruned)
  # Measured: 8,666,176 vs 8,666,048 bytes (the reference pass adds 128 bytes); the base is 8,922,112.
  assert dpo.temp_size_in_bytes - sft.temp_size_in_bytes < 0.1 * nbytes(params)


def test_full_fine_tuning_has_no_reference_to_offer(byte_model, tmp_path):
  c = cfg.build(f"{TINY}:objective=dpo,method=full", [("model.name", byte_model),
                                                      ("data.path", pairs_file(tmp_path / "p.jsonl"))])
  with pytest.raises(objectives.ObjectiveError, match="no reference is left"):
    from jft.run.train import train
    train(c, str(tmp_path / "run"))


def test_grpo_learns_to_emit_a_token(byte_model, tmp_path):
  """Reward = how often the completion contains "X": within 12 steps the policy writes it far more often."""
  model, params = jft.load_pretrained(byte_model)
  tokenizer = jft.load_tokenizer(byte_model)
  objective = objectives.build("grpo", reward=write_reward(tmp_path / "r.py", "return [c.count('X') for c in completions]"),
                               group_size=8, max_new_tokens=12, beta=0.04)
  method = peft.LoRA(**LORA)
  trainable, frozen, tx, opt = state(model, params, method, lr=3e-2)
  step = make_train_step(model, method, tx, objective=objective)
  policy = method.configure(model)
  prompts = {"prompts": [np.asarray(tokenizer(p)["input_ids"], np.int32)
                         for p in ("The film", "A movie", "This is", "It was")]}
  rewards, kls = [], []
  for i in range(12):
    forward = objectives.Forward(policy, policy, method.materialize(peft.combine(trainable, frozen)))
    batch, info = objective.rollout(prompts, forward, tokenizer, seed=i, where=f"step {i + 1}")
    assert batch["input_ids"].shape[0] == 32 and abs(batch["advantages"].reshape(4, 8).mean(1)).max() < 1e-5
    trainable, opt, metrics = step(trainable, opt, frozen, batch, jax.random.PRNGKey(i))
    rewards.append(info["reward"])
    kls.append(float(metrics["kl"]))
  assert np.mean(rewards[-3:]) > 1.0 > 0.3 > np.mean(rewards[:3]), rewards
  assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0.01  # starts at the reference, then moves away


@pytest.mark.parametrize("body,message", [("raise ValueError('scorer down')", "raised ValueError: scorer down"),
                                          ("return [float('nan')] * len(completions)", "returned nan"),
                                          ("return [1.0]", "returned 1 values for 8 completions")])
def test_a_broken_reward_names_the_step_and_loses_nothing(byte_model, tmp_path, capsys, body, message):
  spec = write_reward(tmp_path / "r.py", body)
  workdir = tmp_path / "run"
  code = cli.main(["train", "--config", f"{TINY}:objective=grpo,steps=2", f"--config.model.name={byte_model}",
                   f"--config.objective.hparams.reward={spec}", "--config.objective.hparams.samples_shown=0",
                   "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert code != 0 and "step 1" in err and message in err and "--resume" in err, err
  assert os.path.isdir(workdir / "checkpoints" / "0")


def test_preference_file_without_rejected_is_one_named_error(byte_model, tmp_path, capsys):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                  + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
  code = cli.main(["train", "--config", f"{TINY}:objective=dpo", f"--config.model.name={byte_model}",
                   f"--config.data.path={path}", "--config.data.holdout=0", "--workdir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert code == 2 and "bad.jsonl" in err and "row 1" in err and "rejected" in err, err
  assert len(err.strip().splitlines()) == 1


def test_init_from_an_sft_run_makes_its_merged_weights_the_base_and_the_reference(byte_model, tmp_path):
  """SFT, then DPO `--init-from` it: DPO's frozen base is the SFT run's merged model, and DPO starts at
  its reference (loss log 2); on-policy pairs sampled from the SFT policy feed the DPO run."""
  from jft import run

  sft, dpo = str(tmp_path / "sft"), str(tmp_path / "dpo")
  assert cli.main(["train", "--config", f"{TINY}:objective=lm,steps=2", f"--config.model.name={byte_model}",
                   "--config.train.eval_every=0", "--workdir", sft]) == 0
  reward = write_reward(tmp_path / "r.py", "return [len(c) + c.count('e') for c in completions]")
  pairs = str(tmp_path / "pairs.jsonl")
  assert cli.main(["pairs", sft, "--reward", reward, "--out", pairs, "--prompts", "12", "--samples", "4",
                   "--max-new-tokens", "6"]) == 0
  rows = [json.loads(line) for line in open(pairs)]
  assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
  assert cli.main(["train", "--config", f"{TINY}:objective=dpo,steps=2", f"--config.model.name={byte_model}",
                   f"--config.data.path={pairs}", "--config.data.holdout=0.25", "--init-from", sft,
                   "--workdir", dpo]) == 0
  first = next(json.loads(line) for line in open(os.path.join(dpo, "metrics.jsonl")) if '"train"' in line)
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-5)
  earlier = run.restore(sft, "best")
  merged = rules.flatten(earlier.method.merge(earlier.params())[0])
  later = run.restore(dpo, "latest")
  base = rules.flatten(objectives.base_view(later.method, later.init.frozen))
  assert set(base) == set(rules.flatten(jft.load_pretrained(byte_model)[1]))
  for path, value in base.items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(merged[path]), atol=1e-6, err_msg=path)


def test_on_policy_pairs_never_pick_an_empty_completion():
  """A completion that is only the stop token (empty text) is never chosen or rejected: preference data
  refuses it, and a whole `jft pairs` file would be rejected for one such row."""
  from jft.studies.pairs import pick_pair

  assert pick_pair([0.3, -2.0, 1.5, 0.1], ["a", "", "b", " c"]) == (2, 3)  # the empty one scored lowest
  assert pick_pair([5.0, 1.0, 0.0], ["", "x", "y"]) == (1, 2)  # ... or highest
  assert pick_pair([1.0, 2.0, 3.0], ["", "  ", "z"]) is None  # fewer than two with text
  assert pick_pair([1.0, 1.0, 0.0], ["a", "b", ""]) is None  # the rest tie


@pytest.mark.slow
def test_dpo_on_a_mesh_equals_one_device(shardable_model, tmp_path):
  """`jft train` with DPO (its log-probs through the fused head: rows sorted by loss position, chunks skipped) on
  a 2x2x2 mesh of simulated devices logs one device's head."""
  pairs = pairs_file(tmp_path / "p.jsonl", n=32)
  losses = {}
  for devices, mesh in ((1, []), (8, ["data=2", "fsdp=2", "tensor=2"])):
    workdir = str(tmp_path / f"run{devices}")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "jft.cli", "train", "--config", f"{TINY}:objective=dpo",
                          f"--config.model.name={shardable_model}", f"--config.data.path={pairs}",
                          "--config.train.steps=4", "--config.train.batch_size=8", "--config.eval.zero_shot=false",
                          "--config.train.eval_every=100", *[f"--config.train.mesh.{m}" for m in mesh],
                          "--workdir", workdir], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses[devices] = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
  assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0] - 0.01, losses  # the policy moves
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
