"""`recsys-cvae query` as a shell user runs it: a subprocess from their own folder, piped."""

import json
import os
import subprocess
import sys

from tests.test_new_user_files import CLI, one_line_error, run_cli


def test_k_trims_the_answer_and_a_closed_pipe_ends_quietly(tmp_path, target):
    result = run_cli(tmp_path, "query", "--target", target, "--signature", "generate",
                     "--attr", "region=south", "--k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "user 0:" and len(lines) == 3 and lines[1].split()[:2] == ["1", "i4"]
    # `| head -1`: the reader closes the pipe after one line.
    piped = subprocess.run(
        f"{' '.join(CLI)} query --target {target} --signature generate --attr region=south"
        " | head -1", shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert piped.stdout == "user 0:\n" and piped.stderr == ""


def test_query_does_not_start_tensorflow(tmp_path, target):
    code = (
        "import sys; from recsys_cvae import cli; "
        f"rc = cli.main(['query', '--target', '{target}', '--signature', 'generate', "
        "'--attr', 'region=south']); "
        "assert 'tensorflow.python' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[1] == "i4"


def _local_export(folder) -> None:
    """W/export/1/assets.extra as `export` writes it: the spec and a region vocabulary."""
    assets = folder / "run" / "export" / "1" / "assets.extra"
    (assets / "vocab").mkdir(parents=True)
    (assets / "vocab" / "attr_region.txt").write_text("north\nsouth\n")
    spec = {"attributes": [
        {"name": "region", "kind": "categorical", "vocabulary_file": "vocab/attr_region.txt"},
        {"name": "age", "kind": "numeric"}]}
    (assets / "feature_spec.json").write_text(json.dumps(spec))


def test_an_unknown_attribute_value_is_noted_or_refused_with_strict(tmp_path, target):
    _local_export(tmp_path)
    args = ["query", "--target", target, "--signature", "generate", "--workdir", "run",
            "--attr", "region=east", "--attr", "age=30"]
    noted = run_cli(tmp_path, *args)
    assert noted.returncode == 0, noted.stderr
    assert "note: region='east': not among the values" in noted.stderr
    line = one_line_error(run_cli(tmp_path, *args, "--strict"))
    assert "region='east': not among the values" in line and "drop --strict" in line
    known = run_cli(tmp_path, *args[:-4], "--attr", "region=south", "--strict")
    assert known.returncode == 0 and known.stderr == "", known.stderr


def test_serve_starts_quietly_from_a_users_folder(tmp_path, model_base_path):
    import signal
    import socket

    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [*CLI, "serve", "--model-base-path", model_base_path, "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    try:
        first = process.stdout.readline()  # blocks until the server says it is up
        assert first.startswith("serving recsys_cvae on 127.0.0.1:"), first
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    for noise in ("absl::InitializeLog", "oneDNN", "cuda", "custom gradients", "Traceback"):
        assert noise not in stderr, stderr
