"""FeatureSpec: the one contract between the Beam job, tf.data, the model and the export.

The Beam feature job writes `features/feature_spec.json`; everything downstream reads it
back with `FeatureSpec.load`. One record per user is a `tf.train.Example` with

    user_id             bytes     the raw user id
    history_item_ids    bytes[]   what the model sees: all training items for a training
                                  user, the fold-in part for an evaluation user, empty for
                                  a cold-start user
    target_item_ids     bytes[]   the held-out items to rank (empty for training users)
    history_weights     float[]   optional (spec.history_weights): one recency weight per
                                  history item, aligned with history_item_ids
    <attribute>         bytes     one per categorical attribute ("" = unknown); a derived
                                  attribute holds the derived value (`zip_region`), never
                                  its raw column
    <attribute>         float     one per numeric attribute (NaN = unknown)

IDs stay strings end to end; vocabularies map them to indices inside Keras layers
(`recsys_cvae.model.preprocessing`), so training and serving share one lookup.

Serving inputs are raw profile columns, not attributes: an attribute the feature job derives
from a column (`AttributeSpec.derived_from` + `derivation`, one of `recsys_cvae.derivations`)
is computed inside the serving graph from that column. `serving_inputs` is the one mapping
from the spec's attributes to the signatures' inputs; every caller that builds inputs (the
export, its verification, batch candidates, the what-if panel) goes through it.

How one record is written and read back is `recsys_cvae.user_records`.

Why one file of ~530 lines: the spec, its validation of derived attributes and the mapping
of its attributes to serving inputs are one contract — a spec that the mapping cannot serve
is refused when it is built (`FeatureSpec.__post_init__`), so the two cannot live in modules
that import each other — and the vocabulary and text-file helpers every stage reads it with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from recsys_cvae import derivations as D

SPEC_FILE = "feature_spec.json"
SPEC_FORMAT_VERSION = 1

USER_ID = "user_id"
HISTORY = "history_item_ids"
TARGETS = "target_item_ids"
HISTORY_WEIGHTS = "history_weights"

CATEGORICAL = "categorical"
NUMERIC = "numeric"

# Split names written by the feature job. Training users feed `fit`; validation users pick
# the best epoch; test users are reported; cold users have attributes and targets only.
TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
COLD = "cold"
SPLITS = (TRAIN, VALIDATION, TEST, COLD)

RESERVED_NAMES = frozenset({USER_ID, HISTORY, TARGETS, HISTORY_WEIGHTS})

# Evaluation protocols: each names the splits that play the train / validation / test roles.
# `strong` (held-out users with fold-in and targets, as in Mult-VAE) uses the plain split names
# above; other protocols prefix theirs (`weak_train`, `temporal_test`, ...). Cold start is
# its own protocol with only a test role: attributes in, all the user's items as targets.
STRONG = "strong"
WEAK = "weak"
TEMPORAL = "temporal"
COLD_START = "cold"
ROLES = ("train", "validation", "test")
DEFAULT_PROTOCOLS: dict[str, dict[str, str]] = {
    STRONG: {"train": TRAIN, "validation": VALIDATION, "test": TEST},
    COLD_START: {"test": COLD},
}


def absolute_local_path(path: str) -> str:
    """`path` made absolute against this process's cwd; URLs (gs://, s3://, ...) unchanged.

    Stages may start subprocesses in another folder (the export verifier runs in the
    repository root), so a path the user typed relative to their own folder is resolved once.
    """
    return path if "://" in path else os.path.abspath(path)


class SpecError(ValueError):
    """The feature spec is missing, malformed, or does not match the data it describes."""


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
    """One user attribute as the model and the serving signatures see it.

    Attributes:
      name: the attribute's name: the feature in the records and the model's input; for a
        raw attribute also the users-table column and the serving input.
      kind: `categorical` (string, looked up in a vocabulary) or `numeric` (float32).
      vocabulary_file: categorical only; path relative to the features directory, one value
        per line, most frequent first.
      vocabulary_size: categorical only; number of known values (OOV buckets not included).
      num_oov_buckets: categorical only; buckets for unknown or empty values.
      mean: numeric only; training-users mean, used to standardise.
      std: numeric only; training-users standard deviation (1.0 when the column is constant).
      boundaries: numeric only; the training users' quantiles (ascending, distinct) that cut
        the value into len + 1 buckets, computed by the feature job so that training and the
        serving graph bucketise alike (`features.numeric_quantiles`); () = not bucketised.
      source: where the attribute comes from: `users` (the users table) or `context`
        (computed from the logs by the feature job).
      derived_from: the raw users-table column the attribute is derived from (e.g.
        `zip_code` for `zip_region`), which is then the serving input; None for a raw
        attribute. Set together with `derivation`.
      derivation: how: one of `recsys_cvae.derivations.NAMES` (e.g. `first_char_upper`);
        the feature job applies it in Python, the serving graph in TensorFlow. Derived
        attributes are categorical (derivations yield strings).
    """

    name: str
    kind: str
    vocabulary_file: str | None = None
    vocabulary_size: int = 0
    num_oov_buckets: int = 1
    mean: float = 0.0
    std: float = 1.0
    boundaries: tuple[float, ...] = ()
    source: str = "users"
    derived_from: str | None = None
    derivation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (CATEGORICAL, NUMERIC):
            raise SpecError(
                f"attribute {self.name!r}: kind must be {CATEGORICAL!r} or {NUMERIC!r}, "
                f"got {self.kind!r}"
            )
        if self.name in RESERVED_NAMES:
            raise SpecError(f"attribute name {self.name!r} is reserved; rename the column")
        # JSON gives a list; a tuple keeps the frozen spec hashable and comparable.
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise SpecError(
                f"attribute {self.name!r}: boundaries must ascend strictly, got "
                f"{list(self.boundaries)}"
            )
        if self.kind == CATEGORICAL and not self.vocabulary_file:
            raise SpecError(f"categorical attribute {self.name!r} needs a vocabulary_file")
        self._check_derivation()

    def _check_derivation(self) -> None:
        if (self.derived_from is None) != (self.derivation is None):
            raise SpecError(
                f"attribute {self.name!r}: derived_from and derivation go together, got "
                f"derived_from={self.derived_from!r}, derivation={self.derivation!r}"
            )
        if self.derivation is None:
            return
        try:
            D.check_name(self.derivation)
        except D.DerivationError as error:
            raise SpecError(f"attribute {self.name!r}: {error}") from None
        if not self.derived_from or self.derived_from in RESERVED_NAMES:
            raise SpecError(
                f"attribute {self.name!r}: derived_from {self.derived_from!r} cannot be a raw "
                f"column (empty or one of {sorted(RESERVED_NAMES)})"
            )
        if self.kind != CATEGORICAL:
            raise SpecError(
                f"attribute {self.name!r} is derived ({self.derivation} of "
                f"{self.derived_from!r}) and so categorical, not {self.kind!r}"
            )

    @property
    def is_categorical(self) -> bool:
        return self.kind == CATEGORICAL

    @property
    def is_derived(self) -> bool:
        return self.derivation is not None

    @property
    def serving_input(self) -> str:
        """The serving input this attribute is computed from: its raw column."""
        return self.derived_from if self.derived_from is not None else self.name


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Where one split's TFRecords live and how many users it holds.

    Attributes:
      file_pattern: glob relative to the features directory, e.g. `train/part-*.tfrecord.gz`.
      users: number of user records in the split.
    """

    file_pattern: str
    users: int


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Everything downstream stages need to read features and build matching layers.

    Attributes:
      attributes: user attributes in a stable order (the order of serving inputs).
      item_vocabulary_file: path relative to the features directory; one item id per line,
        most interacted first. Line i is item index i everywhere in the model.
      num_items: number of lines in the item vocabulary.
      splits: split name -> SplitSpec.
      counts: rows_read, rows_valid, rows_dead_lettered, users, items, users_per_split.
      layout: input layout the job detected (`ml-100k`, `ml-1m`, `csv`, `parquet`).
      protocol: the primary protocol, whose train/validation roles `fit` uses by default.
      protocols: protocol name -> {role: split name}, for every protocol the job wrote
        (see DEFAULT_PROTOCOLS; roles are `train`, `validation`, `test`).
      seed: the seed the splits were hashed with.
      history_weights: records carry `history_weights` (recency weights, aligned with
        `history_item_ids`); False when the job wrote none.
      directory: where the spec was loaded from (not serialised); relative paths resolve here.
    """

    attributes: tuple[AttributeSpec, ...]
    item_vocabulary_file: str
    num_items: int
    splits: Mapping[str, SplitSpec]
    counts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = ""
    protocol: str = STRONG
    seed: int = 0
    protocols: Mapping[str, Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_PROTOCOLS)
    )
    history_weights: bool = False
    directory: str = ""

    def __post_init__(self) -> None:
        serving_inputs(self)  # refuses attributes no set of raw columns can feed

    # ---- paths -------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Resolves a spec-relative path (works for local paths and gs:// alike)."""
        if not self.directory or "://" in relative or relative.startswith("/"):
            return relative
        return posixpath.join(self.directory, relative)

    def protocol_split(self, role: str, protocol: str | None = None) -> str:
        """The split that plays `role` (train/validation/test) in `protocol` (default: primary)."""
        protocol = protocol or self.protocol
        if protocol not in self.protocols:
            raise SpecError(
                f"protocol {protocol!r} was not built by the feature job; it built "
                f"{sorted(self.protocols)} (see features.protocols in the config)"
            )
        roles = self.protocols[protocol]
        if role not in roles:
            raise SpecError(f"protocol {protocol!r} has no {role!r} split; it has {sorted(roles)}")
        return roles[role]

    def split_pattern(self, split: str) -> str:
        if split not in self.splits:
            raise SpecError(
                f"split {split!r} is not in the feature spec; it has {sorted(self.splits)}"
            )
        return self.path(self.splits[split].file_pattern)

    # ---- vocabularies ------------------------------------------------------------------

    def item_vocabulary(self) -> list[str]:
        """The item ids in index order."""
        return read_vocabulary(self.path(self.item_vocabulary_file))

    def attribute_vocabulary(self, name: str) -> list[str]:
        attribute = self.attribute(name)
        if not attribute.is_categorical:
            raise SpecError(f"attribute {name!r} is numeric and has no vocabulary")
        return read_vocabulary(self.path(attribute.vocabulary_file))

    def attribute(self, name: str) -> AttributeSpec:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise SpecError(
            f"unknown attribute {name!r}; the spec has {[a.name for a in self.attributes]}"
        )

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    # ---- tf.Example parsing ------------------------------------------------------------

    def parse_spec(self) -> dict[str, Any]:
        """The `tf.io.parse_example` spec for one user record."""
        import tensorflow as tf

        features: dict[str, Any] = {
            USER_ID: tf.io.FixedLenFeature([], tf.string),
            HISTORY: tf.io.RaggedFeature(tf.string),
            TARGETS: tf.io.RaggedFeature(tf.string),
        }
        if self.history_weights:
            features[HISTORY_WEIGHTS] = tf.io.RaggedFeature(tf.float32)
        for attribute in self.attributes:
            if attribute.is_categorical:
                features[attribute.name] = tf.io.FixedLenFeature([], tf.string, default_value="")
            else:
                features[attribute.name] = tf.io.FixedLenFeature(
                    [], tf.float32, default_value=math.nan
                )
        return features

    def parse_spec_json(self) -> dict[str, dict[str, Any]]:
        """A JSON description of `parse_spec`, for readers that do not run TensorFlow."""
        described = {
            USER_ID: {"type": "fixed_len", "dtype": "string", "shape": []},
            HISTORY: {"type": "ragged", "dtype": "string"},
            TARGETS: {"type": "ragged", "dtype": "string"},
        }
        if self.history_weights:
            described[HISTORY_WEIGHTS] = {"type": "ragged", "dtype": "float32"}
        for attribute in self.attributes:
            described[attribute.name] = {
                "type": "fixed_len",
                "dtype": "string" if attribute.is_categorical else "float32",
                "shape": [],
                "default": "" if attribute.is_categorical else "NaN",
            }
        return described

    # ---- (de)serialisation -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "layout": self.layout,
            "protocol": self.protocol,
            "protocols": {name: dict(roles) for name, roles in self.protocols.items()},
            "seed": self.seed,
            "history_weights": self.history_weights,
            "attributes": [
                {k: v for k, v in dataclasses.asdict(a).items()
                 if v is not None and not (k == "boundaries" and not v)}
                for a in self.attributes
            ],
            "items": {"vocabulary_file": self.item_vocabulary_file, "size": self.num_items},
            "splits": {name: dataclasses.asdict(s) for name, s in self.splits.items()},
            "counts": dict(self.counts),
            "parse_spec": self.parse_spec_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], directory: str = "") -> FeatureSpec:
        try:
            version = data.get("format_version")
            if version != SPEC_FORMAT_VERSION:
                raise SpecError(
                    f"feature spec format_version {version!r} is not {SPEC_FORMAT_VERSION}; "
                    "rebuild the features with this version of recsys-cvae"
                )
            return cls(
                attributes=tuple(AttributeSpec(**a) for a in data["attributes"]),
                item_vocabulary_file=data["items"]["vocabulary_file"],
                num_items=int(data["items"]["size"]),
                splits={name: SplitSpec(**s) for name, s in data["splits"].items()},
                counts=data.get("counts", {}),
                layout=data.get("layout", ""),
                protocol=_protocol_name(data.get("protocol", STRONG)),
                protocols=data.get("protocols", DEFAULT_PROTOCOLS),
                seed=int(data.get("seed", 0)),
                history_weights=bool(data.get("history_weights", False)),
                directory=directory,
            )
        except (KeyError, TypeError) as error:
            raise SpecError(f"feature spec is malformed: {error!r}") from error

    def save(self, features_dir: str) -> str:
        path = posixpath.join(features_dir, SPEC_FILE)
        write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, features_dir: str) -> FeatureSpec:
        path = posixpath.join(features_dir, SPEC_FILE)
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise SpecError(
                f"{path}: no feature spec; run `recsys-cvae features` for this workdir first"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{path}: not valid JSON ({error})") from None
        return cls.from_json(data, directory=features_dir)


def _protocol_name(name: str) -> str:
    """Specs written before protocols had names said `strong_generalization`."""
    return STRONG if name == "strong_generalization" else name


# ---- attributes -> serving inputs (raw profile columns) -----------------------------------


class ServingInput(NamedTuple):
    """One attribute input of the serving signatures: a raw profile column.

    Attributes:
      name: the input's name, the raw column a caller holds (`zip_code`, `age`).
      kind: `categorical` (tf.string) or `numeric` (tf.float32); derived attributes read
        strings.
      attributes: the spec's attributes computed from it, in spec order (the raw attribute
        of the same name itself, and every attribute derived from the column).
      stored_as: the attribute whose value in the feature records can be fed as this input
        and give back every one of `attributes`: the raw attribute when the spec has one,
        else a derived one (derivations are projections, so derive(stored) == stored); None
        when attributes with different derivations share the column and it is not stored.
    """

    name: str
    kind: str
    attributes: tuple[str, ...]
    stored_as: str | None

    @property
    def is_categorical(self) -> bool:
        return self.kind == CATEGORICAL


def serving_inputs(spec: FeatureSpec) -> list[ServingInput]:
    """The signatures' attribute inputs, in spec order of first use: one per raw column.

    A raw attribute is its own input; a derived attribute is read from its `derived_from`
    column, and attributes derived from one column share one input. This is the one
    mapping from the spec to the signatures: the export builds its input signature and its
    in-graph derivations from it, and every feeder of the signatures (verification, batch
    candidates, what-if) names its inputs by it.

    Raises:
      SpecError: a column read both as a number and as a string, or a derived attribute
        named as another attribute's raw column.
    """
    grouped: dict[str, list[AttributeSpec]] = {}
    for attribute in spec.attributes:
        grouped.setdefault(attribute.serving_input, []).append(attribute)
    inputs = []
    for name, attributes in grouped.items():
        raw = [a for a in attributes if not a.is_derived]
        derived = [a for a in attributes if a.is_derived]
        if derived and any(not a.is_categorical for a in raw):
            raise SpecError(
                f"column {name!r} is a numeric attribute and the source of derived attribute(s) "
                f"{[a.name for a in derived]}, which read it as a string"
            )
        # No annotated assignment here: AutoGraph (this runs inside the candidates job's
        # tf.function) cannot convert one and warns on every trace.
        stored_as = None
        if raw:
            stored_as = raw[0].name
        elif len({a.derivation for a in derived}) == 1:
            stored_as = derived[0].name
        kind = CATEGORICAL if derived else attributes[0].kind
        inputs.append(ServingInput(name, kind, tuple(a.name for a in attributes), stored_as))
    for attribute in spec.attributes:
        if attribute.is_derived and attribute.name != attribute.derived_from and (
            attribute.name in grouped
        ):
            raise SpecError(
                f"attribute {attribute.name!r} is derived from {attribute.derived_from!r}, but "
                f"{attribute.name!r} is also the raw column of {grouped[attribute.name][0].name!r}"
                "; one name cannot be both"
            )
    return inputs


def inputs_from_attributes(spec: FeatureSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute values as the feature records hold them -> the signatures' attribute inputs.

    `values` maps attribute names to anything (one value, a list, a tensor); each input gets
    the value of its `stored_as` attribute, unchanged (derivations are projections).

    Raises:
      SpecError: an input no stored attribute can feed (see `ServingInput.stored_as`).
    """
    inputs = {}
    for serving_input in serving_inputs(spec):
        if serving_input.stored_as is None:
            raise SpecError(
                f"serving input {serving_input.name!r} feeds attributes "
                f"{list(serving_input.attributes)} with different derivations, and the records "
                "do not hold the raw column; add it as an attribute"
            )
        inputs[serving_input.name] = values[serving_input.stored_as]
    return inputs


def attributes_from_inputs(spec: FeatureSpec, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """One caller's attribute inputs (raw column -> one value) -> attribute values, in
    Python, as the serving graph computes them (derived attributes derived, others as sent)."""
    values = {}
    for attribute in spec.attributes:
        value = inputs[attribute.serving_input]
        if attribute.derivation is not None:
            value = D.derive(attribute.derivation, "" if value is None else str(value))
        values[attribute.name] = value
    return values


# ---- files (Beam/TF file systems, so gs:// works) -------------------------------------------


def read_text(path: str) -> str:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(path)
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(posixpath.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def read_vocabulary(path: str) -> list[str]:
    """One entry per line, in index order; a trailing newline is not an entry."""
    text = read_text(path)
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def write_vocabulary(path: str, values: Iterable[str]) -> None:
    values = list(values)
    for value in values:
        if "\n" in value or "\r" in value:
            raise SpecError(f"vocabulary value {value!r} contains a line break")
    write_text(path, "".join(f"{v}\n" for v in values))
