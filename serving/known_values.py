"""Which attribute values a served export was trained on, read from its assets.extra.

Why: a served model answers an attribute value it never saw as "unknown" (the lookup's
out-of-vocabulary bucket), silently. `recsys-cvae query` warns about such values, or refuses
them with `--strict`, when the export it asks about is on this machine; the server's
GetModelMetadata lists input names and dtypes, not vocabularies. Plain files and JSON only:
the query command must not wait for TensorFlow to import.
"""

from __future__ import annotations

import json
import os

ASSETS_EXTRA = "assets.extra"
SPEC_FILE = "feature_spec.json"


def newest_local_version(export_base: str) -> str | None:
    """`export_base` itself when it is a version folder, else its highest integer version;
    None when neither is on this machine."""
    if os.path.isfile(os.path.join(export_base, ASSETS_EXTRA, SPEC_FILE)):
        return export_base
    if not os.path.isdir(export_base):
        return None
    versions = [int(n) for n in os.listdir(export_base) if n.isdigit()
                and os.path.isfile(os.path.join(export_base, n, ASSETS_EXTRA, SPEC_FILE))]
    return os.path.join(export_base, str(max(versions))) if versions else None


def unknown_values(export_dir: str, attributes: dict[str, str]) -> list[str]:
    """One phrase per given categorical attribute value missing from the export's vocabulary
    (`device='tablet'`), for inputs named as a stored attribute; derived and numeric inputs
    are not checked."""
    assets = os.path.join(export_dir, ASSETS_EXTRA)
    with open(os.path.join(assets, SPEC_FILE), encoding="utf-8") as f:
        spec = json.load(f)
    unknown = []
    for attribute in spec["attributes"]:
        name = attribute["name"]
        if name not in attributes or attribute["kind"] != "categorical" or attribute.get(
            "derived_from"
        ) or not attributes[name]:
            continue
        with open(os.path.join(assets, attribute["vocabulary_file"]), encoding="utf-8") as f:
            vocabulary = set(f.read().splitlines())
        if attributes[name] not in vocabulary:
            unknown.append(f"{name}={attributes[name]!r}")
    return unknown
