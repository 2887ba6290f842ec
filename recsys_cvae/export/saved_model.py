"""The SavedModel export: the signatures TF Serving, Beam RunInference and the CLI call.

Why a `tf.Module` and not `model.save`: the contract (ARCHITECTURE.md, "SavedModel
signatures") is about what a *caller* sends and gets back (raw string ids and attribute
values in, top-K item ids and scores out), not about the Keras model's own call. The
`ServingModule` wraps the trained CVAE, holds the item vocabulary (index order) and puts the
history masking and the top-K inside the graph, so a server returns ids, never a
`[batch, num_items]` score matrix.

Signatures (K = min(`ExportConfig.top_k`, num_items), fixed at export):

    recommend (= serving_default)
        item_ids     tf.string  [batch, n]   the history; "" pads, unknown ids are ignored
        <column>     tf.string  [batch]      categorical ("" or unseen value = unknown)
        <column>     tf.float32 [batch]      numeric (NaN = unknown)
      -> item_ids    tf.string  [batch, K]   best first, never an item of the history
         scores      tf.float32 [batch, K]
    generate     the attribute inputs only (cold start, what-if) -> item_ids, scores
    encode       the recommend inputs -> z_mean, z_log_var  tf.float32 [batch, latent_dim]
    recommend_excluding, generate_excluding
                 as recommend / generate, plus exclude_item_ids tf.string [batch, m]: items
                 never returned for that request (existing clients keep their inputs)
    sample       the attribute inputs, num_items tf.int32 [batch], seed tf.int64 [batch]
      -> item_ids    tf.string  [batch, max num_items]   a synthetic user's items, no
                     repeats, "" padding; the same for the same seed (`model.sampling`)

With a policy (`export.policy`, `recsys_cvae.export.policy`) every ranking signature also
leaves out the items it forbids for each user, in the graph.

The attribute inputs are the raw profile columns a caller holds (`spec.serving_inputs`), not
the model's attributes: an attribute the feature job derived from a column (ML-100K's
`zip_region` from `zip_code`, `AttributeSpec.derivation`) is computed in the graph from that
column by `recsys_cvae.derivations.derive_tensor`, the twin of the feature job's Python, before
the model's lookup layers; attributes derived from one column share its one input. The
derivations are projections, so the derived value itself ("5") is a valid raw input too.

Scores are log π_i, the log-softmax of the decoder logits over the whole catalogue (the
Mult-VAE multinomial), so they are comparable across users and between `recommend` and
`generate`. History items are set to -inf before `tf.math.top_k`; if a history covers so
much of the catalogue that fewer than K items are left, the tail is padded with item id ""
and score -inf. Catalogues larger than `ExportConfig.top_k_chunk_size` are scored chunk
by chunk with a running top-K when a call's batch × num_items logits pass 16 MB
(`recsys_cvae.model.catalogue_top_k`): the same answers, with the logits' memory bounded
by batch × chunk instead of batch × num_items.

Only core TensorFlow ops are used (no py_function), so stock `tensorflow_model_server` runs
the export. `export_model` writes into a temporary folder inside the export base and renames
it to the next integer version, so a server polling the base path never sees half a model.
`export.verification.verify_export` reloads the export in a fresh Python process that does
not import this package (`serving/verify_export.py`) and compares every signature with the
in-process model.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import uuid
from typing import Any

import tensorflow as tf
from tensorflow.python.trackable.data_structures import NoDependency
from tensorflow.python.trackable.resource import CapturableResource

from recsys_cvae import spec as S
from recsys_cvae.config import ExportConfig
from recsys_cvae.derivations import derive_tensor
from recsys_cvae.export.model_card import write_model_card
from recsys_cvae.export.policy import POLICY_FILE, Policy, load_policy
from recsys_cvae.export.provenance import build_provenance, write_provenance
from recsys_cvae.export.warmup import write_warmup_requests
from recsys_cvae.export_layout import rename_to_next_version
from recsys_cvae.model.catalogue_top_k import ONE_PIECE_MAX_LOGITS, catalogue_top_k, uses_chunks
from recsys_cvae.model.model_dir import METRICS_FILE, load_trained_model, read_trained_on
from recsys_cvae.model.sampling import Z_STREAM, gumbel_top_k, row_noise

logger = logging.getLogger(__name__)

RECOMMEND = "recommend"
GENERATE = "generate"
ENCODE = "encode"
RECOMMEND_EXCLUDING = "recommend_excluding"
GENERATE_EXCLUDING = "generate_excluding"
SAMPLE = "sample"
SERVING_DEFAULT = "serving_default"
SIGNATURES = (SERVING_DEFAULT, RECOMMEND, GENERATE, ENCODE, RECOMMEND_EXCLUDING,
              GENERATE_EXCLUDING, SAMPLE)

HISTORY_INPUT = "item_ids"  # the history input of recommend/encode
EXCLUDE_INPUT = "exclude_item_ids"  # the *_excluding signatures' request-level exclusions
NUM_ITEMS_INPUT, SEED_INPUT = "num_items", "seed"  # sample: how many items, whose noise
SAMPLE_MAX_ITEMS = 10_000  # a synthetic history is capped here (and at the catalogue)
ITEM_IDS = "item_ids"
SCORES = "scores"
Z_MEAN = "z_mean"
Z_LOG_VAR = "z_log_var"

ASSETS_EXTRA = "assets.extra"
EXPORT_INFO_FILE = "export_info.json"
WARMUP_FILE = "tf_serving_warmup_requests"
TEMP_PREFIX = ".tmp-export-"  # not an integer, so TF Serving ignores a half-written export
DEFAULT_CHUNK_SIZE = ExportConfig().top_k_chunk_size

# Serving signature keys must be valid graph node names.
_INPUT_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


class ExportError(RuntimeError):
    """The export cannot be written, or the written export does not match the model."""


def _captured_state(model: tf.keras.Model) -> list[Any]:
    """The model's variables and resources (StringLookup's hash tables), in a stable order."""
    state = list(model.variables)
    seen = {id(v) for v in state}
    for trackable in tf.train.TrackableView(model).descendants():
        if isinstance(trackable, CapturableResource) and id(trackable) not in seen:
            seen.add(id(trackable))
            state.append(trackable)
    return state


class ServingModule(tf.Module):
    """The trained CVAE behind the three serving signatures.

    Args:
      model: a trained `recsys_cvae.model.CVAE` (or anything with the same methods:
        `encode`, `recommend_logits`, `generate_logits`, `history_mask`, and attributes
        `item_ids` and `spec`).
      top_k: how many items `recommend` and `generate` return; capped at the catalogue size.
      chunk_size: catalogues larger than this are ranked this many items at a time
        (`recsys_cvae.model.catalogue_top_k`); 0 ranks the whole catalogue at once.
      one_piece_max_logits: a call with at most this many logits (batch × num_items) is
        ranked in one piece even so (tests set 0 to chunk every call).

    Example:
      module = ServingModule(model, top_k=100)
      tf.saved_model.save(module, path, signatures=module.signatures())
    """

    def __init__(
        self,
        model: tf.keras.Model,
        top_k: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        one_piece_max_logits: int = ONE_PIECE_MAX_LOGITS,
        policy: Policy | None = None,
    ) -> None:
        super().__init__(name="recsys_cvae_serving")
        if top_k < 1:
            raise ExportError(f"export.top_k must be at least 1, got {top_k}")
        if chunk_size < 0:
            raise ExportError(f"export.top_k_chunk_size must be 0 (off) or more, got {chunk_size}")
        item_ids = list(model.item_ids)
        if not item_ids:
            raise ExportError("the model has an empty item vocabulary; nothing to export")
        # The Keras model is called, not saved: tracked, it would bring its layers' Keras
        # serialisation along (call-and-return-losses functions whose custom gradients every
        # load warns about, "Skipping full serialization" warnings) for nothing a signature
        # uses. What the signatures capture, its variables and lookup tables, is saved
        # through `model_state`.
        self.model = NoDependency(model)
        self.attributes = tuple(model.spec.attributes)
        self.inputs = tuple(S.serving_inputs(model.spec))
        _check_input_names(self.inputs)
        self.model_state = _captured_state(model)
        self.top_k = min(int(top_k), len(item_ids))
        self.chunk_size = int(chunk_size) if uses_chunks(model, int(chunk_size)) else 0
        self.one_piece_max_logits = int(one_piece_max_logits)
        self.policy = NoDependency(policy)  # constants in the graph, not saved state
        # [num_items] tf.string; row i of the decoder output is item_vocabulary[i].
        self.item_vocabulary = tf.Variable(
            item_ids, dtype=tf.string, trainable=False, name="item_vocabulary"
        )
        self.recommend = tf.function(self._recommend)
        self.generate = tf.function(self._generate)
        self.encode = tf.function(self._encode)
        self.recommend_excluding = tf.function(self._recommend)
        self.generate_excluding = tf.function(self._generate)
        self.sample = tf.function(self._sample)

    # ---- input specs -------------------------------------------------------------------

    def attribute_specs(self) -> dict[str, tf.TensorSpec]:
        """One `[batch]` input per raw profile column (`spec.serving_inputs`), in spec order,
        named as the column: tf.string, or tf.float32 for a numeric attribute."""
        return {
            i.name: tf.TensorSpec([None], tf.string if i.is_categorical else tf.float32, i.name)
            for i in self.inputs
        }

    def recommend_specs(self) -> dict[str, tf.TensorSpec]:
        history = {HISTORY_INPUT: tf.TensorSpec([None, None], tf.string, HISTORY_INPUT)}
        return {**history, **self.attribute_specs()}

    @staticmethod
    def exclude_spec() -> dict[str, tf.TensorSpec]:
        return {EXCLUDE_INPUT: tf.TensorSpec([None, None], tf.string, EXCLUDE_INPUT)}

    def input_specs(self) -> dict[str, dict[str, tf.TensorSpec]]:
        """Signature name -> its input specs (serving_default is recommend's twin)."""
        return {
            RECOMMEND: self.recommend_specs(),
            GENERATE: self.attribute_specs(),
            ENCODE: self.recommend_specs(),
            RECOMMEND_EXCLUDING: {**self.recommend_specs(), **self.exclude_spec()},
            GENERATE_EXCLUDING: {**self.attribute_specs(), **self.exclude_spec()},
            SAMPLE: {**self.attribute_specs(),
                     NUM_ITEMS_INPUT: tf.TensorSpec([None], tf.int32, NUM_ITEMS_INPUT),
                     SEED_INPUT: tf.TensorSpec([None], tf.int64, SEED_INPUT)},
        }

    def signatures(self) -> dict[str, Any]:
        """Concrete functions keyed by signature name, for `tf.saved_model.save`."""
        functions = {RECOMMEND: self.recommend, GENERATE: self.generate, ENCODE: self.encode,
                     RECOMMEND_EXCLUDING: self.recommend_excluding,
                     GENERATE_EXCLUDING: self.generate_excluding, SAMPLE: self.sample}
        concrete = {name: functions[name].get_concrete_function(specs)
                    for name, specs in self.input_specs().items()}
        return {SERVING_DEFAULT: concrete[RECOMMEND], **concrete}

    # ---- signature bodies --------------------------------------------------------------

    def _model_features(self, inputs: dict[str, tf.Tensor], history: bool) -> dict:
        """Serving inputs -> the model's raw feature dict (`history_item_ids` + attributes):
        each attribute is its column as sent, or derived from it in the graph."""
        features = {
            a.name: derive_tensor(a.derivation, inputs[a.serving_input])
            if a.derivation is not None else inputs[a.serving_input]
            for a in self.attributes
        }
        if history:
            features[S.HISTORY] = inputs[HISTORY_INPUT]
        return features

    def _recommend(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = self._model_features(inputs, history=True)
        return self._top_k(features, from_history=True, inputs=inputs)

    def _generate(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = self._model_features(inputs, history=False)
        return self._top_k(features, from_history=False, inputs=inputs)

    def _sample(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A synthetic user per row: z ~ p(z|c), then `num_items` items without replacement
        from the decoder's softmax at that z (`CVAE.sample_logits`, `model.sampling`), the
        same for the same `seed`; "" pads rows that asked for fewer than the batch's most.
        The policy does not apply: these are interaction logs of users who do not exist, not
        recommendations."""
        features = self._model_features(inputs, history=False)
        seeds = inputs[SEED_INPUT]
        noise = row_noise(seeds, self.model.model_config.latent_dim, Z_STREAM, normal=True)
        logits = self.model.sample_logits(features, noise)
        indices, used = gumbel_top_k(logits, seeds, inputs[NUM_ITEMS_INPUT], SAMPLE_MAX_ITEMS)
        item_ids = tf.where(used, tf.gather(self.item_vocabulary, indices), tf.constant(""))
        return {ITEM_IDS: item_ids}

    def _excluded(self, inputs: dict[str, tf.Tensor], from_history: bool) -> tf.Tensor | None:
        """`[batch, m]` item indices to leave out besides the history: the policy's for each
        user, and the request's `exclude_item_ids` (unknown ids and "" are ignored)."""
        parts = []
        if EXCLUDE_INPUT in inputs:
            parts.append(self.model.history_indices(inputs[EXCLUDE_INPUT]))
        policy = self.policy
        if policy is not None and (policy.deny or policy.rules):
            if from_history:
                batch = tf.shape(inputs[HISTORY_INPUT])[0]
            elif self.inputs:
                batch = tf.shape(inputs[self.inputs[0].name])[0]
            else:
                batch = tf.constant(1)  # generate without attributes answers one row
            parts.append(policy.exclusions(inputs, batch))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    def _encode(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        z_mean, z_log_var = self.model.encode(self._model_features(inputs, history=True))
        return {Z_MEAN: z_mean, Z_LOG_VAR: z_log_var}

    def _top_k(self, features: dict[str, tf.Tensor], from_history: bool,
               inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Top-K items by log-softmax score, history items removed when `from_history`,
        and the policy's and the request's exclusions (`_excluded`) always.

        Returns item_ids tf.string [batch, K] and scores tf.float32 [batch, K], best first;
        positions left over after exclusion hold "" and -inf.
        """
        scores, indices = catalogue_top_k(
            self.model, features, self.top_k, self.chunk_size, from_history,
            self.one_piece_max_logits, excluded=self._excluded(inputs, from_history),
        )
        item_ids = tf.gather(self.item_vocabulary, indices)
        item_ids = tf.where(tf.math.is_inf(scores), tf.constant(""), item_ids)
        return {ITEM_IDS: item_ids, SCORES: scores}


def _check_input_names(inputs: tuple[S.ServingInput, ...]) -> None:
    for serving_input in inputs:
        if serving_input.name in (HISTORY_INPUT, EXCLUDE_INPUT, NUM_ITEMS_INPUT, SEED_INPUT):
            raise ExportError(
                f"attribute input {serving_input.name!r} clashes with the history or exclusion "
                "input of the serving signatures; rename the users-table column"
            )
        if not _INPUT_NAME.match(serving_input.name):
            raise ExportError(
                f"attribute input {serving_input.name!r} cannot be a serving input name "
                "(letters, digits, '_', '.', '-', '/' only); rename the users-table column"
            )


# ---- writing an export ------------------------------------------------------------------


def export_model(model_dir: str, export_base: str, config: ExportConfig) -> str:
    """Exports the trained model in `model_dir` as `export_base/<next version>`.

    Returns the version directory. Verification is a separate step: the caller runs
    `verify_export` when `config.verify` is set (as `recsys-cvae export` does).
    """
    metrics = posixpath.join(model_dir, METRICS_FILE)
    model = load_trained_model(model_dir)
    provenance = build_provenance(model_dir)
    policy = None
    if config.policy:
        items_file = next((i["path"] for i in provenance["data"]["inputs"]
                           if i["role"] == "items"), "")
        inputs = S.serving_inputs(model.spec)
        # a categorical column the model reads as sent: values outside its vocabulary are
        # unknown to the model, so a rule's when_unknown covers them (a derived one: not)
        vocabularies = {i.name: model.spec.attribute_vocabulary(i.name) for i in inputs
                        if i.is_categorical and i.attributes == (i.name,)
                        and not model.spec.attribute(i.name).is_derived}
        policy = load_policy(config.policy, list(model.item_ids),
                             {i.name: i.is_categorical for i in inputs}, items_file, vocabularies)
        if policy.deny_unknown:
            logger.warning("%s: %d denied id(s) are not in the catalogue, e.g. %r (never "
                           "recommended anyway; a typo?)", config.policy, len(policy.deny_unknown),
                           policy.deny_unknown[0])
        logger.info("policy %s: %d items denied, %d rule(s)", config.policy, len(policy.deny),
                    len(policy.rules))
    return write_export(model, export_base, config.top_k,
                        training_metrics=metrics if tf.io.gfile.exists(metrics) else None,
                        chunk_size=config.top_k_chunk_size,
                        trained_on=read_trained_on(model_dir),
                        provenance=provenance, policy=policy)


def write_export(
    model: tf.keras.Model,
    export_base: str,
    top_k: int,
    training_metrics: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    trained_on: dict | None = None,
    provenance: dict | None = None,
    policy: Policy | None = None,
) -> str:
    """Saves `ServingModule(model, top_k, chunk_size)` atomically as the next version under
    `export_base`.

    The SavedModel (plus `assets.extra/`: the feature spec, the vocabularies, warmup requests,
    `export_info.json` with `trained_on`, what fitted the model, a copy of
    `training_metrics`, `provenance.json` and `policy.json` if given) is written to
    `export_base/.tmp-export-<uuid>` and renamed to `export_base/<max existing integer
    version + 1>` (1 for an empty base).
    """
    module = ServingModule(model, top_k, chunk_size, policy=policy)
    tf.io.gfile.makedirs(export_base)
    temp_dir = posixpath.join(export_base, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        # Serving never differentiates: leave out the custom gradients of the training-only
        # maths (`layers.binary_history_product`'s is a sort by item, which would put a
        # TopKV2 into `encode`'s function library for nothing).
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        tf.saved_model.save(module, temp_dir, signatures=module.signatures(), options=options)
        _write_assets_extra(module, posixpath.join(temp_dir, ASSETS_EXTRA), trained_on or {})
        if training_metrics is not None:
            tf.io.gfile.copy(training_metrics, posixpath.join(
                temp_dir, ASSETS_EXTRA, posixpath.basename(training_metrics)))
        if policy is not None:
            S.write_text(posixpath.join(temp_dir, ASSETS_EXTRA, POLICY_FILE), json.dumps(
                policy.to_json(module.model.item_ids), indent=2) + "\n")
        if provenance is not None:
            write_provenance(temp_dir, {
                **provenance, "policy": None if policy is None else policy.summary()})
            write_model_card(temp_dir)
        export_dir = rename_to_next_version(temp_dir, export_base)
    except Exception:
        if tf.io.gfile.exists(temp_dir):
            tf.io.gfile.rmtree(temp_dir)
        raise
    logger.info("exported SavedModel to %s (top_k=%d)", export_dir, module.top_k)
    return export_dir


def _write_assets_extra(module: ServingModule, directory: str, trained_on: dict) -> None:
    """What a reader of the export needs without the features directory or this package."""
    spec: S.FeatureSpec = module.model.spec
    tf.io.gfile.makedirs(posixpath.join(directory, "vocab"))
    S.write_text(posixpath.join(directory, S.SPEC_FILE), json.dumps(spec.to_json(), indent=2))
    S.write_vocabulary(posixpath.join(directory, "vocab", "items.txt"), module.model.item_ids)
    for attribute in module.attributes:
        if attribute.is_categorical:
            source = spec.path(attribute.vocabulary_file)
            if tf.io.gfile.exists(source):
                target = posixpath.join(directory, attribute.vocabulary_file)
                tf.io.gfile.makedirs(posixpath.dirname(target))
                tf.io.gfile.copy(source, target, overwrite=True)
    info = {
        "top_k": module.top_k,
        "top_k_chunk_size": module.chunk_size,
        "num_items": len(module.model.item_ids),
        "signatures": list(SIGNATURES),
        "scores": "log-softmax of the decoder logits over the whole catalogue",
        "trained_on": trained_on,
    }
    S.write_text(posixpath.join(directory, EXPORT_INFO_FILE), json.dumps(info, indent=2) + "\n")
    write_warmup_requests(posixpath.join(directory, WARMUP_FILE), module.input_specs())
