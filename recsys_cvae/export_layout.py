"""TF Serving's export layout: a base path holding integer-named SavedModel versions.

Kept apart from `export.py` so readers of exports (the candidates job, the report's what-if
panel) find the newest version without importing model code.
"""

from __future__ import annotations

import posixpath

SAVED_MODEL_FILE = "saved_model.pb"


def newest_export(export_base: str) -> str | None:
    """The export version folder itself, or the newest integer version under a base path.

    None when `export_base` is neither a SavedModel nor a folder with an integer-named
    subfolder holding one.
    """
    import tensorflow as tf

    base = export_base.rstrip("/")
    if tf.io.gfile.exists(posixpath.join(base, SAVED_MODEL_FILE)):
        return base
    if not tf.io.gfile.isdir(base):
        return None
    versions = [
        int(n.rstrip("/")) for n in tf.io.gfile.listdir(base)
        if n.rstrip("/").isdigit()
        and tf.io.gfile.exists(posixpath.join(base, n.rstrip("/"), SAVED_MODEL_FILE))
    ]
    return posixpath.join(base, str(max(versions))) if versions else None


def next_version(export_base: str) -> int:
    """1 + the largest integer-named entry of `export_base` (1 if there is none)."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(export_base):
        return 1
    versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_base)
                if n.rstrip("/").isdigit()]
    return max(versions, default=0) + 1


def rename_to_next_version(temp_dir: str, export_base: str, attempts: int = 5) -> str:
    """Renames a finished folder inside `export_base` to its next integer version: atomic,
    so a server polling the base path never sees half a model; retries with a higher number
    if another writer (an export, a promotion) took the version meanwhile."""
    import tensorflow as tf

    for _ in range(attempts):
        export_dir = posixpath.join(export_base, str(next_version(export_base)))
        try:
            tf.io.gfile.rename(temp_dir, export_dir, overwrite=False)
            return export_dir
        except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError):
            continue
    raise RuntimeError(f"{export_base}: could not claim a free version after {attempts} tries")
