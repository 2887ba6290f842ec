"""The standard folders of one run under `--workdir W`, each overridable.

    W/features  W/model  W/export/<version>  W/candidates  W/report  W/data (synthetic input)
    W/protocols/<protocol>/{model,export}   every protocol but the main one (`cvae_runs`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recsys_cvae.spec import absolute_local_path


@dataclass
class Workdir:
    """The standard artefact folders of one run, each overridable from the command line."""

    root: str
    features: str = ""
    model: str = ""
    export: str = ""
    candidates: str = ""
    report: str = ""
    data: str = ""

    def __post_init__(self) -> None:
        # Resolved once, here at the CLI boundary: every stage (and every subprocess a stage
        # starts in another folder, such as the export verifier) then sees the same folder
        # whatever its cwd. URLs (gs://...) are left as they are.
        self.root = absolute_local_path(self.root)
        _check_can_be_folder(self.root)
        for name in ("features", "model", "export", "candidates", "report", "data"):
            value = getattr(self, name)
            default = os.path.join(self.root, name)
            setattr(self, name, absolute_local_path(value) if value else default)
            _check_can_be_folder(getattr(self, name))


def _check_can_be_folder(path: str) -> None:
    """Refuses a local folder that cannot exist because a file stands where one of its folders
    would be (`--workdir notes.txt/run`): said here in one line, before any stage has worked
    for minutes and a Beam writer fails with an OSError deep inside its step."""
    if "://" in path:
        return
    current = path
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent
    if not os.path.isdir(current):
        raise ValueError(
            f"{path}: cannot be a folder, {current} is a file; expected a folder, or a path "
            "that can be created"
        )
