"""The promotion gate on real exports of real trained models: the first export goes in, a tie
goes in after verification and monitor, a worse model and a policy regression are refused,
and every decision is in BASE/promotions.jsonl with both provenance hashes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from beam_jobs.candidates import generate_candidates
from recsys_cvae.config import ExportConfig
from recsys_cvae.export.provenance import provenance_path
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.pipeline.promotion import LEDGER, promote
from recsys_cvae.pipeline.workdir import Workdir
from recsys_cvae.training.fit import train
from tests.builders import REPO, tiny_model_config


@pytest.fixture(scope="module")
def models(features_dir, tmp_path_factory) -> dict[str, str]:
    """A fitted model (4 epochs) and a barely trained one (1 epoch at a tiny learning rate)."""
    folders = {}
    configs = {"good": tiny_model_config(4), "worse": tiny_model_config(1, learning_rate=1e-6)}
    for name, config in configs.items():
        folders[name] = str(tmp_path_factory.mktemp(f"model-{name}"))
        train(features_dir, folders[name], config)
    return folders


def workdir(root, features_dir: str, model_dir: str) -> Workdir:
    return Workdir(root=str(root), features=features_dir, model=model_dir,
                   export=str(root / "export"))


def ledger(base) -> list[dict]:
    with open(os.path.join(base, LEDGER)) as f:
        return [json.loads(line) for line in f]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow  # two verifications and four Beam candidate runs (~40 s)
def test_first_and_tying_exports_go_in_a_worse_one_is_refused(models, features_dir, tmp_path):
    base = tmp_path / "serving"
    config = tiny_model_config(4)
    work = workdir(tmp_path / "w", features_dir, models["good"])
    first = export_model(models["good"], work.export, ExportConfig(top_k=10, verify=False))
    decision = promote(work, str(base), config, generate_candidates)
    assert decision.promoted and decision.promoted_to == str(base / "1")
    assert os.path.exists(base / "1" / "saved_model.pb")
    assert sorted(os.listdir(base)) == ["1", LEDGER]  # no temporary folder left

    export_model(models["good"], work.export, ExportConfig(top_k=10, verify=False))  # a tie
    decision = promote(work, str(base), config, generate_candidates)
    assert decision.promoted and decision.promoted_to == str(base / "2"), decision.reason
    assert decision.checks["monitor"]["passed"]
    assert set(decision.checks["verified"]) >= {"recommend", "generate"}

    decision = promote(work, str(base), config, generate_candidates)  # the same export again
    assert not decision.promoted and "it is already served" in decision.reason

    # an export that does not match its model folder (here: another model's) is refused
    mismatch = workdir(tmp_path / "w3", features_dir, models["worse"])
    export_model(models["good"], mismatch.export, ExportConfig(top_k=10, verify=False))
    decision = promote(mismatch, str(base), config, generate_candidates)
    assert not decision.promoted and "does not verify" in decision.reason, decision.reason

    worse = workdir(tmp_path / "w2", features_dir, models["worse"])
    export_model(models["worse"], worse.export, ExportConfig(top_k=10, verify=False))
    decision = promote(worse, str(base), config, generate_candidates)
    assert not decision.promoted and "is below the served version's" in decision.reason
    assert sorted(n for n in os.listdir(base) if n.isdigit()) == ["1", "2"]

    entries = ledger(base)
    assert [e["decision"] for e in entries] == ["promoted", "promoted", "refused", "refused",
                                                "refused"]
    assert entries[0]["new_provenance_sha256"] == sha256(provenance_path(first))
    assert entries[0]["served_version"] is None
    assert entries[1]["served_provenance_sha256"] == sha256(provenance_path(str(base / "1")))


def test_dropping_the_served_policy_is_refused_from_the_command_line(
        models, features_dir, tmp_path):
    base = tmp_path / "serving"
    policy = tmp_path / "policy.toml"
    policy.write_text('[deny]\nitems = ["i000001"]\n')
    guarded = workdir(tmp_path / "guarded", features_dir, models["good"])
    export_model(models["good"], guarded.export,
                 ExportConfig(top_k=10, verify=False, policy=str(policy)))
    assert promote(guarded, str(base), tiny_model_config(4), generate_candidates).promoted
    plain = tmp_path / "plain"
    export_model(models["good"], str(plain / "export"), ExportConfig(top_k=10, verify=False))
    result = subprocess.run(
        [sys.executable, "-m", "recsys_cvae.cli", "promote", "--workdir", str(plain),
         "--features-dir", features_dir, "--model-dir", models["good"],
         "--model-base-path", str(base)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "refused: the served version enforces a policy" in result.stdout
    assert [e["decision"] for e in ledger(base)] == ["promoted", "refused"]
