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
