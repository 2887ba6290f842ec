"""The deployment benchmark's own pieces: the planted generator and the raw-file hold-out.

No pipeline run here (that is the benchmark itself); these check what the benchmark's numbers
rest on: the oracle's probabilities, and that nothing held out reaches the training input.
"""

import os
import sys

import numpy as np

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_deployment as D  # noqa: E402
import planted_data as P  # noqa: E402


def test_true_scores_are_distributions_and_ignore_the_noise_column():
    world = P.make_world(num_items=40, num_genres=4, seed=3)
    users = {"region": ["north", "north"], "device": ["ios", "ios"], "plan": ["free", "free"],
             "age": ["30", "30"], "color": ["red", "blue"]}  # fmt: skip
    scores = world.true_scores(users)
    assert scores.shape == (2, 40)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    np.testing.assert_allclose(scores[0], scores[1])  # only color differs


def test_age_effect_is_not_monotone():
    world = P.make_world(num_items=40, num_genres=4, seed=3)
    ages = [16, 42, 80]
    taste = world.attribute_taste({"region": ["north"] * 3, "device": ["ios"] * 3,
                                   "plan": ["free"] * 3, "age": ages})  # fmt: skip
    genre = int(np.argmax(np.abs(world.bump)))
    middle, ends = taste[1, genre], taste[[0, 2], genre]
    assert (middle > ends).all() or (middle < ends).all()  # a bump (or dip) at 42


def test_planted_files_are_seeded(tmp_path):
    P.write_planted(str(tmp_path / "a"), num_users=50, num_items=30, seed=1)
    P.write_planted(str(tmp_path / "b"), num_users=50, num_items=30, seed=1)
    for name in ("users.csv", "interactions.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    header = (tmp_path / "a" / "interactions.csv").read_text().splitlines()[0]
    assert header == "user_id,item_id,rating,timestamp"


def test_hold_out_keeps_cold_users_and_targets_out_of_the_training_files(tmp_path):
    P.write_planted(str(tmp_path / "raw"), num_users=200, num_items=60, seed=0)
    raw = D.read_generic_csv(str(tmp_path / "raw"))
    split = D.hold_out(raw, seed=5)
    kept = set(split.history) & set(raw.profiles)
    raw.write(str(tmp_path / "out"), split.keep_line, kept)
    written = D.read_generic_csv(str(tmp_path / "out"))
    pairs = set(zip(written.interaction_users, written.interaction_items))

    assert split.cold_truth and not set(split.cold_truth) & set(written.profiles)
    assert not {u for u, _ in pairs} & set(split.cold_truth)
    assert not {(u, i) for u, t in split.warm_truth.items() for i in t} & pairs
    assert len(pairs) == int(split.keep_line.sum())
    # ~20% of a warm user's interactions are targets
    held = sum(len(t) for t in split.warm_truth.values())
    assert 0.17 < held / (held + len(pairs)) < 0.23
    # another seed, other cold users
    assert set(D.hold_out(raw, seed=6).cold_truth) != set(split.cold_truth)


def test_numeric_segments_are_training_quartiles():
    profiles = {f"u{i}": {"age": str(i), "job": "a" if i % 2 else "b"} for i in range(8)}
    keys = D.segment_keys(profiles, ("age", "job"), train_users=[f"u{i}" for i in range(8)])
    # quartile edges of 0..7 are 1.75, 3.5, 5.25: two users per bin
    assert [keys["age"][f"u{i}"] for i in range(8)] == ["q0", "q0", "q1", "q1", "q2", "q2",
                                                         "q3", "q3"]  # fmt: skip
    assert keys["job"]["u1"] == "a"
