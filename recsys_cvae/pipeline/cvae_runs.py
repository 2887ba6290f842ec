"""One CVAE per planned protocol: where each lives, training, exporting and candidates of all.

Which protocols get a CVAE and which splits each answers is `recsys_cvae.protocols`'s
decision (`cvae_plan`); this module puts each planned model in its folders and runs the
stages over all of them:

    W/protocols/<protocol>/model/, .../export/<v>/   every chosen protocol's CVAE (the main
                                                     one also answers cold start)
    W/model/, W/export/<v>/                          the served CVAE: the main protocol's
                                                     settings refitted on all the data
                                                     (`training.refit`; `train.serving_refit`)
    W/candidates/cvae/<split>-*.parquet              each protocol's test split from its own model
    W/candidates/cvae/sources.json                   split -> protocol, model_dir, export_dir

With `train.serving_refit = false` the main protocol's CVAE itself is served, in W/model and
W/export, as the only one outside W/protocols/.

`train.protocols` limits which protocols get a CVAE (empty: every protocol with a train
split; `["strong"]` trains the primary one only, for data where one training run is all
there is time for).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections.abc import Callable
from typing import Any

from recsys_cvae import candidates_format as C
from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae.config import Config, ExportConfig
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.export.verification import verify_export
from recsys_cvae.export_layout import newest_export
from recsys_cvae.training.fit import train
from recsys_cvae.training.refit import refit

log = logging.getLogger(__name__)

PROTOCOLS_DIR = "protocols"

# generate_candidates(version_dir, features_dir, candidates_dir, candidates_config, *,
#   model_name, pipeline_args, save_main_session) -> {split: users written}: the Beam
# RunInference job (`beam_jobs.candidates.generate_candidates`), handed in by the CLI.
CandidatesJob = Callable[..., dict[str, int]]


SERVING = "serving"  # the label of the served refit in results and exports


@dataclasses.dataclass(frozen=True)
class ProtocolModel:
    """One planned CVAE and its folders.

    Attributes:
      protocol: the protocol whose train (and validation) split it is fitted on; for the
        served refit, the protocol whose selected settings it reuses.
      model_dir: checkpoints and config.json (`train` writes the protocol into it).
      export_base: TF Serving base path its `export/<version>` goes under.
      splits: the splits it writes candidates for, its own test split first (none for the
        refit: it has seen every split's targets).
      main: the main protocol's model, which also answers cold start in the evaluation.
      served: its export is the one users get (W/model, W/export).
      refit: refitted on all the data after selection (`training.refit`).
    """

    protocol: str
    model_dir: str
    export_base: str
    splits: tuple[str, ...]
    main: bool
    served: bool = False
    refit: bool = False

    @property
    def label(self) -> str:
        return SERVING if self.refit else self.protocol


def plan_models(
    spec: S.FeatureSpec,
    config: Config,
    root: str,
    main_model_dir: str = "",
    main_export_base: str = "",
    suffix: str = "",
    serving_refit: bool | None = None,
) -> list[ProtocolModel]:
    """The CVAEs of `protocols.cvae_plan`, main protocol first, each with its folders, then
    the served refit when there is one.

    Args:
      root: the workdir; the protocol models go under `root/protocols/<protocol>/`, except
        the main one when it is served itself (no refit).
      main_model_dir, main_export_base: the served model's folders (default
        `root/model<suffix>`, `root/export<suffix>`).
      suffix: folder-name suffix for a variant of the model (Mult-VAE: `_multvae`).
      serving_refit: default `train.serving_refit`; off when the features have no split set
        covering every user (`protocols.refit_splits`).
    """
    refit = config.train.serving_refit if serving_refit is None else serving_refit
    refit = refit and bool(P.refit_splits(spec))
    served_model = main_model_dir or posixpath.join(root, f"model{suffix}")
    served_export = main_export_base or posixpath.join(root, f"export{suffix}")
    models = []
    for fit in P.cvae_plan(spec, config):
        if fit.main and not refit:
            model_dir, export_base = served_model, served_export
        else:
            folder = posixpath.join(root, PROTOCOLS_DIR, fit.protocol)
            model_dir = posixpath.join(folder, f"model{suffix}")
            export_base = posixpath.join(folder, f"export{suffix}")
        served = fit.main and not refit
        models.append(
            ProtocolModel(fit.protocol, model_dir, export_base, fit.splits, fit.main, served)
        )
    if refit:
        main = models[0].protocol
        models.append(ProtocolModel(main, served_model, served_export, (), False, True, True))
    return models


def protocol_config(config: Config, protocol: str) -> Config:
    """A copy of `config` that fits `protocol`, so the model's config.json records it."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, protocol=protocol))


def train_models(
    features_dir: str, models: list[ProtocolModel], config: Config
) -> dict[str, dict[str, Any]]:
    """Trains every planned CVAE in turn, the served refit last (it reuses its protocol model's
    selection); returns label (protocol, or `serving`) -> `train`'s summary."""
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        if model.refit:
            results[model.label] = refit(
                features_dir, model.model_dir, config, model.protocol, results[model.protocol]
            )
            continue
        log.info("training the %s protocol's CVAE into %s", model.protocol, model.model_dir)
        results[model.label] = train(
            features_dir, model.model_dir, protocol_config(config, model.protocol)
        )
    return results


def export_models(models: list[ProtocolModel], config: ExportConfig) -> dict[str, str]:
    """Exports every planned CVAE (and verifies it when `config.verify`); returns
    label (protocol, or `serving`) -> export version directory."""
    exports = {}
    for model in models:
        export_dir = export_model(model.model_dir, model.export_base, config)
        if config.verify:
            verify_export(export_dir, model.model_dir)
        exports[model.label] = export_dir
    return exports


def write_candidates(
    features_dir: str,
    candidates_dir: str,
    models: list[ProtocolModel],
    config: Config,
    generate_candidates: CandidatesJob,
    model_name: str = "cvae",
    pipeline_args: list[str] | None = None,
) -> dict[str, int]:
    """Beam RunInference candidates of every planned CVAE for its splits, all in
    `candidates_dir/<model_name>/`; returns split -> users written.

    Test splits of protocols left out of the plan are deleted from that folder, so it never
    holds a split answered by an older run's model; `sources.json` records which protocol's
    export answered each split.
    """
    spec = S.FeatureSpec.load(features_dir)
    written: dict[str, int] = {}
    sources: dict[str, dict[str, str]] = {}
    for model in (m for m in models if m.splits):
        version_dir = newest_export(model.export_base)
        if version_dir is None:
            raise FileNotFoundError(
                f"{model.export_base}: no export of the {model.protocol} protocol's CVAE; "
                f"run `recsys-cvae export` first"
            )
        splits = dataclasses.replace(config.candidates, splits=list(model.splits))
        written.update(
            generate_candidates(
                version_dir, features_dir, candidates_dir, splits, model_name=model_name,
                pipeline_args=pipeline_args, save_main_session=False,
            )
        )
        for split in model.splits:
            sources[split] = {
                "protocol": model.protocol, "model_dir": model.model_dir,
                "export_dir": version_dir,
            }
    planned = {p.protocol for p in models if not p.refit}
    for protocol, roles in spec.protocols.items():
        split = roles.get("test")
        if "train" in roles and protocol not in planned and split and split not in sources:
            C.remove_split(candidates_dir, model_name, split)
    C.write_sources(candidates_dir, sources, model_name)
    return written


def forget_sources(candidates_dir: str, splits: list[str], model_name: str = "cvae") -> None:
    """Drops `splits` from sources.json once another export has answered them
    (`recsys-cvae candidates --export-dir`), so the file never names the wrong model."""
    sources = C.read_sources(candidates_dir, model_name)
    if any(split in sources for split in splits):
        kept = {split: source for split, source in sources.items() if split not in splits}
        C.write_sources(candidates_dir, kept, model_name)
