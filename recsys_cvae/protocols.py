"""The one protocol planner: for every split, which protocol's model answers it and which split
fits and tunes that model.

Why one module: a protocol's test users may be another protocol's training users (weak: every
warm user trains; temporal: everyone's history before the cut trains), so a model fitted on
the wrong protocol's train split has seen the targets it is scored on. The CVAE runs, the
baselines, the candidates and the evaluation must therefore agree on the same answer, and they
all ask here. It sits with the contracts at the bottom of the package (it reads only the
feature spec and the config), so every stage can ask it without importing a later one.

The rules:
- every protocol with a train role is fitted on its own train split and tuned on its own
  validation split (when that split exists and has users), and answers its own test split;
- the main protocol (`train.protocol`, or the feature spec's primary one) also answers the
  test split of every protocol without a train role (cold start, through `generate`) and any
  extra split asked for (`candidates.splits`, `evaluate.splits`) that no other trainable
  protocol tests;
- the CVAE is fitted only for the protocols `train.protocols` chooses (it costs a training
  run each); the in-memory baselines for every trainable protocol with something to answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from recsys_cvae import spec as S
from recsys_cvae.config import Config, ConfigError, EvaluateConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class ProtocolFit:
    """One model of a plan.

    Attributes:
      protocol: the protocol whose splits fit it.
      train: the split it is fitted on.
      validation: the split that tunes it (best epoch, λ, blend weight), or None when the
        protocol has none or it has no users.
      splits: the splits it answers, its own test split first (may be empty: nothing to score).
      main: the main protocol's model (the served one, which also answers cold start).
    """

    protocol: str
    train: str
    validation: str | None
    splits: tuple[str, ...]
    main: bool


def trainable(spec: S.FeatureSpec) -> list[str]:
    """Protocols with a train role, in the spec's order."""
    return [p for p, roles in spec.protocols.items() if "train" in roles]


def test_split(spec: S.FeatureSpec, protocol: str) -> str | None:
    """The protocol's test split when the features hold it, else None."""
    split = spec.protocols.get(protocol, {}).get("test")
    return split if split in spec.splits else None


def train_split(spec: S.FeatureSpec, protocol: str) -> str:
    """The split that trains `protocol`'s model; the primary protocol's for one without
    (cold start is answered by a model trained elsewhere). Popularity statistics of a
    split's evaluation come from here too."""
    return spec.protocols.get(protocol, {}).get("train") or spec.protocol_split("train")


def fit_splits(spec: S.FeatureSpec, protocol: str = "") -> tuple[str, str | None]:
    """(train split, validation split or None) of `protocol` ("" = the spec's primary one)."""
    training = spec.protocol_split("train", protocol or None)
    try:
        validation = spec.protocol_split("validation", protocol or None)
    except S.SpecError:
        return training, None
    split = spec.splits.get(validation)
    return training, validation if split is not None and split.users > 0 else None


def refit_splits(spec: S.FeatureSpec) -> tuple[str, ...]:
    """The splits that together hold every user the feature job kept, each user once and with
    every interaction (history + targets): the strong protocol's train, validation and test
    splits and the cold users. What the serving refit learns from (`training.refit`); () when
    the features have no strong protocol (its splits are the only disjoint cover)."""
    strong = spec.protocols.get(S.STRONG)
    if not strong:
        return ()
    roles = [strong.get(role) for role in ("train", "validation", "test")]
    cold = spec.protocols.get(S.COLD_START, {}).get("test")
    return tuple(s for s in [*roles, cold] if s and s in spec.splits and spec.splits[s].users)


def main_protocol(spec: S.FeatureSpec, settings: TrainConfig) -> str:
    """`train.protocol`, or the spec's primary protocol; it must have a train split."""
    main = settings.protocol or spec.protocol
    if main not in trainable(spec):
        raise ConfigError(
            f"train.protocol {main!r} has no train split; protocols with one: {trainable(spec)}"
        )
    return main


def cvae_protocols(spec: S.FeatureSpec, settings: TrainConfig) -> tuple[str, list[str]]:
    """(main protocol, the protocols that get a CVAE, in the spec's order).

    `settings.protocols` empty: every protocol with a train split, or only `settings.protocol`
    when that is set. The main protocol must be among the chosen ones: its model is the one
    served and the one for cold start.
    """
    main = main_protocol(spec, settings)
    available = trainable(spec)
    if settings.protocols:
        wanted = list(dict.fromkeys(settings.protocols))
    elif settings.protocol:
        wanted = [settings.protocol]
    else:
        wanted = available
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise ConfigError(
            f"train.protocols names {unknown}, which have no train split in the features; "
            f"choose from {available} (cold start is answered by the main protocol's model)"
        )
    if main not in wanted:
        raise ConfigError(
            f"train.protocols {wanted} leaves out the main protocol {main!r}, whose model is "
            f"served and answers cold start; add it, or set train.protocol to one of {wanted}"
        )
    return main, [p for p in available if p in wanted]


def plan(
    spec: S.FeatureSpec, main: str, fitted: Sequence[str], extra_splits: Sequence[str]
) -> list[ProtocolFit]:
    """The models to fit, main protocol first, and what each answers (see the rules above).

    Args:
      main: the main protocol (in `fitted`).
      fitted: the protocols that get a model.
      extra_splits: splits the main model answers besides its own test split, unless another
        trainable protocol tests them (that protocol's model answers them, or nobody). Not
        checked against the features: a split asked for that they lack fails where it is read.
    """
    tested_by_others = {
        split for p in trainable(spec) if p != main and (split := test_split(spec, p))
    }
    fits = []
    for protocol in [main] + [p for p in fitted if p != main]:
        own = [split] if (split := test_split(spec, protocol)) else []
        if protocol == main:
            own += [s for s in extra_splits if s not in tested_by_others]
        training, validation = fit_splits(spec, protocol)
        fits.append(
            ProtocolFit(protocol, training, validation, tuple(dict.fromkeys(own)), protocol == main)
        )
    return fits


def cvae_plan(spec: S.FeatureSpec, config: Config) -> list[ProtocolFit]:
    """One CVAE per protocol `train.protocols` chooses; the main one also answers
    `candidates.splits` (cold start by default)."""
    main, chosen = cvae_protocols(spec, config.train)
    # Features without user attributes hold no cold split (nothing to condition on): the
    # default ask for it lapses; any other split asked for fails where it is read.
    extra = [s for s in config.candidates.splits if s in spec.splits or s != S.COLD]
    return plan(spec, main, chosen, extra)


def baseline_plan(spec: S.FeatureSpec, config: Config) -> list[ProtocolFit]:
    """One fit of each baseline per trainable protocol that answers something: every test
    split, with the main protocol's fit answering cold start and `evaluate.splits`."""
    main = main_protocol(spec, config.train)
    fitted = trainable(spec)
    untrained_tests = [test_split(spec, p) for p in spec.protocols if p not in fitted]
    asked = [s for s in config.evaluate.splits if s in spec.splits]  # scored only if present
    extra = [s for s in untrained_tests if s] + asked
    return [fit for fit in plan(spec, main, fitted, extra) if fit.splits]


def evaluation_splits(spec: S.FeatureSpec, config: EvaluateConfig) -> dict[str, str]:
    """split -> protocol: the test split of every protocol the spec has, then any extra
    config.splits present in the spec (labelled by the protocol they belong to, or `extra`)."""
    out: dict[str, str] = {}
    for protocol in spec.protocols:
        split = test_split(spec, protocol)
        if split:
            out[split] = protocol
    for split in config.splits:
        if split in spec.splits and split not in out:
            owner = [p for p, roles in spec.protocols.items() if split in roles.values()]
            out[split] = owner[0] if owner else "extra"
    return out
