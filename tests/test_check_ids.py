"""`jft.models.check_ids`: token ids outside the vocabulary are named before the model sees them.

The model itself does not check (its embedding lookup reads NaN past the table), so the check is
what stands between a wrong tokenizer and silently NaN logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import data
from jft.core.errors import JftError
from jft.models import ModelConfig, Transformer, TokenIdError, check_ids
from jft.models.generate import GenerationError, Sampling, generate

CONFIG = ModelConfig(family="llama", vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=4, max_position_embeddings=32)


@pytest.fixture(scope="module")
def model():
  m = Transformer(CONFIG)
  return m, m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_ids_inside_the_vocabulary_pass():
  check_ids([0, 5, 10], 11)
  check_ids(np.arange(11, dtype=np.uint8).reshape(1, 11), 11)
  check_ids(jnp.zeros((2, 3), jnp.int32), 11)
  check_ids(np.zeros((0, 4), np.int32), 11)


@pytest.mark.parametrize("ids,message", [
    ([1, 11, 2], r"^input: token id 11 is outside the model's vocabulary \(0\.\.10, 11 tokens\) at position 1$"),
    ([[1, 2], [3, -1]], r"^input: token id -1 is outside .* at row 1, position 1$"),
    (jnp.asarray([[1, 2, 3, 99, 12]]), r"^input: token id 99 is outside .* at row 0, position 3$"),  # the first one
])
def test_the_first_bad_id_is_named_with_its_position_and_the_vocabulary(ids, message):
  with pytest.raises(TokenIdError, match=message) as e:
    check_ids(ids, 11)
  assert isinstance(e.value, JftError)


def test_where_and_non_integer_ids():
  with pytest.raises(TokenIdError, match=r"^batch 3: token id 40 "):
    check_ids(np.array([40]), 11, where="batch 3")
  with pytest.raises(TokenIdError, match="must be integers"):
    check_ids(np.array([1.0, 2.0]), 11)


def test_the_model_returns_nan_without_the_check(model):
  """What check_ids guards: an id past the table gives NaN logits, silently (its whole row: the NaN
  key and value reach every position through attention), and the other rows are untouched."""
  m, params = model
  ids = jnp.asarray([[1, 2, CONFIG.vocab_size], [1, 2, 3]])
  logits = np.asarray(m.apply({"params": params}, ids))
  assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()
  with pytest.raises(TokenIdError, match="token id 11 .* at row 0, position 2"):
    check_ids(ids, CONFIG.vocab_size)


def test_generate_and_training_rows_use_the_same_check(model):
  m, params = model
  with pytest.raises(GenerationError, match=r"^prompt 1: token id 12 is outside the model's vocabulary \(0\.\.10, "
                                            r"11 tokens\) at position 0$"):
    generate(m, params, [[1, 2], [12]], Sampling(max_new_tokens=1))
  with pytest.raises(data.DataError, match=r"rows\.jsonl: row 0 has token id -3, outside the model's vocabulary"):
    data.check_token_ids([(np.array([1, -3]), np.array([1, 1]))], 11, "rows.jsonl")
