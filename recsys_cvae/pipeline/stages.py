"""Every stage of a run over one workdir, and all of them in order (`run_pipeline`).

Why here and not in the CLI: the CLI parses and dispatches; what a stage reads and writes,
and in which order the stages run, is the pipeline's business, and notebooks and benchmarks
call the same functions. The Beam jobs (features, candidates) are deployable jobs of their
own (`beam_jobs/`), which the library never imports: the caller hands them in as `BeamJobs`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from recsys_cvae import spec as S
from recsys_cvae.baselines.build import build_baselines
from recsys_cvae.config import Config
from recsys_cvae.datasets.synthetic import write_synthetic
from recsys_cvae.evaluation.evaluate import HTML_FILE, REPORT_FILE, evaluate
from recsys_cvae.evaluation.report import coinciding_notes, format_table
from recsys_cvae.export.model_card import write_model_card
from recsys_cvae.export.provenance import read_provenance, record_evaluation
from recsys_cvae.export_layout import newest_export
from recsys_cvae.model.model_dir import read_training_record
from recsys_cvae.monitoring.run import run_monitor
from recsys_cvae.pipeline import cvae_runs
from recsys_cvae.pipeline.multvae_run import NAME as MULTVAE
from recsys_cvae.pipeline.multvae_run import build_multvae
from recsys_cvae.pipeline.stage_timer import StageTimer
from recsys_cvae.pipeline.workdir import Workdir

log = logging.getLogger("recsys_cvae")


@dataclass(frozen=True)
class BeamJobs:
    """The two Beam jobs a run starts.

    Attributes:
      build_features: `beam_jobs.features.build_features(data_dir, features_dir,
        features_config, pipeline_args=...)`.
      generate_candidates: `beam_jobs.candidates.generate_candidates(version_dir,
        features_dir, candidates_dir, candidates_config, model_name=..., pipeline_args=...,
        save_main_session=...)`.
    """

    build_features: Callable[..., dict]
    generate_candidates: cvae_runs.CandidatesJob


def run_features(jobs: BeamJobs, data_dir: str, work: Workdir, config: Config,
                 beam_args: list[str]) -> dict:
    return jobs.build_features(data_dir, work.features, config.features, pipeline_args=beam_args)


def planned_models(work: Workdir, config: Config) -> list[cvae_runs.ProtocolModel]:
    """The CVAEs of this run, one per chosen protocol: the main one in `W/model` and
    `W/export`, the others in `W/protocols/<protocol>/`."""
    spec = S.FeatureSpec.load(work.features)
    return cvae_runs.plan_models(spec, config, work.root, work.model, work.export)


def run_train(work: Workdir, config: Config) -> dict[str, dict]:
    """Trains every protocol's CVAE; returns protocol -> best validation metrics."""
    return cvae_runs.train_models(work.features, planned_models(work, config), config)


def run_export(work: Workdir, config: Config) -> dict[str, str]:
    """Exports every protocol's CVAE; returns protocol -> export version directory."""
    return cvae_runs.export_models(planned_models(work, config), config.export)


def run_candidates(jobs: BeamJobs, work: Workdir, config: Config, beam_args: list[str],
                   export_dir: str = "") -> dict[str, int]:
    """Every protocol's test split from its own CVAE (cold start from the main one); with
    `export_dir`, that one export answers `candidates.splits` instead."""
    if export_dir:
        written = jobs.generate_candidates(
            export_dir, work.features, work.candidates, config.candidates,
            pipeline_args=beam_args, save_main_session=False,
        )
        cvae_runs.forget_sources(work.candidates, list(config.candidates.splits))
        return written
    return cvae_runs.write_candidates(
        work.features, work.candidates, planned_models(work, config), config,
        jobs.generate_candidates, pipeline_args=beam_args,
    )


def run_baselines(jobs: BeamJobs, work: Workdir, config: Config) -> list[str]:
    """`evaluate.baselines`: the in-memory ones, then Mult-VAE (when asked) through the CVAE's
    own train/export/RunInference path with the model's conditioning off."""
    names = list(config.evaluate.baselines)
    in_memory = [name for name in names if name != MULTVAE]
    written = build_baselines(
        work.features, work.candidates, config, k=config.export.top_k, names=in_memory
    )
    if MULTVAE in names:
        build_multvae(work.features, work.candidates, config, jobs.generate_candidates)
        written.append(MULTVAE)
    return written


def run_evaluate(work: Workdir, config: Config, data_dir: str = "") -> dict:
    """The report, with the main protocol model's training run beside the metrics (the one
    whose settings the served model reuses)."""
    models = planned_models(work, config) if os.path.exists(
        os.path.join(work.features, S.SPEC_FILE)) else []
    training = read_training_record(models[0].model_dir) if models else None
    return evaluate(
        work.features, work.candidates, work.report, config.evaluate,
        data_dir=data_dir, export_dir=work.export, training=training,
    )


def run_model_cards(work: Workdir, config: Config, exports: dict[str, str] | None,
                    metrics: dict) -> list[str]:
    """Adds the evaluation to every export's provenance and rewrites its model card (before
    anything serves them); returns the cards' HTML paths. `exports` (label -> version
    folder, as `run_export` returns) defaults to each planned model's newest export."""
    models = planned_models(work, config)
    protocol_models = {m.protocol: m.model_dir for m in models if not m.refit}
    if exports is None:
        exports = {m.label: newest_export(m.export_base) for m in models}
    pages = []
    for export_dir in filter(None, exports.values()):
        if read_provenance(export_dir) is None:  # an export from before provenance existed
            continue
        record_evaluation(export_dir, metrics, protocol_models)
        pages.append(write_model_card(export_dir)[1])
    return pages


def run_demo_monitor(work: Workdir, config: Config) -> int:
    """The demo's output monitor: the CVAE's candidates against popularity's, in
    WORKDIR/monitor (the same command compares a new version's output with the served one's;
    see README, Governance). Returns the monitor's exit status; the demo goes on either way."""
    reference = os.path.join(work.candidates, "popularity")
    current = os.path.join(work.candidates, "cvae")
    if not (os.path.isdir(reference) and os.path.isdir(current)):
        return 0
    print("\nOutput monitor, the CVAE's candidates against popularity's (a demonstration: "
          "they are meant to differ)")
    users = os.path.join(work.data, "users.csv")  # the demo's synthetic users: segments
    return run_monitor(reference, current, os.path.join(work.root, "monitor"), config.monitor,
                       users if os.path.exists(users) else "")


def run_pipeline(jobs: BeamJobs, data_dir: str, work: Workdir, config: Config,
                 beam_args: list[str]) -> dict:
    """All stages in order; prints each stage's duration and the final metrics tables."""
    timer = StageTimer()
    timer.run("features", run_features, jobs, data_dir, work, config, beam_args)
    timer.run("train", run_train, work, config)
    exports = timer.run("export", run_export, work, config)
    timer.run("candidates", run_candidates, jobs, work, config, beam_args)
    timer.run("baselines", run_baselines, jobs, work, config)
    metrics = timer.run("evaluate", run_evaluate, work, config, data_dir)
    timer.run("model card", run_model_cards, work, config, exports, metrics)
    print("\nStage durations\n" + timer.table())
    print_metrics(metrics)
    print_report_location(work)
    return metrics


def print_report_location(work: Workdir) -> None:
    """Points at the HTML report (tables, plots, what-if panel) first, then its Markdown twin."""
    print(f"\nReport: {os.path.join(work.report, HTML_FILE)}"
          f" (Markdown: {os.path.join(work.report, REPORT_FILE)})")
    served = newest_export(work.export)
    if served and os.path.exists(os.path.join(served, "assets.extra", "model_card.html")):
        print(f"Model card of the served export: "
              f"{os.path.join(served, 'assets.extra', 'model_card.html')}")


def print_metrics(metrics: dict) -> None:
    """One table per scored split (every protocol's test split), titled with its protocol."""
    protocol_of = {split: p for p, split in metrics.get("protocols", {}).items()}
    for split in metrics.get("splits", {}):
        title = f"Metrics on the {split} users" + (
            f" ({protocol_of[split]} protocol)" if split in protocol_of else ""
        )
        notes = "".join(f"\n{note}" for note in coinciding_notes(metrics, split))
        print(f"\n{title}\n" + format_table(metrics, split) + notes)


def write_demo_data(work: Workdir, num_users: int, num_items: int, seed: int) -> str:
    log.info("writing synthetic data (%d users, %d items) to %s", num_users, num_items, work.data)
    return write_synthetic(work.data, num_users=num_users, num_items=num_items, seed=seed)
