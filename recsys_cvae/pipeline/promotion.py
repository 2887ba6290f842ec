"""`recsys-cvae promote`: the gate between a workdir's new export and the version being served.

Why a gate: TF Serving serves whatever integer version appears under its base path, so the
copy into that path *is* the release. The new export goes in only when

  1. it beats or ties the served version on the validation metric (`evaluate.
     selection_metric` of the main protocol, from each export's provenance);
  2. it passes the policy tests: the served version's policy (`assets.extra/policy.json`) is
     still in force in the new one (the same denied items and rules, or more), and the new
     export verifies in a fresh process against its trained model, policy included
     (`export.verification`: TF2 loader and TF Serving's session loader);
  3. its batch candidates pass `monitor` against the served version's, on the same users
     (`candidates.splits` of the workdir's features, both written by the Beam job).

The copy is atomic (a temporary folder in the base path renamed to the next version), and
every decision, promoted or refused, is appended to `BASE/promotions.jsonl` with both
exports' provenance hashes, so the history of what was served and why is in one file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

from recsys_cvae.config import Config
from recsys_cvae.export.policy import POLICY_FILE
from recsys_cvae.export.provenance import provenance_path, read_provenance
from recsys_cvae.export.saved_model import ExportError
from recsys_cvae.export.verification import verify_export
from recsys_cvae.export_layout import newest_export, rename_to_next_version
from recsys_cvae.file_digests import file_digest
from recsys_cvae.monitoring.run import run_monitor
from recsys_cvae.pipeline.cvae_runs import CandidatesJob
from recsys_cvae.pipeline.workdir import Workdir

log = logging.getLogger(__name__)

LEDGER = "promotions.jsonl"
REFUSED_STATUS = 3


@dataclasses.dataclass
class Decision:
    """What the gate found; `promoted_to` is the new version folder when it went in."""

    promoted: bool
    reason: str
    checks: dict[str, Any]
    promoted_to: str = ""


def validation_score(export_dir: str, metric: str) -> float | None:
    """The main protocol's validation `metric` from the export's provenance: the evaluation's
    (every protocol's validation, recorded by the pipeline), else the run's own."""
    provenance = read_provenance(export_dir) or {}
    protocol = (provenance.get("trained_on") or {}).get("refit_of") or (
        (provenance.get("config") or {}).get("train", {}).get("protocol")) or "strong"
    evaluation = (provenance.get("evaluation") or {}).get(protocol) or {}
    for scores in (evaluation.get("validation"), (provenance.get("training") or {}).get(
            "validation")):
        if scores and scores.get(metric) is not None:
            return float(scores[metric])
    return None


def _policy(export_dir: str) -> dict | None:
    path = os.path.join(export_dir, "assets.extra", POLICY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def policy_regression(served: str, new: str) -> str:
    """Why the new export enforces less than the served one ("" when it enforces as much)."""
    before, after = _policy(served), _policy(new)
    if before is None:
        return ""
    if after is None:
        return f"the served version enforces a policy ({before['source']}); the new export has none"
    dropped = sorted(set(before["deny"]) - set(after["deny"]))
    if dropped:
        return f"the new export no longer denies {len(dropped)} item(s), e.g. {dropped[0]!r}"
    rule_key = [(r["attribute"], tuple(r["values"]), r["below"], r["at_least"],
                 tuple(r["categories"])) for r in after["rules"]]
    missing = [r["name"] for r in before["rules"]
               if (r["attribute"], tuple(r["values"]), r["below"], r["at_least"],
                   tuple(r["categories"])) not in rule_key]
    if missing:
        return f"the new export drops the served version's rule(s) {missing}"
    return ""


def _sha256(path: str) -> str | None:
    return file_digest(path)["sha256"] if os.path.exists(path) else None


def promote(
    work: Workdir, base_path: str, config: Config, generate_candidates: CandidatesJob,
    beam_args: list[str] | None = None,
) -> Decision:
    """Runs the gate (module docstring) for the workdir's newest export; copies it into
    `base_path` when every check passes. Appends the decision to `base_path/promotions.jsonl`."""
    new = newest_export(work.export)
    if new is None:
        raise FileNotFoundError(f"{work.export}: no export to promote; run export first")
    os.makedirs(base_path, exist_ok=True)
    served = newest_export(base_path)
    metric = config.evaluate.selection_metric
    checks: dict[str, Any] = {"metric": metric, "new_validation": validation_score(new, metric)}
    reason = ""
    if served is not None:
        checks["served_validation"] = validation_score(served, metric)
        reason = _compare_validation(new, served, metric, checks) or policy_regression(
            served, new)
    if not reason:
        try:
            checks["verified"] = verify_export(new, work.model).get("signatures", [])
        except ExportError as error:
            reason = (f"it does not verify against {work.model} with the code installed now "
                      f"(export it again with this code): {error}")
    if not reason and served is not None:
        checks["monitor"], reason = _monitor(work, served, new, config, generate_candidates,
                                             beam_args or [])
    passed = ("every check passed" if served is not None else "the first version: verified "
              "(no served version to compare with or monitor against)")
    decision = Decision(promoted=not reason, reason=reason or passed, checks=checks)
    if decision.promoted:
        decision.promoted_to = _copy_in(new, base_path)
    _record(base_path, new, served, decision)
    return decision


def _compare_validation(new: str, served: str, metric: str, checks: dict) -> str:
    """Why the validation scores refuse the new export ("" when they do not). A served
    version without a score (an export never evaluated) is compared on the other checks
    only, so it cannot block every later promotion; a new export without one is refused
    while the served version has one."""
    new_score, served_score = checks["new_validation"], checks["served_validation"]
    if _sha256(provenance_path(new)) == _sha256(provenance_path(served)):
        return f"it is already served, as {served} (same provenance)"
    if served_score is None:
        checks["note"] = f"the served version has no validation {metric}: not compared"
        return ""
    if new_score is None:
        return (f"the new export's provenance has no validation {metric} to compare with the "
                f"served version's {served_score:.4f}; run `evaluate` (or `pipeline`) first")
    if new_score < served_score:
        return (f"validation {metric} {new_score:.4f} is below the served version's "
                f"{served_score:.4f}")
    return ""


def _monitor(work: Workdir, served: str, new: str, config: Config,
             generate_candidates: CandidatesJob, beam_args: list[str]) -> tuple[dict, str]:
    """Both exports' candidates for `candidates.splits`, compared by `monitor`."""
    out = os.path.join(work.root, "promotion")
    with tempfile.TemporaryDirectory(prefix="promote-candidates-") as tmp:
        folders = {}
        for name, export_dir in (("served", served), ("new", new)):
            generate_candidates(export_dir, work.features, os.path.join(tmp, name),
                                config.candidates, model_name=name, pipeline_args=beam_args,
                                save_main_session=False)
            folders[name] = os.path.join(tmp, name, name)
        status = run_monitor(folders["served"], folders["new"], out, config.monitor)
    with open(os.path.join(out, "monitor.json")) as f:
        failed = [c["name"] for c in json.load(f)["checks"] if not c["passed"]]
    verdict = {"passed": status == 0, "failed": failed, "report": os.path.join(out,
                                                                               "monitor.html")}
    reason = "" if status == 0 else (
        f"its candidates fail monitor against the served version's: {', '.join(failed)} "
        f"(see {verdict['report']})")
    return verdict, reason


def _copy_in(new: str, base_path: str) -> str:
    """Copies `new` to `base_path/<next version>` through a temporary folder and a rename."""
    temporary = os.path.join(base_path, f".tmp-promote-{uuid.uuid4().hex}")
    shutil.copytree(new, temporary)
    try:
        return rename_to_next_version(temporary, base_path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _record(base_path: str, new: str, served: str | None, decision: Decision) -> None:
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "decision": "promoted" if decision.promoted else "refused",
        "reason": decision.reason,
        "new_export": os.path.abspath(new),
        "new_provenance_sha256": _sha256(provenance_path(new)),
        "served_version": os.path.abspath(served) if served else None,
        "served_provenance_sha256": _sha256(provenance_path(served)) if served else None,
        "promoted_to": decision.promoted_to or None,
        "checks": decision.checks,
    }
    with open(os.path.join(base_path, LEDGER), "a") as f:
        f.write(json.dumps(entry) + "\n")
