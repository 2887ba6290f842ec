"""`recsys-cvae`: every stage of the pipeline from the shell; this module parses and dispatches.

Each subcommand reads and writes the standard folders under `--workdir W`
(`W/features`, `W/model`, `W/export/<version>`, `W/candidates`, `W/report`;
`recsys_cvae.pipeline.workdir`), each of which can be overridden; every protocol but the main
one gets its CVAE under `W/protocols/<protocol>/` (`recsys_cvae.pipeline.cvae_runs`). The
stages themselves are `recsys_cvae.pipeline.stages`; the Beam jobs they start are handed to
them from here (the library never imports `beam_jobs`). Settings come from `--config FILE.toml` and
`--set section.field=value`. Arguments after a lone `--` go to Beam's PipelineOptions
(features and candidates only), e.g.
`recsys-cvae features --data-dir d --workdir w -- --direct_num_workers=2`.

Failures exit non-zero with one line on stderr; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from recsys_cvae.config import Config, load_config
from recsys_cvae.pipeline.workdir import Workdir
from serving.flags import add_server_arguments, server_kwargs

if TYPE_CHECKING:
    from recsys_cvae.pipeline.stages import BeamJobs

DEFAULT_WORKDIR = "runs/default"
DEMO_WORKDIR = "runs/demo"
DEFAULT_MODEL_NAME = "recsys_cvae"


# ---- argument parsing ---------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, workdir_default: str = DEFAULT_WORKDIR) -> None:
    group = parser.add_argument_group("run folders and settings")
    group.add_argument(
        "--workdir",
        default=workdir_default,
        help=f"root of this run's artefacts (default: {workdir_default})",
    )
    group.add_argument("--features-dir", help="features folder (default: WORKDIR/features)")
    group.add_argument(
        "--model-dir", help="the main protocol's checkpoints and logs (default: WORKDIR/model)"
    )
    group.add_argument(
        "--export-base",
        help="the main protocol's SavedModel base path holding <version>/ "
        "(default: WORKDIR/export)",
    )
    group.add_argument(
        "--candidates-dir", help="candidate Parquet files (default: WORKDIR/candidates)"
    )
    group.add_argument("--report-dir", help="metrics.json, report.md (default: WORKDIR/report)")
    group.add_argument("--config", help="TOML file with [features], [model], [train], ... tables")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.epochs=5 (repeatable)",
    )
    group.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-cvae",
        description=(
            "Recommendations from a conditional VAE: Beam features -> tf.distribute training -> "
            "SavedModel for TF Serving -> batch candidates -> offline evaluation. "
            "Arguments after a lone `--` are passed to Beam (features, candidates, pipeline)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_serving_commands(sub)
    _add_scoring_commands(sub)
    _add_run_commands(sub)
    return parser


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """features, train, export: from raw logs to a SavedModel."""
    p = sub.add_parser("features", help="raw logs + user profiles -> per-user TFRecords (Beam)")
    p.add_argument(
        "--data-dir",
        required=True,
        help="folder in the MovieLens-100K/1M layout or with interactions.csv + users.csv",
    )
    _add_common(p)

    p = sub.add_parser(
        "train", help="fit one CVAE per protocol (--protocols) under a tf.distribute strategy"
    )
    p.add_argument(
        "--strategy",
        choices=["auto", "default", "mirrored", "multi_worker"],
        help="distribution strategy (default: train.strategy from the config, `auto`)",
    )
    p.add_argument("--epochs", type=int, help="maximum epochs (default: train.epochs)")
    _add_protocols(p)
    _add_common(p)

    p = sub.add_parser(
        "export", help="write each protocol's SavedModel (recommend, generate, encode)"
    )
    p.add_argument("--top-k", type=int, help="items each signature returns (default: export.top_k)")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument(
        "--verify",
        action="store_true",
        help="reload the export in a fresh process (TF2 loader and TF1 session loader, as TF "
        "Serving) and compare every signature with the in-process model (default: "
        "export.verify, on)",
    )
    verify.add_argument(
        "--no-verify",
        action="store_true",
        help="skip reloading the export in a fresh process and comparing outputs",
    )
    _add_policy(p)
    _add_protocols(p)
    _add_common(p)


def _add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """serve, query: the exports over TF Serving's API, and one call to them."""
    p = sub.add_parser("serve", help="serve the exports over TF Serving's gRPC API")
    p.add_argument("--model-base-path", help="folder of integer versions (default: WORKDIR/export)")
    add_server_arguments(p)  # --model-config-file, --enable-batching, --ssl-cert, ...
    p.set_defaults(model_name=DEFAULT_MODEL_NAME)
    _add_common(p)

    p = sub.add_parser("query", help="one gRPC call to a running server, from the shell")
    p.add_argument("--target", default="127.0.0.1:8500", help="server address host:port")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model to ask")
    p.add_argument(
        "--signature",
        default="recommend",
        choices=["recommend", "generate", "encode"],
        help="signature to call",
    )
    p.add_argument(
        "--items", default="", help="comma-separated history item ids (recommend, encode)"
    )
    p.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the call (default: 5)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (system CA roots)")
    p.add_argument("--ssl-root-cert", help="PEM CA certificate to trust (implies --tls)")
    p.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one raw profile column, e.g. zip_code=55105 (repeatable)",
    )
    p.add_argument("--k", type=int, default=0,
                   help="print the top K items (default 0: every item the export returns)")
    p.add_argument("--strict", action="store_true",
                   help="refuse an attribute value the local export (WORKDIR/export) was not "
                   "trained on, instead of noting it and asking anyway")
    _add_common(p)


def _add_scoring_commands(sub: argparse._SubParsersAction) -> None:
    """candidates, baselines, evaluate: every model's top-K and their scores."""
    p = sub.add_parser("candidates", help="top-K for evaluation users with Beam RunInference")
    p.add_argument(
        "--export-dir",
        help="one SavedModel (version folder, or a base path: newest version) to answer "
        "candidates.splits; default: every protocol's CVAE answers its own test split",
    )
    _add_protocols(p)
    _add_common(p)

    p = sub.add_parser("baselines", help="popularity and other baselines in the candidate format")
    _add_common(p)

    p = sub.add_parser("evaluate", help="score every model's candidates; write report/")
    p.add_argument(
        "--data-dir", help="raw data folder, for item metadata (genres, titles) in the report"
    )
    _add_common(p)

    p = sub.add_parser(
        "monitor", help="compare what a model recommends with a reference (item drift, "
        "coverage, exposure, scores, per segment); exit 3 when a check fails")
    p.add_argument("--reference", required=True,
                   help="candidates folder (e.g. WORKDIR/candidates/cvae, Parquet) or request "
                   "log folder/prefix (TFRecord PredictionLogs) of the version you trust")
    p.add_argument("--current", required=True, help="the same for the output to check")
    p.add_argument("--users", default="",
                   help="users CSV (id first) giving candidates their attribute segments; "
                   "request logs carry the attributes the calls sent")
    p.add_argument("--out", help="where monitor.json and monitor.html go (default: "
                   "WORKDIR/monitor); thresholds: the config's [monitor] table")
    p.epilog = ("Exit status: 0 every check passed, 3 a check failed (named on the last line), "
                "1 could not run. Compare like with like: the same splits, each answered by one "
                "model (e.g. two `candidates --export-dir` runs). Coverage and Gini are over "
                "the items either side recommends.")
    _add_common(p)

    p = sub.add_parser(
        "synthesize", help="write synthetic users (users.csv, interactions.csv) from the "
        "export's `sample` signature, as a Beam job")
    p.add_argument("--users", type=int, required=True, help="how many synthetic users")
    p.add_argument("--out", required=True, help="folder for users.csv and interactions.csv "
                   "(the generic layout `features --data-dir` reads)")
    p.add_argument("--seed", type=int, default=0,
                   help="the same seed gives the same files (default 0)")
    p.add_argument("--population", default="",
                   help="CSV of attribute columns plus `weight`: draw attribute combinations by "
                   "weight instead of copying training users")
    p.add_argument("--export-dir", help="export version folder or base (default: the newest "
                   "under WORKDIR/export; WORKDIR/protocols/strong/export never saw the test "
                   "users, which keeps train-on-synthetic honest)")
    p.add_argument("--timestamps", action="store_true",
                   help="add a timestamp column, drawn from the source's distribution of "
                   "interaction times")
    p.add_argument("--no-report", action="store_true",
                   help="skip the fidelity and privacy report (synthesis_report.json/.html)")
    p.epilog = ("--set INPUT=VALUE (no dot in INPUT) restricts the copied training users, e.g. "
                "--set device=ios --set age=25..34 (inclusive); --set section.field=value stays "
                "a config override. A population file's omitted or empty columns are unknown "
                "for every user; weights must be ≥ 0. --out is a local folder (files in it are "
                "replaced). Beam flags go after a lone `--`. Exit status 0 once the files are "
                "written (the report says which goals are met), 1 when it could not run.")
    _add_common(p)

    p = sub.add_parser(
        "promote", help="copy WORKDIR's newest export into a serving base path if it ties or "
        "beats the served version, keeps its policy and passes monitor; exit 3 if refused")
    p.add_argument("--model-base-path", required=True,
                   help="the base path TF Serving (or `serve`) watches; the export becomes its "
                   "next integer version, and BASE/promotions.jsonl records the decision")
    p.epilog = ("Promotes the newest version under --export-base (default WORKDIR/export); "
                "verifies it in a fresh process against --model-dir; writes both versions' "
                "candidates for candidates.splits of --features-dir and compares them with "
                "monitor (report in WORKDIR/promotion/). Exit status: 0 promoted, 3 refused "
                "(the reason is printed and appended to BASE/promotions.jsonl), 1 could not run.")
    _add_common(p)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """pipeline, demo: every stage in order."""
    p = sub.add_parser("pipeline", help="all stages in order, then the metrics table")
    p.add_argument(
        "--data-dir",
        help="input folder (MovieLens or generic CSV); without it, built-in synthetic data",
    )
    _add_synthetic_flags(p)
    _add_policy(p)
    _add_protocols(p)
    _add_common(p)

    p = sub.add_parser("demo", help="the pipeline on built-in synthetic data, small and fast")
    _add_synthetic_flags(p, users=3000, items=500)
    _add_protocols(p)
    _add_common(p, workdir_default=DEMO_WORKDIR)


def _add_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", metavar="POLICY.toml",
        help="bake a serving policy into every signature of the export: [deny] items = [...] "
        "never recommended, and [[rules]] removing item categories for users with given "
        "attribute values (see README, Governance; default: export.policy, none)")


def _add_protocols(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocols",
        metavar="P1,P2",
        help="protocols that get their own CVAE, each trained on its train split and scored on "
        "its test split; the main one (train.protocol, default the features' primary) in "
        "WORKDIR/model and WORKDIR/export, the others in WORKDIR/protocols/<protocol>/ "
        "(default: train.protocols; empty = every protocol with a train split)",
    )


def _add_synthetic_flags(parser: argparse.ArgumentParser, users: int = 5000, items: int = 800):
    group = parser.add_argument_group("synthetic data (used when there is no --data-dir)")
    group.add_argument(
        "--synthetic-users", type=int, default=users, help=f"users (default: {users})"
    )
    group.add_argument(
        "--synthetic-items", type=int, default=items, help=f"items (default: {items})"
    )
    group.add_argument("--synthetic-seed", type=int, default=0, help="seed (default: 0)")


def _split_beam_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def _resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    if args.command == "synthesize":  # INPUT=VALUE restricts the synthetic users instead
        overrides = [text for text in overrides if _is_config_override(text)]
    if getattr(args, "strategy", None):
        overrides.append(f"train.strategy={args.strategy}")
    if getattr(args, "epochs", None) is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if getattr(args, "protocols", None) is not None:
        overrides.append(f"train.protocols={args.protocols}")
    if getattr(args, "top_k", None) is not None:
        overrides.append(f"export.top_k={args.top_k}")
    if getattr(args, "policy", None):
        overrides.append(f"export.policy={os.path.abspath(args.policy)}")
    if getattr(args, "no_verify", False):
        overrides.append("export.verify=false")
    if getattr(args, "verify", False):
        overrides.append("export.verify=true")
    if args.command == "demo":
        # Small and quick: the demo shows the whole flow, not the best model.
        overrides = ["train.epochs=10", "train.verbose=0", *overrides]
    return load_config(args.config, overrides)


def workdir_from_args(args: argparse.Namespace) -> Workdir:
    """The run folders of the parsed `--workdir` and `--*-dir` flags, resolved once here."""
    return Workdir(
        root=args.workdir,
        features=args.features_dir or "",
        model=args.model_dir or "",
        export=args.export_base or "",
        candidates=args.candidates_dir or "",
        report=args.report_dir or "",
    )


def beam_jobs() -> BeamJobs:
    """The Beam jobs the stages start, from the deployable `beam_jobs` package."""
    # Deferred with the stages: Beam and TensorFlow load only when a command runs.
    from beam_jobs.candidates import generate_candidates
    from beam_jobs.features import build_features
    from recsys_cvae.pipeline.stages import BeamJobs

    return BeamJobs(build_features=build_features, generate_candidates=generate_candidates)


def _dispatch(args: argparse.Namespace, beam_args: list[str]) -> int:
    config = _resolve_config(args)  # first: a bad --config or --set fails every command alike
    if args.command == "serve":
        run_serve(args, workdir_from_args(args))
        return 0
    if args.command == "monitor":
        with _native_stderr_hidden(not args.debug):  # candidates and logs read through TF
            import tensorflow  # noqa: F401

            from recsys_cvae.monitoring.run import run_monitor  # deferred: TensorFlow

        out = args.out or os.path.join(args.workdir, "monitor")
        return run_monitor(args.reference, args.current, out, config.monitor, args.users)
    if args.command == "promote":
        return run_promote(args, config, beam_args)
    if args.command == "synthesize":
        return run_synthesize(args, beam_args)
    if args.command == "query":
        print(run_query(args, workdir_from_args(args)), flush=True)
        return 0
    # Deferred: the stages import TensorFlow (seconds), which `--help`, `serve` and `query`
    # never need from here.
    with _native_stderr_hidden(not args.debug):
        from recsys_cvae.pipeline import stages

    work = workdir_from_args(args)
    if args.command == "features":
        stages.run_features(beam_jobs(), args.data_dir, work, config, beam_args)
    elif args.command == "train":
        for label, result in stages.run_train(work, config).items():
            values = ", ".join(f"{k}={v}" for k, v in result.items())
            what = "served refit, all data" if label == "serving" else f"{label} protocol"
            print(f"best validation ({what}): {values}")
    elif args.command == "export":
        for label, export_dir in stages.run_export(work, config).items():
            print(f"{label}: {export_dir}")
    elif args.command == "candidates":
        written = stages.run_candidates(
            beam_jobs(), work, config, beam_args, export_dir=args.export_dir or ""
        )
        users = ", ".join(f"{split} {n} users" for split, n in written.items())
        print(f"candidates: {users or 'no split asked for'}; in {work.candidates}")
    elif args.command == "baselines":
        print("wrote baselines:", ", ".join(stages.run_baselines(beam_jobs(), work, config)))
    elif args.command == "evaluate":
        metrics = stages.run_evaluate(work, config, args.data_dir or "")
        stages.run_model_cards(work, config, None, metrics)
        stages.print_metrics(metrics)
        stages.print_report_location(work)
    elif args.command in ("pipeline", "demo"):
        data_dir = getattr(args, "data_dir", None) or stages.write_demo_data(
            work, args.synthetic_users, args.synthetic_items, args.synthetic_seed
        )
        stages.run_pipeline(beam_jobs(), data_dir, work, config, beam_args)
        if args.command == "demo":
            stages.run_demo_monitor(work, config)
    return 0


def _is_config_override(text: str) -> bool:
    """`--set section.field=value` (a dot before "="), not synthesize's `INPUT=VALUE`."""
    return "." in text.partition("=")[0]


def run_synthesize(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Synthetic users; prints what was written. Exit status 0 once the files are written,
    whether the report's goals are met or not (the report says which)."""
    if args.users < 1:
        raise ValueError(f"--users must be at least 1, got {args.users}")
    with _native_stderr_hidden(not args.debug):
        import tensorflow  # noqa: F401  (its C++ start-up lines, hidden as for every command)

        from beam_jobs.synthesize import synthesize  # deferred: Beam and TensorFlow
        from recsys_cvae.export_layout import newest_export

    work = workdir_from_args(args)
    export_dir = newest_export(args.export_dir or work.export)
    if export_dir is None:
        raise FileNotFoundError(f"{args.export_dir or work.export}: no export; run export first")
    overrides = [text for text in args.set if not _is_config_override(text)]
    written = synthesize(export_dir, work.features, args.out, args.users, seed=args.seed,
                         overrides=overrides, population_file=args.population,
                         timestamps=args.timestamps, pipeline_args=beam_args)
    print(f"synthesized {written['users']:,} users, {written['interactions']:,} interactions "
          f"in {os.path.abspath(args.out)} (seed {args.seed})")
    if args.no_report:
        return 0
    with _native_stderr_hidden(not args.debug):
        from recsys_cvae.synthesis import page  # deferred: TensorFlow (the model's likelihood)
        from recsys_cvae.synthesis.report import synthesis_report

    protocol_model = os.path.join(work.root, "protocols", "strong", "model")
    report = synthesis_report(work.features, args.out, export_dir,
                              protocol_model if os.path.isdir(protocol_model) else "",
                              seed=args.seed, restricted=bool(overrides or args.population))
    data, html_page = page.write(report, args.out)
    print("goals: " + ", ".join(f"{name} {'met' if met else 'NOT met' if met is False else '—'}"
                                for name, met in report["goals"].items()))
    print(f"Fidelity and privacy report: {html_page} (JSON: {data})")
    return 0


def run_promote(args: argparse.Namespace, config: Config, beam_args: list[str]) -> int:
    """The promotion gate; prints the decision and returns 0 (promoted) or 3 (refused)."""
    with _native_stderr_hidden(not args.debug):
        from recsys_cvae.pipeline.promotion import REFUSED_STATUS, promote  # deferred: TF

    decision = promote(workdir_from_args(args), args.model_base_path, config,
                       beam_jobs().generate_candidates, beam_args)
    if decision.promoted:
        print(f"promoted: {decision.promoted_to} ({decision.reason})")
        return 0
    print(f"refused: {decision.reason}")
    return REFUSED_STATUS


def run_serve(args: argparse.Namespace, work: Workdir) -> NoReturn:
    """Serves until SIGTERM/SIGINT; in-flight requests finish first."""
    # Deferred: the server loads TensorFlow and grpc, which other commands do not need.
    with _native_stderr_hidden(not args.debug):
        from serving.server import ModelServer, describe, exit_after_stop

    base_path = None if args.model_config_file else (args.model_base_path or work.export)
    server = ModelServer(base_path, **server_kwargs(args))
    server.catch_stop_signals()  # before the line below: a SIGTERM right after it drains
    server.start()
    print(describe(server), flush=True)
    server.wait_for_signal(args.grace_s)
    exit_after_stop(0)  # the command ends here; skip the slow interpreter teardown


def run_query(args: argparse.Namespace, work: Workdir) -> str:
    """One call and its printable answer; unknown attribute values are checked against the
    local export of `--workdir`/`--export-base` when there is one."""
    # Deferred, and in this order: grpc and the serving protos load only for `query`, after
    # `tensorflow` is made a namespace of its proto files (no TensorFlow start-up).
    from serving.known_values import newest_local_version, unknown_values
    from serving.proto_imports import use_tensorflow_protos_only

    use_tensorflow_protos_only()  # a one-shot client: protos without TensorFlow's start-up
    # deferred until the namespace above is in place
    from serving.client import query

    if args.k < 0:
        raise ValueError(f"--k must be 0 (every item the model returns) or more, got {args.k}")

    attributes = {}
    for pair in args.attr:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--attr {pair!r}: expected NAME=VALUE")
        attributes[name] = value
    items = [item for item in args.items.split(",") if item]
    export_dir = newest_local_version(work.export)
    unknown = unknown_values(export_dir, attributes) if export_dir else []
    if unknown:
        what = (f"{', '.join(unknown)}: not among the values {export_dir} was trained on")
        if args.strict:
            raise ValueError(f"{what}; fix the value, or drop --strict to ask anyway")
        print(f"recsys-cvae query: note: {what}; the model answers as for an unknown value",
              file=sys.stderr)
    return query(args.target, args.model_name, args.signature, items, attributes, args.timeout_s,
                 tls=args.tls, root_certificates=args.ssl_root_cert, k=args.k)


def _configure_logging(quiet: bool, debug: bool) -> None:
    """Our own progress at INFO; TensorFlow's and Beam's chatter only when debugging."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    ours = logging.WARNING if quiet else logging.INFO
    for name in ("recsys_cvae", "beam_jobs", "serving"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else ours)
    if not debug:
        logging.getLogger("apache_beam").setLevel(logging.ERROR)
        for handler in logging.getLogger().handlers:
            handler.addFilter(
                lambda record: not record.getMessage().startswith(_HARMLESS_WARNINGS)
            )
    # TensorFlow's C++ logging (oneDNN, CUDA probing, cuInit failing on a machine without a
    # GPU): set before TensorFlow loads, so it reaches this process and every subprocess.
    # Errors that matter reach the user as Python exceptions either way.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if debug else "3"


# Root-logger warnings Beam prints on import or per batch, harmless here:
# - RunInference imports its ModelManager together with `resource`, which needs torch, so
#   without torch it warns on every batch that memory usage cannot be read;
# - the BigQuery client is imported although no job here uses it, and warns without apitools.
# - Keras times its callbacks against tiny batches and calls the checkpointing ones slow.
_HARMLESS_WARNINGS = ("Resource module is not", "apitools not found",
                      "Callback method `on_train_batch")


@contextlib.contextmanager
def _native_stderr_hidden(hidden: bool) -> Iterator[None]:
    """Hides what C++ code writes to stderr while TensorFlow loads (absl's "All log messages
    before absl::InitializeLog()" lines come before any log level applies); shows it when the
    import fails, so a broken install still says why."""
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    own_args, beam_args = _split_beam_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own_args)
    _configure_logging(args.quiet, args.debug)
    try:
        return _dispatch(args, beam_args)
    except KeyboardInterrupt:
        print("recsys-cvae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `recsys-cvae query ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except Exception as error:  # the boundary: one line for the user, the trace on request
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"recsys-cvae {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
