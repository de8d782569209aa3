"""What every fine-tuning method must satisfy, as reusable checks (a new method's test file calls them).

* `check_trains_only_its_leaves`: gradients exist for exactly the trainable leaves, frozen ones are not
  differentiated, optimizer state only for trainable leaves, a few steps lower the loss;
* `check_merge`: the merged base-shaped tree gives the unmerged output, and unmerge restores the tree;
* `check_peft_both_ways`: the `peft` library loads jft's adapter folder and jft loads peft's, with equal
  logits (<= 1e-4) on the same weights;
* `check_registered`: the method is in the registry and has a row in configs/sentiment.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import padded_batch, torch_logits

import jft
from jft import config as cfg
from jft import peft
from jft.core import rules
from jft.peft.peft_format import export_peft, import_peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 101  # the tiny Llama's vocabulary


def loss_fn(model, method, ids, mask):
  def loss(trainable, frozen):
    params = method.materialize(peft.combine(trainable, frozen))
    logits = model.apply({"params": params}, ids, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
  return loss


def perturb(method, params, seed=1, scale=0.1):
  """Nonzero values for every trainable leaf (so B != 0, IA3 != 1, ...)."""
  flat = rules.flatten(params)
  key = jax.random.PRNGKey(seed)
  for i, p in enumerate(sorted(flat)):
    if method.is_trainable(p):
      flat[p] = flat[p] + scale * jax.random.normal(jax.random.fold_in(key, i), flat[p].shape)
  return rules.unflatten(flat)


def train_a_few_steps(loss, trainable, frozen, tx, state, steps=8):
  """-> (trainable, state, first loss) after `steps` jitted steps of `tx` on the trainable part."""
  @jax.jit
  def step(trainable, state):
    value, g = jax.value_and_grad(loss)(trainable, frozen)
    updates, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, updates), state, value

  first = None
  for _ in range(steps):
    trainable, state, value = step(trainable, state)
    first = value if first is None else first
  return trainable, state, first


def peft_logits(peft_model, ids, mask, virtual):
  import torch

  if not virtual:
    return torch_logits(peft_model, ids, mask)
  with torch.no_grad():  # peft ignores position_ids for prompt learning; rows here have no left padding
    out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  return out[:, -ids.shape[1]:]


def compare(a, b, mask):
  real = mask.astype(bool)
  return np.abs(a - b)[real].max()


def tiny_llama(hf_models):
  model, params = jft.load_pretrained(hf_models("llama")[0])
  ids, mask = padded_batch(V)
  return model, params, jnp.asarray(ids), jnp.asarray(mask)


def check_trains_only_its_leaves(method, base, new_leaves: dict):
  """`new_leaves`: path -> shape of every leaf `init` adds."""
  model, params, ids, mask = base
  adapted = method.init(jax.random.PRNGKey(0), params)
  shapes = {p: tuple(v.shape) for p, v in rules.flatten(adapted).items()}
  before = rules.flatten(params)
  assert {p: s for p, s in shapes.items() if p not in before} == new_leaves
  assert all(shapes[p] == tuple(v.shape) for p, v in before.items())
  out = method.configure(model).apply({"params": method.materialize(adapted)}, ids, attention_mask=mask)
  np.testing.assert_allclose(out, model.apply({"params": params}, ids, attention_mask=mask), atol=1e-5)

  trainable, frozen = peft.split(method, adapted)
  loss = loss_fn(method.configure(model), method, ids, mask)
  grads = jax.grad(loss)(trainable, frozen)
  assert set(rules.flatten(grads)) == set(rules.flatten(trainable))
  assert not any(p in before for p in rules.flatten(trainable))
  split_dots = str(jax.make_jaxpr(jax.grad(loss))(trainable, frozen)).count("dot_general")
  all_dots = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(trainable, frozen)).count("dot_general")
  assert split_dots < all_dots  # frozen leaves are not differentiated

  tx = optax.adam(1e-2)
  state = tx.init(trainable)
  assert set(rules.flatten(state[0].mu)) == set(rules.flatten(trainable))

  trainable, state, first = train_a_few_steps(loss, trainable, frozen, tx, state)
  assert float(loss(trainable, frozen)) < float(first)


def check_merge(method, base):
  model, params, ids, mask = base
  adapted = perturb(method, method.init(jax.random.PRNGKey(0), params), scale=0.3)
  out = method.configure(model).apply({"params": method.materialize(adapted)}, ids, attention_mask=mask)
  ref = model.apply({"params": params}, ids, attention_mask=mask)
  assert np.abs(np.asarray(out - ref)).max() > 1e-3  # the perturbed adapter changes the output
  merged, detached = method.merge(adapted)
  assert set(rules.flatten(merged)) == set(rules.flatten(params))  # a plain base-shaped tree
  np.testing.assert_allclose(model.apply({"params": merged}, ids, attention_mask=mask), out, atol=1e-5)
  restored = rules.flatten(method.unmerge(merged, detached))
  assert set(restored) == set(rules.flatten(adapted))
  for p, v in rules.flatten(adapted).items():
    np.testing.assert_allclose(restored[p], v, atol=1e-5, err_msg=p)


def check_peft_both_ways(method, config_cls: str, kwargs: dict, hf_models, tmp_path):
  import peft as hf_peft
  import torch
  import transformers

  folder, _ = hf_models("llama")
  model, params = jft.load_pretrained(folder)
  ids, mask = padded_batch(V)

  # jft -> peft
  adapted = perturb(method, method.init(jax.random.PRNGKey(0), params), scale=0.3)
  out = export_peft(method, adapted, model.config, str(tmp_path / "jft"), base_model=folder)
  peft_model = hf_peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out)
  ours = np.asarray(method.configure(model).apply({"params": method.materialize(adapted)}, jnp.asarray(ids),
                                                  attention_mask=jnp.asarray(mask)))
  base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert compare(ours, base, mask) > 1e-2
  assert compare(ours, peft_logits(peft_model.eval(), ids, mask, False), mask) <= 1e-4

  # peft -> jft
  torch.manual_seed(4)  # peft's own random init of the adapter, before the perturbation below
  peft_model = hf_peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                      getattr(hf_peft, config_cls)(task_type="CAUSAL_LM", **kwargs))
  torch.manual_seed(5)
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  peft_model.eval().save_pretrained(str(tmp_path / "peft"))
  imported, tree = import_peft(str(tmp_path / "peft"), params, model.config)
  assert type(imported) is type(method)
  ours = np.asarray(imported.configure(model).apply({"params": imported.materialize(tree)}, jnp.asarray(ids),
                                                    attention_mask=jnp.asarray(mask)))
  assert compare(ours, base, mask) > 1e-2
  assert compare(ours, peft_logits(peft_model, ids, mask, False), mask) <= 1e-4


def check_registered(method):
  assert peft.METHODS[method.name] is type(method)
  assert peft.build(method.name).hparams()["method"] == method.name
  c = cfg.build(f"{ROOT}/configs/sentiment.py:method={method.name},mode=local", [("method.hparams.rank", "4")])
  assert c.method.name == method.name and c.method.hparams.rank == 4
  assert peft.build(c.method.name, **c.method.hparams.to_dict()).rank == 4

