"""Configuration: one dataclass per stage, read from one TOML file, overridable on the CLI.

Defaults live here and nowhere else. A TOML file has one table per stage:

    [features]
    min_rating = 4.0
    [model]
    latent_dim = 128
    [train]
    epochs = 50

and `--set model.latent_dim=64` on any subcommand overrides one field. The resolved
config is written next to the artefacts it produced (`model/config.json`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config file or override names an unknown field or a value of the wrong type."""


@dataclasses.dataclass
class FeaturesConfig:
    """How the Beam job turns raw logs into per-user examples.

    Attributes:
      min_rating: interactions rated below this are dropped; None keeps every interaction.
      min_user_interactions: users with fewer (kept) interactions are not used for training.
      min_item_interactions: items seen fewer times are left out of the vocabulary.
      validation_fraction: share of users held out to choose the best epoch.
      test_fraction: share of users held out for the reported metrics.
      cold_fraction: share of users held out as cold start (served from attributes only).
      target_fraction: share of an evaluation user's items held out as targets.
      seed: hashes users and items into splits; the same seed gives the same splits anywhere.
      max_bad_fraction: the job stops when more than this share of a file's rows is bad.
      categorical: column names forced to categorical (e.g. numeric-looking zip codes).
      numeric: column names forced to numeric.
      drop_attributes: users-table columns to ignore.
      num_shards: TFRecord shards for the training split; 0 picks one per ~50k users.
      protocols: evaluation protocols to write (strong, weak, temporal, cold); empty = every
        one the data supports (temporal needs timestamps).
      temporal_cut_quantile: the temporal protocol's cut, as a quantile of the timestamps.
      context_features: add user-context features from the logs (activity, tenure, recency,
        mean rating, time-of-day and day-of-week shares) as numeric attributes.
      max_filter_rounds: rounds of the min-interactions-per-user/item filter (it stops
        earlier at its fixed point).
      num_buckets: user buckets the job groups by; more spreads wider on a cluster.
      numeric_quantiles: numeric attributes also get this many training-quantile buckets
        (boundaries stored in the feature spec; the model embeds the bucket beside the
        standardised value, so non-monotone effects such as a taste peaking in middle age
        are learnable); 0 or 1: the standardised value only.
      recency_half_life_days: write `history_weights`, 0.5 ** (age / half-life) per history
        item (age from the latest event, or the temporal cut); None writes no weights.
    """

    min_rating: float | None = None
    min_user_interactions: int = 5
    min_item_interactions: int = 1
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    cold_fraction: float = 0.05
    target_fraction: float = 0.2
    seed: int = 42
    max_bad_fraction: float = 0.1
    categorical: list[str] = dataclasses.field(default_factory=list)
    numeric: list[str] = dataclasses.field(default_factory=list)
    drop_attributes: list[str] = dataclasses.field(default_factory=list)
    num_shards: int = 0
    protocols: list[str] = dataclasses.field(default_factory=list)
    temporal_cut_quantile: float = 0.8
    context_features: bool = False
    max_filter_rounds: int = 10
    num_buckets: int = 64
    numeric_quantiles: int = 10
    recency_half_life_days: float | None = None


@dataclasses.dataclass
class ModelConfig:
    """Shape of the CVAE.

    Attributes:
      latent_dim: size of z.
      hidden_dims: encoder layers (the decoder mirrors them).
      embedding_dim: size of each attribute embedding (categorical values, numeric
        buckets); 0 = by the attribute's number of values, ⌈6 · n^¼⌉ between 4 and 64.
      condition_dim: size of the condition vector c after the cross layer.
      condition_skip: c also feeds the decoder's output layer directly (a wide, linear path
        from the attributes to every item's logit, `layers.Decoder`).
      num_cross_layers: DCN cross layers over the attribute features.
      input_dropout: dropout on the normalised history, as in Mult-VAE.
      conditional_prior: learn p(z|c); False uses N(0, I) (the Mult-VAE prior).
      use_condition: feed c to encoder and decoder; False gives plain Mult-VAE.
      likelihood: `multinomial` (Mult-VAE), `gaussian` or `logistic`.
      linear_branch_max_items: add the EASE-style item-item branch (logits += x·B) when the
        catalogue has at most this many items (B costs num_items² floats); 0 never.
      linear_l2: L2 weight on B per example (EASE's λ divided by the number of users).
      linear_init: `zeros`, or `ease`: start B at EASE's closed form on the training users
        (then trained jointly).
      linear_init_l2: EASE's λ for that closed form.
      linear_blend_lambdas: after training, add α · (EASE(λ) + r · S) to the branch
        (`recsys_cvae.training.linear_blend`): λ is the one of these that ranks the fold-in
        slice best (`linear_blend_held_out_share`), α the one of `linear_blend_weights`
        that ranks the slice and the validation users best, the CVAE's logits included
        (α = 0 is always a candidate); [] turns the whole linear term off.
      linear_blend_weights: the α tried against the CVAE's logits.
      linear_blend_held_out_share: the share of each training user's history a protocol
        model leaves out of training (the same items every pass, drawn from a fingerprint of
        user and item) so the blend can be chosen on it: the fold-in slice. With ML-100K's
        ~85 validation users alone, α was chosen from ~1,700 held-out items and on one
        split seed (4) picked no EASE at all (served 0.926 × EASE); the slice adds ~6,000.
        The serving refit trains on everything.
      linear_blend_dropouts: EDLAE's dropout emphasis p tried for each λ (Λ = λI + p/(1−p) ·
        diag(XᵀX), `recsys_cvae.model.ease`); 0 is EASE itself. Off by default: on the
        deployment benchmark [0, 0.33, 0.5] served 0.994 × EASE against 0.998 × with EASE
        alone (validation picked EDLAE, which then ranked the test users slightly worse).
      low_pass_ranks: the ranks tried for S, the item graph's low-pass filter
        (`recsys_cvae.model.low_pass`; ranks from a quarter of min(users, items) up are
        skipped); (rank, β, r) is chosen on the fold-in slice against EASE at its λ, and no
        filter is always a candidate. [] turns the filter off.
      low_pass_exponents: the item-degree exponent β tried (0.5 is GF-CF's symmetric
        normalisation; 0.3 ranked better on ML-100K). Each costs one eigendecomposition
        of an items × items matrix.
      low_pass_weights: the r tried, as multiples of the ratio of EASE's score spread to
        x · S's, so the grid does not depend on the scale.
      low_pass_shape: `cosine` weights the filter's directions ½(1 + cos(π i / rank)), so the
        rank is no knife-edge; `ideal` keeps the first `rank` at 1 (GF-CF's). With NumPy on
        the deployment split (seeds 0-5) the taper ranked 1.030 × EASE at its best, ideal
        1.024 ×.
      prior_reconstruction_weight: w in loss += w · −log p(x | z_p, c), z_p ~ p(z|c) (Sohn et
        al.'s hybrid CVAE/GSNN objective): trains the path `generate` uses (cold start,
        what-if) directly. 0 turns it off; needs the conditional prior.
      prior_reconstruction_fraction: share f of each training batch that gets that term (it
        costs a second decoder pass; the term is rescaled so its estimate stays unbiased);
        0 = by data size: 1 up to 20k training users, else 0.125.
      use_history_weights: use the examples' `history_weights` (rating/recency) as x when
        the feature job wrote them; otherwise x is the 0/1 history.
      sampled_softmax_negatives: 0 trains on the full softmax over the catalogue; N > 0
        trains on a sampled softmax over the batch's history items plus N shared negatives
        (logQ-corrected; validation and serving still use the full softmax). For catalogues
        of ~100k items and more; needs the multinomial likelihood and no item-item branch.
      attribute_lift: after training, add γ · Σ_a w_a · lift_a(i | value of a) to the
        logits, lift = log p(i | a = v) / p(i) counted on the training users (shrunk towards
        popularity by `attribute_lift_pseudo_users`); κ and the per-attribute w_a chosen on
        the training users leave-one-out, γ on validation separately for `generate` (cold)
        and `recommend` (warm); γ = 0 is always a candidate
        (`recsys_cvae.training.attribute_blend`).
      attribute_lift_pseudo_users: the shrinkage κ tried, in users: a segment of n users
        moves n / (n + κ) of the way from popularity to its own item distribution.
      attribute_lift_weights: the w_a and γ tried.
      attribute_lift_decoder_weights: the δ tried for `generate` (the decoder's share).
      attribute_lift_popularity_weights: unused since log-popularity joined the counting
        term (`generate` = δ · decoder + γ · (log p + Σ_a w_a lift_a)); kept so configs that
        set it still load.
      attribute_lift_max_cells: the lift tables hold num_items × (values of every
        attribute) floats; attributes are left out, largest first, until they fit this.
      attribute_lift_coarse_buckets: each bucketised numeric attribute is also counted with
        its quantile buckets merged into this many (0: not), its weight chosen with the
        others'; thin fine buckets are what it answers (`attribute_lift.coarse_buckets`).
      sampled_softmax_sampler: how negatives are drawn: `log_uniform` (Zipf over the
        vocabulary's most-frequent-first order, a popularity proxy) or `uniform`.
    """

    latent_dim: int = 200
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [600])
    embedding_dim: int = 0
    condition_dim: int = 64
    condition_skip: bool = False
    num_cross_layers: int = 1
    input_dropout: float = 0.5
    conditional_prior: bool = True
    use_condition: bool = True
    likelihood: str = "multinomial"
    linear_branch_max_items: int = 5000
    linear_l2: float = 0.3
    linear_init: str = "zeros"
    linear_init_l2: float = 500.0
    linear_blend_lambdas: list[float] = dataclasses.field(
        default_factory=lambda: [100.0, 250.0, 500.0, 1000.0]
    )
    linear_blend_weights: list[float] = dataclasses.field(
        default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
    )
    linear_blend_dropouts: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    linear_blend_held_out_share: float = 0.1
    low_pass_ranks: list[int] = dataclasses.field(
        default_factory=lambda: [8, 16, 24, 32, 64, 128, 256]
    )
    low_pass_exponents: list[float] = dataclasses.field(default_factory=lambda: [0.3])
    low_pass_weights: list[float] = dataclasses.field(
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.75, 1.0]
    )
    low_pass_shape: str = "cosine"
    prior_reconstruction_weight: float = 2.0
    prior_reconstruction_fraction: float = 0.0
    use_history_weights: bool = True
    sampled_softmax_negatives: int = 0
    sampled_softmax_sampler: str = "log_uniform"
    attribute_lift: bool = True
    attribute_lift_pseudo_users: list[float] = dataclasses.field(
        default_factory=lambda: [3.0, 10.0, 30.0, 100.0]
    )
    attribute_lift_weights: list[float] = dataclasses.field(
        default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0]
    )
    attribute_lift_decoder_weights: list[float] = dataclasses.field(
        default_factory=lambda: [1.0, 0.5, 0.25, 0.0]
    )
    attribute_lift_popularity_weights: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 0.5, 1.0]
    )
    attribute_lift_max_cells: int = 50_000_000
    attribute_lift_coarse_buckets: int = 4


@dataclasses.dataclass
class TrainConfig:
    """How the CVAE is fitted.

    Attributes:
      epochs: maximum passes over the training users (early stopping usually ends sooner).
      batch_size: global batch size (split across replicas); 0 picks it from the data size
        (128 up to 20,000 training users, else 512; see `train.adapt_to_data`).
      learning_rate: Adam learning rate.
      beta_cap: final KL weight β (0.4: best of 0.1/0.2/0.4/0.8 for the served model on
        MovieLens-100K, 3 split seeds, and planted data, `benchmarks/bench_deployment.py`).
      beta_anneal_steps: optimizer steps over which β rises linearly from 0 to beta_cap;
        -1 spreads the rise over all `epochs` (whatever the data size). With early stopping
        on validation NDCG@10 this is Mult-VAE's way of choosing β on validation: the best
        epoch's β (`best_beta` in training_metrics.json) is the chosen cap.
      strategy: `auto`, `default`, `mirrored` or `multi_worker`.
      num_logical_cpus: with `mirrored` and no GPU, split the CPU into this many devices.
      collective: how `multi_worker` all-reduces gradients: `ring` (gRPC between workers,
        CPUs), `nccl` (GPUs), `auto` (TensorFlow picks).
      collective_bytes_per_pack: gradients are packed into all-reduces of about this many
        bytes (0: TensorFlow's default, one per tensor group). Measured on two local workers
        (`benchmarks/bench_allreduce.py`, 52 MB of gradients a step): ring with 32 MB packs
        all-reduces in 0.23 s against 0.43 s for auto, and the step takes 0.46 s, not 0.66.
      gradient_dtype: what gradients travel in between replicas: `auto` (bfloat16 between
        `multi_worker` workers, float32 between one machine's devices), `float32`, `bfloat16`
        (`recsys_cvae.model.gradient_exchange`).
      item_item_gradient: how replicas exchange the item-item branch's `[items, items]`
        gradient: `gathered` (all-gather each replica's x and dy, 2 × batch × items numbers,
        and multiply locally), `dense` (all-reduce the matrix), `auto` (gathered when that
        sends less: 2 × global batch < items).
      early_stopping_patience: epochs without a better validation NDCG@10 before stopping.
      seed: TensorFlow and Python seeds.
      verbose: Keras progress output (0 silent, 1 bar, 2 one line per epoch); the bar is left
        out when stdout is not a terminal (the epoch's log line says the same).
      mixed_precision: compute in float16 (`mixed_float16`, for GPUs) with float32 logits
        and loss; variables stay float32.
      protocol: the main protocol, whose CVAE answers cold start in the evaluation and whose
        selected settings the served model reuses; "" the spec's primary. Set alone, it is
        the only protocol trained.
      protocols: protocols that get their own CVAE, each fitted on its train split and scored
        on its test split (`recsys_cvae.pipeline.cvae_runs`, under `W/protocols/<name>/`);
        empty: every protocol with a train split (or only `protocol` when that is set).
        Must include the main protocol; `["strong"]` trains the primary one only (large data).
      serving_refit: the served model (`W/model`, `W/export`) is refitted on all the data —
        every user, every interaction — with the main protocol model's selected epochs, β and
        blend (`recsys_cvae.training.refit`); the protocol models stay what the evaluation
        scores. false: the main protocol model itself is served (in `W/model`, `W/export`).
    """

    epochs: int = 100
    batch_size: int = 0
    learning_rate: float = 1e-3
    beta_cap: float = 0.4
    beta_anneal_steps: int = -1
    strategy: str = "auto"
    num_logical_cpus: int = 2
    collective: str = "ring"
    collective_bytes_per_pack: int = 32 << 20
    gradient_dtype: str = "auto"
    item_item_gradient: str = "auto"
    early_stopping_patience: int = 10
    seed: int = 1234
    verbose: int = 1
    mixed_precision: bool = False
    protocol: str = ""
    protocols: list[str] = dataclasses.field(default_factory=list)
    serving_refit: bool = True


@dataclasses.dataclass
class ExportConfig:
    """What goes into the SavedModel.

    Attributes:
      top_k: how many items each signature returns.
      top_k_chunk_size: catalogues larger than this are ranked this many items at a time,
        with a running top-K merge, in calls whose batch × num_items logits pass 16 MB
        (logits memory batch × chunk, not batch × num_items; same results); 0 never.
      verify: reload the export in a fresh process and compare with the in-process model.
      policy: a policy TOML file (`recsys_cvae.export.policy`: denied items, category rules
        by user attribute) baked into every signature; empty: none.
    """

    top_k: int = 100
    top_k_chunk_size: int = 8192
    verify: bool = True
    policy: str = ""


@dataclasses.dataclass
class CandidatesConfig:
    """Batch candidate generation with Beam RunInference.

    Attributes:
      splits: splits the main protocol's CVAE answers besides every trained protocol's test
        split (cold start: `generate`); `candidates --export-dir` writes exactly these.
      min_batch_size: smallest batch handed to the model (users per signature call).
      max_batch_size: largest batch; equal to min_batch_size fixes the batch size, which
        skips BatchElements' ramp-up from small batches. 128 is fastest per user here:
        larger batches spill the [batch, num_items] score tensors out of the CPU caches
        (docs/scaling.md, "Batch candidates").
      share_model_across_processes: load one SavedModel per machine, not per worker process
        (Beam's `large_model`): workers call it through a proxy, which saves memory and
        lets TensorFlow use every core from one process under multi_processing.
    """

    splits: list[str] = dataclasses.field(default_factory=lambda: ["test", "cold"])
    min_batch_size: int = 128
    max_batch_size: int = 128
    share_model_across_processes: bool = False


@dataclasses.dataclass
class EvaluateConfig:
    """Offline evaluation.

    Attributes:
      ks: cut-offs for the ranking metrics.
      splits: which splits to score (and to write baseline candidates for).
      baselines: which baselines `build_baselines` writes by default; `two_tower` (TFRS) and
        `multvae` (the CVAE without conditioning, a full training run) are opt-in.
      selection_metric: the one validation metric that picks every model's settings: the
        CVAE's best epoch and EASE blend weight, baseline settings (EASE λ, segment), and the
        baseline each model is paired with in the report. `<metric>@k`, e.g. `ndcg@10`.
      ease_lambdas: L2 strengths tried for EASE on the validation split.
      segment_prior_users: segment popularity shrinks towards global popularity with the
        weight of this many users (small segments fall back to global popularity).
      numeric_bins: numeric attributes are cut into this many training-quantile bins to
        form segments.
      bootstrap_replicates: Poisson-bootstrap replicates for the 95% intervals and the paired
        test against the best baseline.
      seed: bootstrap seed (the same for every model, so their replicates are paired).
      items_file: item metadata (items.csv, u.item, movies.dat or their folder) for
        intra-list diversity; empty: the --data-dir of the run, if any.
      batch_rows: candidate rows scored at a time (bounds evaluation memory).
      knn_neighbours: ItemKNN keeps this many most similar items per item (0 = all).
    """

    ks: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20, 50, 100])
    splits: list[str] = dataclasses.field(default_factory=lambda: ["test", "cold"])
    baselines: list[str] = dataclasses.field(
        default_factory=lambda: ["popularity", "segment_popularity", "item_knn", "ease"]
    )
    selection_metric: str = "ndcg@10"
    ease_lambdas: list[float] = dataclasses.field(
        default_factory=lambda: [1.0, 10.0, 50.0, 200.0, 500.0, 2000.0]
    )
    segment_prior_users: float = 10.0
    numeric_bins: int = 4
    bootstrap_replicates: int = 200
    seed: int = 0
    items_file: str = ""
    batch_rows: int = 65536
    knn_neighbours: int = 100


@dataclasses.dataclass
class MonitorConfig:
    """When `recsys-cvae monitor` fails a comparison (`recsys_cvae.monitoring.drift`).

    Attributes:
      item_jsd_max: largest Jensen–Shannon divergence (bits, 0..1) of the item distributions.
      item_psi_max: largest PSI over ten bands of items by reference exposure (0.25: the
        usual "significant shift").
      score_psi_max: largest PSI of the top-1 score over the reference's deciles.
      coverage_drop_max: the current coverage must be at least (1 − this) × the reference's.
      gini_rise_max: the current Gini of exposure may exceed the reference's by this much.
      popularity_rise_max: the mean reference popularity of what is recommended may rise by
        this share.
      segment_jsd_max: largest JSD of one attribute segment's item distribution.
      min_segment_users: segments with fewer users in either set are listed, not checked.
    """

    item_jsd_max: float = 0.1
    item_psi_max: float = 0.25
    score_psi_max: float = 0.25
    coverage_drop_max: float = 0.2
    gini_rise_max: float = 0.05
    popularity_rise_max: float = 0.2
    segment_jsd_max: float = 0.2
    min_segment_users: int = 30


@dataclasses.dataclass
class Config:
    """Every stage's settings; the TOML file's tables have these names."""

    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    candidates: CandidatesConfig = dataclasses.field(default_factory=CandidatesConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def read_toml(path: str, what: str = "config", error: type[ValueError] = ConfigError) -> dict:
    """A TOML file as a dict; a missing or invalid file is one line naming it (`error`)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except tomllib.TOMLDecodeError as decode_error:
        raise error(f"{path}: not valid TOML ({decode_error})") from None


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Reads a TOML file (optional) and applies `section.field=value` overrides in order."""
    config = Config()
    if path:
        data = read_toml(path)
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for name, value in values.items():
                _assign(config, section, name, value, where=path)
    for override in overrides:
        key, sep, text = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {override!r}: expected section.field=value")
        _assign(config, section, name, _parse_override(text.strip()), where="--set")
    return config


def _parse_override(text: str) -> Any:
    """`--set` values are TOML values (`0.5`, `true`, `[1, 2]`, `"x"`), else plain strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(config: Config, section: str, name: str, value: Any, where: str) -> None:
    stage = getattr(config, section, None)
    if stage is None or not dataclasses.is_dataclass(stage):
        sections = [f.name for f in dataclasses.fields(Config)]
        raise ConfigError(
            f"{where}: unknown config section {section!r}; expected one of {sections}"
        )
    fields = {f.name: f for f in dataclasses.fields(stage)}
    if name not in fields:
        raise ConfigError(
            f"{where}: unknown field {section}.{name}; {section} has {sorted(fields)}"
        )
    hint = typing.get_type_hints(type(stage))[name]
    value = _coerce(value, hint, f"{section}.{name}", where)
    _check_bounds(f"{section}.{name}", value, where)
    setattr(stage, name, value)


# Fields whose value has a floor the code below relies on: (smallest value, what it means).
# Checked where the value is read, so the message names the field, not a Keras argument.
_LOWER_BOUNDS = {
    "train.epochs": (1, "at least one pass over the training users"),
    "train.batch_size": (0, "0 picks it from the data size"),
    "train.early_stopping_patience": (0, "0 stops at the first epoch without a gain"),
    "train.num_logical_cpus": (1, "at least one device"),
    "train.collective_bytes_per_pack": (0, "0 is TensorFlow's default packing"),
    "model.latent_dim": (1, "at least one latent dimension"),
    "model.condition_dim": (1, "at least one unit"),
    "export.top_k": (1, "at least one item per answer"),
    "candidates.min_batch_size": (1, "at least one user per call"),
    "candidates.max_batch_size": (1, "at least one user per call"),
    "features.min_user_interactions": (1, "a user needs an interaction to train"),
    "features.min_item_interactions": (1, "an item needs an interaction to be learnt"),
    "evaluate.bootstrap_replicates": (0, "0 reports no intervals"),
}
_POSITIVE = {"train.learning_rate"}
# Shares that must lie strictly between 0 and 1.
_SHARES = {"model.linear_blend_held_out_share"}
# Text fields that take one of a few values.
_CHOICES = {"model.low_pass_shape": ("cosine", "ideal")}
# List fields whose every entry must pass a test: (test, what the entries may be).
_LIST_BOUNDS = {
    "model.linear_blend_dropouts": (lambda rate: 0.0 <= rate < 1.0,
                                    "rates from 0 up to (not including) 1"),
    "model.low_pass_exponents": (lambda number: 0.0 <= number <= 1.0, "numbers from 0 to 1"),
    "model.low_pass_ranks": (lambda number: number > 0, "numbers above 0"),
}


def _check_bounds(key: str, value: Any, where: str) -> None:
    if key in _LOWER_BOUNDS and value < _LOWER_BOUNDS[key][0]:
        floor, meaning = _LOWER_BOUNDS[key]
        raise ConfigError(f"{where}: {key} must be at least {floor} ({meaning}), got {value}")
    if key in _POSITIVE and not value > 0:
        raise ConfigError(f"{where}: {key} must be more than 0, got {value}")
    if key in _SHARES and not 0.0 < value < 1.0:
        raise ConfigError(f"{where}: {key} must be between 0 and 1 (not including them), "
                          f"got {value}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}: {key} takes one of {', '.join(_CHOICES[key])}, "
                          f"got {value!r}")
    if key in _LIST_BOUNDS:
        test, allowed = _LIST_BOUNDS[key]
        if not all(test(entry) for entry in value):
            raise ConfigError(f"{where}: {key} takes {allowed}, got {value}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} expects a list, got {value!r}")
        return [_coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: {key} expects true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} expects a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} expects {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: {key} expects a whole number, got {value!r}")
        return number
    if hint is str:
        return str(value)
    return value
