"""The one path-rule mechanism, on its own, with tiny trees."""

import pytest

from jft.core import rules

TREE = {"Dense_0": {"kernel": 1.0, "bias": 2.0}, "q_proj": {"kernel": 3.0}, "q_proj_extra": {"kernel": 4.0}}


def test_flatten_round_trip():
  flat = rules.flatten(TREE)
  assert flat == {"Dense_0/kernel": 1.0, "Dense_0/bias": 2.0, "q_proj/kernel": 3.0, "q_proj_extra/kernel": 4.0}
  assert rules.unflatten(flat) == TREE


def test_full_match_first_wins():
  r = [(r"q_proj/.*", "q"), (r".*/kernel", "k"), (r".*", "rest")]
  assert rules.map_tree(r, TREE) == {"Dense_0": {"kernel": "k", "bias": "rest"}, "q_proj": {"kernel": "q"},
                                     "q_proj_extra": {"kernel": "k"}}
  assert rules.match([("q_proj", 1)], "q_proj_extra", default=None) is None  # no substring matches
  assert rules.match([("q_proj", 1)], "q_proj") == 1


def test_rule_matching_nothing_names_rule_and_nearest_paths():
  with pytest.raises(rules.RuleError, match=r"'q_prj/kernel' \(nearest paths: q_proj/kernel"):
    rules.assign([("q_prj/kernel", 1), (".*", 0)], rules.flatten(TREE))
  # Not an error when asked not to check.
  assert rules.assign([("nothing", 1)], ["a"], default=0, require_all_rules_match=False) == {"a": 0}


def test_coverage_required_without_default():
  with pytest.raises(rules.RuleError, match="2 path.*Dense_0/bias"):
    rules.assign([(".*/kernel", 1)], ["Dense_0/kernel", "Dense_0/bias", "x/y"])


def test_invalid_regex_is_named():
  with pytest.raises(rules.RuleError, match=r"'\(unclosed'"):
    rules.assign([("(unclosed", 1)], ["a"])


def test_fn_sees_path_leaf_and_value():
  out = rules.map_tree([(".*bias", 10), (".*", 1)], TREE, fn=lambda p, leaf, v: leaf * v)
  assert out["Dense_0"] == {"kernel": 1.0, "bias": 20.0}
