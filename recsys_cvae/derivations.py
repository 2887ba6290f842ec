"""Named derivations of an attribute from a raw profile column, in Python and in TensorFlow.

Why one module with both: the feature job derives an attribute (ML-100K's `zip_region` from
`zip_code`) in Python while it reads the users table, and the export derives it again inside
the serving graph from the raw column a client sends (ARCHITECTURE.md, "SavedModel
signatures": inputs are the raw profile columns). Two implementations of one rule can only
be trusted side by side, so each named derivation is written here twice, next to each other,
and `tests/test_derivations.py` checks that they agree on many strings.

The set is closed: a feature spec names a derivation (`AttributeSpec.derivation`) by one of
`NAMES`, and a spec naming anything else is refused. Every derivation maps strings to strings
and is a projection, derive(derive(x)) == derive(x): the feature TFRecords hold the derived
value, and feeding that value back as the raw input must give the same attribute (the batch
candidates job and the export's verification do exactly that).

    first_char_upper   the first character (Unicode code point), ASCII letters a-z
                       upper-cased, every other character kept as it is; "" stays "".
                       "55105" -> "5", "e1a 2b3" -> "E", "é" -> "é". ASCII-only on purpose:
                       Python's full Unicode case mapping turns "ß" into "SS" (two
                       characters, so not a projection) and TensorFlow's ICU tables need
                       not match Python's Unicode version.

TensorFlow is imported inside `derive_tensor`, to defer a heavy dependency: the feature job's
readers import this module per row and need no graph. The graph side uses core ops only
(`UnicodeTranscode`, `Substr`, `StringUpper`), so stock TF Serving runs it; bytes that are
not valid UTF-8 (a client may send any) become U+FFFD first, which no vocabulary holds, so
such a value means "unknown", as any unseen value does.
"""

from __future__ import annotations

import string
from collections.abc import Callable

FIRST_CHAR_UPPER = "first_char_upper"

_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


class DerivationError(ValueError):
    """A derivation name that is not one of `NAMES`."""


# ---- first_char_upper -------------------------------------------------------------------


def _first_char_upper(value: str) -> str:
    return value[:1].translate(_ASCII_UPPER)


def _first_char_upper_tensor(values):
    import tensorflow as tf  # deferred: see the module docstring

    valid = tf.strings.unicode_transcode(
        values, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
    )
    first = tf.strings.substr(valid, 0, 1, unit="UTF8_CHAR")
    return tf.strings.upper(first)  # no encoding: ASCII letters only, as `_first_char_upper`


# ---- the closed set -----------------------------------------------------------------------

_PYTHON: dict[str, Callable[[str], str]] = {FIRST_CHAR_UPPER: _first_char_upper}
_TENSOR: dict[str, Callable] = {FIRST_CHAR_UPPER: _first_char_upper_tensor}
NAMES = frozenset(_PYTHON)


def check_name(name: str) -> None:
    """Raises `DerivationError` unless `name` is one of `NAMES`."""
    if name not in NAMES:
        raise DerivationError(f"unknown derivation {name!r}; known derivations: {sorted(NAMES)}")


def derive(name: str, value: str) -> str:
    """The derivation `name` of one raw value, in Python (the feature job's side)."""
    check_name(name)
    return _PYTHON[name](value)


def derive_tensor(name: str, values):
    """The derivation `name` of a tf.string tensor (any shape), in core TensorFlow ops (the
    serving graph's side); the same strings as `derive`, element by element."""
    check_name(name)
    return _TENSOR[name](values)
