"""Serving-time policy, baked into the export's graph: items never recommended, and item
categories never recommended to users with given attribute values.

Why in the graph, not in a service in front of it: stock TF Serving, Beam RunInference and any
client that loads the SavedModel then enforce it; there is no wrapper to forget, and the rules
are part of the artefact a review signs off (`assets.extra/policy.json`, the model card). Every
ranking signature removes the policy's items before its top-K, exactly as it removes a user's
history, so the K answers are the best allowed items.

A policy file (`export --policy policy.toml`):

    items_file = "items.csv"          # where item categories come from (relative to this
                                      # file); default: the items file the feature job read
    [deny]
    items = ["i000003", "i000017"]    # never recommended to anyone

    [[rules]]
    name = "no gambling in the north"  # optional: shown in errors and the model card
    item_categories = ["gambling"]     # categories of the items file (`genre`, `|`-separated)
    attribute = "region"               # a signature input: a raw profile column
    values = ["north", "west"]         # categorical: the raw values the rule applies to

    [[rules]]
    item_categories = ["Horror"]
    attribute = "age"
    below = 18                         # numeric: value < below and/or value >= at_least
    when_unknown = "apply"             # default: a user whose value is unknown — missing
                                       # ("" or NaN) or, for a categorical column, a value the
                                       # model was not trained on ("North", " north") — is
                                       # treated as matching; "skip" to leave them out
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.config import ConfigError, read_toml
from recsys_cvae.datasets.item_metadata import item_category_table

POLICY_FILE = "policy.json"
_RULE_KEYS = {"name", "item_categories", "attribute", "values", "below", "at_least",
              "when_unknown"}


class PolicyError(ConfigError):
    """A policy file that cannot be applied: one line naming the file and the field."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Items of `categories` (catalogue indices `items`) are removed for users whose
    `attribute` is in `values` (categorical) or in [at_least, below) (numeric)."""

    name: str
    attribute: str
    categorical: bool
    values: tuple[str, ...]
    below: float | None
    at_least: float | None
    apply_when_unknown: bool
    categories: tuple[str, ...]
    items: tuple[int, ...]
    known: tuple[str, ...] = ()  # the column's training vocabulary; others count as unknown


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy resolved against one export's catalogue (item indices, not ids)."""

    source: str
    deny: tuple[int, ...]
    deny_unknown: tuple[str, ...]  # denied ids the catalogue does not hold (never ranked)
    rules: tuple[Rule, ...]

    def to_json(self, item_ids: Sequence[str]) -> dict[str, Any]:
        """What `assets.extra/policy.json` holds: ids, not indices, so it reads on its own."""
        return {
            "source": self.source,
            "deny": [item_ids[i] for i in self.deny],
            "deny_not_in_catalogue": list(self.deny_unknown),
            "rules": [{**{k: v for k, v in dataclasses.asdict(rule).items() if k != "items"},
                       "items": [item_ids[i] for i in rule.items]} for rule in self.rules],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], item_ids: Sequence[str]) -> Policy:
        index = {item: i for i, item in enumerate(item_ids)}
        rules = tuple(
            Rule(**{**{k: v for k, v in rule.items() if k != "items"},
                    "values": tuple(rule["values"]), "categories": tuple(rule["categories"]),
                    "known": tuple(rule.get("known", ())),
                    "items": tuple(index[i] for i in rule["items"])})
            for rule in data["rules"])
        return cls(data["source"], tuple(index[i] for i in data["deny"]),
                   tuple(data.get("deny_not_in_catalogue", ())), rules)

    def summary(self) -> dict[str, Any]:
        """What the provenance and the model card say of the policy in force."""
        return {
            "source": self.source,
            "denied_items": len(self.deny),
            "denied_not_in_catalogue": len(self.deny_unknown),
            "rules": [{"name": rule.name, "attribute": rule.attribute,
                       "applies_to": describe_condition(rule),
                       "item_categories": list(rule.categories), "items": len(rule.items)}
                      for rule in self.rules],
        }

    # ---- the rule's test, in numpy (verification) and in the graph (the signatures) --------

    def mask(self, inputs: Mapping[str, Sequence[Any]], rows: int, num_items: int) -> np.ndarray:
        """`[rows, num_items]` bool, True where the policy removes the item for that row
        (inputs: signature input name -> one raw value per row)."""
        removed = np.zeros((rows, num_items), dtype=bool)
        removed[:, list(self.deny)] = True
        for rule in self.rules:
            applies = _applies_numpy(rule, inputs[rule.attribute])
            removed[np.ix_(applies, list(rule.items))] = True
        return removed

    def exclusions(self, inputs: Mapping[str, tf.Tensor], batch: tf.Tensor) -> tf.Tensor:
        """`[batch, m]` int32 catalogue indices the policy removes for each user, −1 where
        none (the form `catalogue_top_k` takes beside the history)."""
        parts = [tf.fill([batch, 0], -1)]
        if self.deny:
            parts.append(tf.tile(tf.constant(self.deny, tf.int32)[None, :], [batch, 1]))
        for rule in self.rules:
            applies = _applies_graph(rule, inputs[rule.attribute])
            items = tf.constant(rule.items, tf.int32)[None, :]
            parts.append(tf.where(applies[:, None], items, tf.constant(-1)))
        return tf.concat(parts, axis=1)


def describe_condition(rule: Rule) -> str:
    """The users a rule applies to, in words: `region in {north, west}`, `age < 18`."""
    if rule.categorical:
        text = f"{rule.attribute} in {{{', '.join(rule.values)}}}"
    else:
        bounds = ([f"{rule.attribute} >= {rule.at_least:g}"] if rule.at_least is not None else [])
        bounds += [f"{rule.attribute} < {rule.below:g}"] if rule.below is not None else []
        text = " and ".join(bounds)
    return text + (", or unknown" if rule.apply_when_unknown else "")


def _applies_numpy(rule: Rule, values: Sequence[Any]) -> np.ndarray:
    if rule.categorical:
        values = ["" if v is None else str(v) for v in values]
        known = set(rule.known)
        return np.array([(v in rule.values) or (rule.apply_when_unknown and (
            v == "" or (bool(known) and v not in known))) for v in values], dtype=bool)
    numbers = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float32)
    applies = np.ones(len(numbers), dtype=bool)
    if rule.below is not None:
        applies &= numbers < np.float32(rule.below)
    if rule.at_least is not None:
        applies &= numbers >= np.float32(rule.at_least)
    return applies | (np.isnan(numbers) & rule.apply_when_unknown)


def _applies_graph(rule: Rule, values: tf.Tensor) -> tf.Tensor:
    if rule.categorical:
        listed = tf.constant(rule.values or ("\0none",), tf.string)
        applies = tf.reduce_any(tf.equal(values[:, None], listed[None, :]), axis=1)
        unknown = tf.equal(values, "")
        if rule.known:
            known = tf.constant(rule.known, tf.string)
            unknown |= ~tf.reduce_any(tf.equal(values[:, None], known[None, :]), axis=1)
    else:
        applies = tf.ones_like(values, tf.bool)
        if rule.below is not None:
            applies &= values < rule.below
        if rule.at_least is not None:
            applies &= values >= rule.at_least
        unknown = tf.math.is_nan(values)
    return applies | unknown if rule.apply_when_unknown else applies


# ---- reading a policy file ------------------------------------------------------------------


def load_policy(
    path: str,
    item_ids: Sequence[str],
    inputs: Mapping[str, bool],
    default_items_file: str = "",
    vocabularies: Mapping[str, Sequence[str]] | None = None,
) -> Policy:
    """Reads `path` (see the module docstring) against the export's catalogue `item_ids` and
    its signature inputs (`inputs`: name -> categorical?). `vocabularies` (input -> training
    values, for categorical inputs the model reads as sent) make other values "unknown".

    Raises:
      PolicyError: one line naming the file and the field (unknown key, attribute that is not
        a signature input, category the items file does not have, bad bounds).
    """
    document = read_toml(path, "policy", PolicyError)
    unknown = set(document) - {"items_file", "deny", "rules"}
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) {sorted(unknown)}; expected items_file, "
                          "[deny] and [[rules]]")
    index = {item: i for i, item in enumerate(item_ids)}
    deny_ids = _string_list(path, "deny.items", (document.get("deny") or {}).get("items", []))
    extra = set(document.get("deny") or {}) - {"items"}
    if extra:
        raise PolicyError(f"{path}: [deny] takes `items` only, got {sorted(extra)}")
    rules_table = document.get("rules", [])
    if not isinstance(rules_table, list):
        raise PolicyError(f"{path}: rules must be an array of tables ([[rules]])")
    categories = None
    if rules_table:
        items_file = document.get("items_file", "")
        if items_file:
            items_file = os.path.join(os.path.dirname(os.path.abspath(path)), items_file)
        categories = _categories(path, items_file or default_items_file, item_ids)
    rules = tuple(dataclasses.replace(rule, known=tuple((vocabularies or {}).get(
        rule.attribute, ()))) if rule.categorical else rule
        for rule in (_rule(path, n, raw, inputs, categories) for n, raw in enumerate(rules_table)))
    return Policy(
        source=os.path.abspath(path),
        deny=tuple(sorted({index[i] for i in deny_ids if i in index})),
        deny_unknown=tuple(sorted({i for i in deny_ids if i not in index})),
        rules=rules,
    )


def _string_list(path: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{path}: {field} must be a list of strings, got {value!r}")
    return value


def _categories(path: str, source: str, item_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Category -> catalogue indices of its items, from the items table at `source`."""
    table = item_category_table(item_ids, source) if source else None
    if table is None:
        raise PolicyError(
            f"{path}: rules need item categories, but {source or 'no items file'} has no "
            "items table with a genre/category column; set items_file in the policy")
    labels, matrix = table
    return {label: tuple(np.flatnonzero(matrix[:, j]).tolist()) for j, label in enumerate(labels)}


def _rule(path: str, number: int, raw: Any, inputs: Mapping[str, bool],
          categories: Mapping[str, tuple[int, ...]]) -> Rule:
    where = f"{path}: rules[{number}]"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a table")
    name = str(raw.get("name", f"rule {number}"))
    where += f" ({name})" if "name" in raw else ""
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; expected "
                          f"{sorted(_RULE_KEYS)}")
    attribute = raw.get("attribute")
    if attribute not in inputs:
        raise PolicyError(f"{where}.attribute: {attribute!r} is not a signature input "
                          f"(inputs: {', '.join(inputs) or 'none'})")
    wanted = _string_list(path, f"rules[{number}].item_categories",
                          raw.get("item_categories", []))
    missing = [c for c in wanted if c not in categories]
    if not wanted or missing:
        raise PolicyError(f"{where}.item_categories: {missing or 'none given'} not among the "
                          f"items' categories ({', '.join(sorted(categories))})")
    when_unknown = raw.get("when_unknown", "apply")
    if when_unknown not in ("apply", "skip"):
        raise PolicyError(f"{where}.when_unknown: expected \"apply\" or \"skip\", "
                          f"got {when_unknown!r}")
    categorical = inputs[attribute]
    values: tuple[str, ...] = ()
    below = at_least = None
    if categorical:
        if "below" in raw or "at_least" in raw:
            raise PolicyError(f"{where}: {attribute!r} is categorical: use values = [...]")
        values = tuple(_string_list(path, f"rules[{number}].values", raw.get("values")))
    else:
        if "values" in raw:
            raise PolicyError(f"{where}: {attribute!r} is numeric: use below and/or at_least")
        below, at_least = _bound(where, raw, "below"), _bound(where, raw, "at_least")
        if below is None and at_least is None:
            raise PolicyError(f"{where}: a numeric rule needs below and/or at_least")
    items = tuple(sorted({i for c in wanted for i in categories[c]}))
    return Rule(name, attribute, categorical, values, below, at_least,
                when_unknown == "apply", tuple(wanted), items)


def _bound(where: str, raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PolicyError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)
