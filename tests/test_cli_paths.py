"""Run folders are resolved once at the CLI boundary, against the user's own folder."""

import os

from recsys_cvae import cli


def test_relative_run_folders_become_absolute_in_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(
        ["export", "--workdir", "runs/x", "--model-dir", "elsewhere/model"]
    )
    work = cli.workdir_from_args(args)
    assert work.root == str(tmp_path / "runs" / "x")
    assert work.export == str(tmp_path / "runs" / "x" / "export")
    assert work.model == str(tmp_path / "elsewhere" / "model")
    assert all(os.path.isabs(getattr(work, name)) for name in
               ("features", "candidates", "report", "data"))


def test_urls_are_left_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["export", "--workdir", "gs://bucket/run"])
    work = cli.workdir_from_args(args)
    assert work.root == "gs://bucket/run"
    assert work.export == "gs://bucket/run/export"
