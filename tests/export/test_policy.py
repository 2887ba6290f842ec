"""The serving policy baked into a real export: denied items and category rules never come
back from `recommend`, `generate`, their `_excluding` twins or the Beam candidates job, and
the export still verifies in a fresh process (TF2 loader and TF Serving's session loader).
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam_jobs import candidates as job
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import ExportConfig
from recsys_cvae.export import provenance as P
from recsys_cvae.export.model_card import CARD_MARKDOWN
from recsys_cvae.export.policy import PolicyError, load_policy
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.export.verification import verify_export
from recsys_cvae.training.fit import train
from tests.builders import tiny_model_config

INPUTS = {"age": False, "region": True, "device": True, "plan": True}


@pytest.fixture(scope="module")
def trained(features_dir, tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, tiny_model_config(1))
    return model_dir


def items_table(features_dir: str) -> dict[str, str]:
    """item id -> genre, from the items.csv the feature job read (recorded in the spec)."""
    inputs = S.FeatureSpec.load(features_dir).counts["inputs"]
    path = next(i["path"] for i in inputs if i["role"] == "items")
    with open(path) as f:
        return {row["item_id"]: row["genre"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def policy_export(trained, features_dir, tmp_path_factory) -> tuple[str, list[str]]:
    """(export_dir, denied ids): the three most popular items denied, genre_2 never for
    region north, genre_3 never for users under 30 (or of unknown age)."""
    spec = S.FeatureSpec.load(features_dir)
    denied = spec.item_vocabulary()[:3]  # most interacted first: they would be recommended
    folder = tmp_path_factory.mktemp("policy")
    path = folder / "policy.toml"
    path.write_text(
        f"[deny]\nitems = {denied + ['not-in-the-catalogue']!r}\n\n"
        "[[rules]]\nname = \"no genre_2 in the north\"\nitem_categories = [\"genre_2\"]\n"
        "attribute = \"region\"\nvalues = [\"north\"]\n\n"
        "[[rules]]\nitem_categories = [\"genre_3\"]\nattribute = \"age\"\nbelow = 30\n"
    )
    base = str(tmp_path_factory.mktemp("export"))
    export_dir = export_model(trained, base, ExportConfig(top_k=20, verify=False,
                                                          policy=str(path)))
    return export_dir, denied


def requests(spec: S.FeatureSpec, rows: int = 60) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(1)
    regions = spec.attribute_vocabulary("region") + [""]
    items = spec.item_vocabulary()
    ages = [20.0, 29.9, 30.0, 55.0, math.nan]
    return {
        "item_ids": tf.constant([[items[int(i)] for i in rng.choice(len(items), 5, replace=False)]
                                 for _ in range(rows)]),
        "age": tf.constant([ages[r % len(ages)] for r in range(rows)], tf.float32),
        "region": tf.constant([regions[r % len(regions)] for r in range(rows)]),
        "device": tf.constant(["ios"] * rows),
        "plan": tf.constant(["free"] * rows),
    }


def forbidden(row: int, inputs: dict[str, tf.Tensor], genre: dict[str, str],
              denied: list[str]) -> set[str]:
    region = inputs["region"].numpy()[row].decode()
    age = float(inputs["age"].numpy()[row])
    out = set(denied)
    if region == "north":
        out |= {i for i, g in genre.items() if "genre_2" in g.split("|")}
    if math.isnan(age) or age < 30:
        out |= {i for i, g in genre.items() if "genre_3" in g.split("|")}
    return out


@pytest.mark.parametrize("signature", ["recommend", "serving_default", "generate",
                                       "recommend_excluding", "generate_excluding"])
def test_no_signature_ever_returns_what_the_policy_forbids(
        policy_export, features_dir, signature):
    export_dir, denied = policy_export
    spec = S.FeatureSpec.load(features_dir)
    genre = items_table(features_dir)
    inputs = requests(spec)
    if signature.startswith("generate"):
        inputs.pop("item_ids")
    excluded = spec.item_vocabulary()[3:5]
    if signature.endswith("_excluding"):
        inputs["exclude_item_ids"] = tf.constant([excluded + ["", "unknown"]] * 60)
    loaded = tf.saved_model.load(export_dir)
    answered = loaded.signatures[signature](**inputs)["item_ids"].numpy().astype(str)
    allowed_genre_2 = 0
    for row, ids in enumerate(answered):
        returned = set(ids) - {""}
        assert not returned & forbidden(row, inputs, genre, denied), (row, signature)
        if signature.endswith("_excluding"):
            assert not returned & set(excluded)
        if inputs["region"].numpy()[row] != b"north":
            allowed_genre_2 += sum("genre_2" in genre[i].split("|") for i in returned)
    assert allowed_genre_2 > 0  # the rule removes genre_2 for the north only


def test_a_value_the_model_never_saw_counts_as_unknown(trained, features_dir, tmp_path):
    # when_unknown = "apply" (the default) must cover "North" and " north" too: the model
    # reads them as out-of-vocabulary, so a rule keyed on the profile must not be dodged
    # by a spelling
    spec = S.FeatureSpec.load(features_dir)
    genre = items_table(features_dir)
    policy = tmp_path / "policy.toml"
    policy.write_text("[[rules]]\nitem_categories = [\"genre_2\"]\nattribute = \"region\"\n"
                      "values = [\"north\"]\n")
    whole = len(spec.item_vocabulary())  # K = the catalogue: every allowed item comes back
    export_dir = export_model(trained, str(tmp_path / "policy"),
                              ExportConfig(top_k=whole, verify=False, policy=str(policy)))
    rows = 3
    inputs = {"age": tf.constant([45.0] * rows),  # 45: the age rule applies to no row
              "region": tf.constant(["North", " north", "mars"]),
              "device": tf.constant(["ios"] * rows), "plan": tf.constant(["free"] * rows)}
    assert "North" not in spec.attribute_vocabulary("region")
    genre_2 = {i for i, g in genre.items() if "genre_2" in g.split("|")}
    plain = export_model(trained, str(tmp_path / "plain"), ExportConfig(top_k=whole,
                                                                         verify=False))
    without = tf.saved_model.load(plain).signatures["generate"](**inputs)["item_ids"]
    assert set(without.numpy().astype(str).ravel()) & genre_2  # the rule has items to remove
    answered = tf.saved_model.load(export_dir).signatures["generate"](**inputs)["item_ids"]
    assert not set(answered.numpy().astype(str).ravel()) & genre_2


@pytest.mark.slow  # a fresh process loads the export twice (TF2 and session loaders)
def test_the_policy_export_verifies_in_a_fresh_process(policy_export, trained):
    export_dir, _ = policy_export
    summary = verify_export(export_dir, trained)
    assert {"recommend_excluding", "generate_excluding"} <= set(summary["signatures"])


def test_batch_candidates_respect_the_policy(policy_export, features_dir, tmp_path):
    export_dir, denied = policy_export
    output = str(tmp_path / "candidates")
    job.run(["--export-dir", export_dir, "--features-dir", features_dir, "--output-dir", output,
             "--set", "candidates.splits=['test', 'cold']"], test_pipeline=BeamTestPipeline())
    genre = items_table(features_dir)
    genre_2 = {i for i, g in genre.items() if "genre_2" in g.split("|")}
    seen = 0
    for split in ("test", "cold"):
        for row in C.iter_rows(C.split_files(output, "cvae", split)):
            assert not set(row[1]) & set(denied)
            seen += 1
    assert seen > 0 and genre_2  # rows were written; the rule had items to remove


def test_the_policy_is_recorded_in_the_export_and_its_card(policy_export):
    export_dir, denied = policy_export
    provenance = P.read_provenance(export_dir)["policy"]
    assert provenance["denied_items"] == 3
    assert [rule["name"] for rule in provenance["rules"]] == ["no genre_2 in the north",
                                                              "rule 1"]
    assert provenance["rules"][1]["applies_to"] == "age < 30, or unknown"
    assert provenance["denied_not_in_catalogue"] == 1
    card = open(os.path.join(export_dir, "assets.extra", CARD_MARKDOWN)).read()
    assert "no genre_2 in the north" in card and "3 items are never recommended" in card


@pytest.mark.parametrize("text, message", [
    ("[deny]\nitems = 3\n", "deny.items must be a list of strings"),
    ("color = 1\n", "unknown key(s) ['color']"),
    ("[[rules]]\nitem_categories = [\"genre_2\"]\nattribute = \"regoin\"\nvalues = [\"x\"]\n",
     "rules[0].attribute: 'regoin' is not a signature input (inputs: age, region"),
    ("[[rules]]\nitem_categories = [\"nope\"]\nattribute = \"region\"\nvalues = [\"x\"]\n",
     "rules[0].item_categories: ['nope'] not among the items' categories (genre_0"),
    ("[[rules]]\nitem_categories = [\"genre_2\"]\nattribute = \"region\"\nbelow = 3\n",
     "'region' is categorical: use values = [...]"),
    ("[[rules]]\nitem_categories = [\"genre_2\"]\nattribute = \"age\"\n",
     "a numeric rule needs below and/or at_least"),
    ("[[rules]]\nitem_categories = [\"genre_2\"]\nattribute = \"age\"\nbelow = \"x\"\n",
     "rules[0].below: expected a number, got 'x'"),
    ("[deny\n", "not valid TOML"),
])
def test_a_bad_policy_file_is_one_line_naming_the_field(features_dir, tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    items_file = next(i["path"] for i in S.FeatureSpec.load(features_dir).counts["inputs"]
                      if i["role"] == "items")
    with pytest.raises(PolicyError) as error:
        load_policy(str(path), ["i000001", "i000002"], INPUTS, items_file)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)
