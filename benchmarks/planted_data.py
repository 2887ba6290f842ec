"""Generic-CSV data with a planted attribute → taste structure, and its true probabilities.

Why: on real data nobody knows how much of a cold user's taste their attributes can tell, so
"the CVAE beats segment popularity" says nothing about how far it is from the best possible
answer. Here the generator's probabilities are known, so `bench_deployment.py` can score an
oracle that ranks items by them and report the share of the segment-popularity → oracle gap
a model recovers. The structure is chosen so that the easy baselines miss parts of it: one
attribute alone or a pair of them cannot express it, the numeric attribute's effect is not
monotone (4 quantile bins see it coarsely, a linear term not at all), and one column is pure
noise a model must learn to ignore.

The planted structure (`make_world`, drawn from `seed`):

    items     `num_items` items ("i00001", ...), each in one of `num_genres` genres (unequal
              genre sizes, Dirichlet shares); within a genre a Zipf(0.9) popularity, so a few
              items dominate (item popularity skew). Ids are shuffled: an id says nothing.
    users     region   6 values, shares 35/25/15/12/8/5 %          (categorical)
              device   ios/android/web/tv, 45/35/15/5 %            (categorical)
              plan     free/premium/family, 70/20/10 %             (categorical)
              age      16..80 years, ~N(38, 13) rounded, clipped    (numeric)
              color    5 values, uniform, NO effect on taste        (categorical, pure noise)
    taste     attribute logits over genres, per genre g:
                  region[r, g] + device[d, g] + plan[p, g]
                + bump[g] · exp(-½ ((age − 42) / 8)²)               taste peaks (or dips) in
                                                                   middle age: non-monotone
                + slope[g] · [plan = premium] · (age − 40) / 15     categorical × numeric
              attribute taste a_u = softmax(logits); each user also has a personal taste
              d_u ~ Dirichlet(0.5, ..., 0.5), and mixes them: t_u = (1 − w) a_u + w d_u, w = 0.35.
    history   n_u ~ lognormal(log mean_interactions, 0.6), clipped to [5, num_items / 4]
              distinct items drawn without replacement (Gumbel top-k, i.e. successive draws)
              from p(i | u) = t_u[genre(i)] · pop(i | genre(i)); rating 1..5 and a timestamp
              within one year are uniform at random (the product's defaults keep every
              rating; a time cut holds out a random 20% of everyone's events).

`PlantedWorld.true_scores(users)` is the probability of an item at a draw given the user's
attributes only, E[p(i | u) | attributes] = ((1 − w) a_u[genre(i)] + w / G) · pop(i | genre(i)),
exact because the Dirichlet's mean is uniform. Ranking by it is the oracle for a cold user
(up to the small effect of drawing without replacement). `write_planted` writes
interactions.csv (user_id,item_id,rating,timestamp) and users.csv (user_id,region,device,
plan,age,color), the generic CSV layout the product reads.

    python benchmarks/planted_data.py --out /tmp/planted --users 6000 --items 1500
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

REGIONS = ("north", "south", "east", "west", "centre", "islands")
REGION_SHARES = (0.35, 0.25, 0.15, 0.12, 0.08, 0.05)
DEVICES = ("ios", "android", "web", "tv")
DEVICE_SHARES = (0.45, 0.35, 0.15, 0.05)
PLANS = ("free", "premium", "family")
PLAN_SHARES = (0.70, 0.20, 0.10)
COLORS = ("red", "green", "blue", "black", "white")  # pure noise
ATTRIBUTES = ("region", "device", "plan", "age", "color")
AGE_MIN, AGE_MAX = 16, 80
AGE_PEAK, AGE_WIDTH = 42.0, 8.0
PERSONAL_WEIGHT = 0.35
PERSONAL_CONCENTRATION = 0.5
ZIPF_EXPONENT = 0.9
START_TIMESTAMP = 1_600_000_000


@dataclasses.dataclass(frozen=True)
class PlantedWorld:
    """The generator's parameters: enough to recompute every user's true probabilities.

    Attributes:
      item_ids: [num_items] item id strings; column j of `true_scores` is item_ids[j].
      item_genre: [num_items] int genre of each item.
      item_popularity: [num_items] p(item | its genre) (sums to 1 within each genre).
      region, device, plan: [num_values, num_genres] logit effects of each value.
      bump: [num_genres] amplitude of the middle-age bump.
      slope: [num_genres] premium-only age slope (the categorical × numeric interaction).
    """

    item_ids: tuple[str, ...]
    item_genre: np.ndarray
    item_popularity: np.ndarray
    region: np.ndarray
    device: np.ndarray
    plan: np.ndarray
    bump: np.ndarray
    slope: np.ndarray

    @property
    def num_genres(self) -> int:
        return self.region.shape[1]

    def attribute_taste(self, users: Mapping[str, Sequence]) -> np.ndarray:
        """[num_users, num_genres] a_u = softmax of the attribute logits.

        users: column name -> values (strings as read from users.csv, or numbers for age);
        needs region, device, plan and age; color is ignored, as the generator ignores it.
        """
        region = _codes(users["region"], REGIONS, "region")
        device = _codes(users["device"], DEVICES, "device")
        plan = _codes(users["plan"], PLANS, "plan")
        age = np.asarray([float(a) for a in users["age"]], dtype=np.float64)
        bump = np.exp(-0.5 * ((age - AGE_PEAK) / AGE_WIDTH) ** 2)
        premium = (plan == PLANS.index("premium")).astype(np.float64)
        logits = (
            self.region[region]
            + self.device[device]
            + self.plan[plan]
            + bump[:, None] * self.bump[None, :]
            + (premium * (age - 40.0) / 15.0)[:, None] * self.slope[None, :]
        )
        logits -= logits.max(axis=1, keepdims=True)
        taste = np.exp(logits)
        return taste / taste.sum(axis=1, keepdims=True)

    def true_scores(self, users: Mapping[str, Sequence]) -> np.ndarray:
        """[num_users, num_items] E[p(item | user) | the user's attributes]; rows sum to 1."""
        taste = (1 - PERSONAL_WEIGHT) * self.attribute_taste(users) + (
            PERSONAL_WEIGHT / self.num_genres
        )
        return taste[:, self.item_genre] * self.item_popularity[None, :]


def _codes(values: Sequence, vocabulary: Sequence[str], name: str) -> np.ndarray:
    index = {v: i for i, v in enumerate(vocabulary)}
    try:
        return np.asarray([index[str(v)] for v in values], dtype=np.int64)
    except KeyError as error:
        unknown = error.args[0]
        raise ValueError(f"{name}: unknown value {unknown!r}; expected {vocabulary}") from None


def make_world(num_items: int = 1500, num_genres: int = 12, seed: int = 0) -> PlantedWorld:
    """Draws the catalogue and the attribute effects (see the module docstring)."""
    rng = np.random.default_rng([seed, 0])
    shares = rng.dirichlet(np.full(num_genres, 2.0))
    genre = np.sort(rng.choice(num_genres, size=num_items, p=shares))
    genre[:num_genres] = np.arange(num_genres)  # every genre has at least one item
    popularity = np.zeros(num_items)
    for g in range(num_genres):
        members = np.flatnonzero(genre == g)
        weights = 1.0 / np.arange(1, len(members) + 1) ** ZIPF_EXPONENT
        popularity[members] = weights / weights.sum()
    order = rng.permutation(num_items)  # ids carry no genre or popularity
    item_ids = tuple(f"i{n:05d}" for n in range(1, num_items + 1))
    return PlantedWorld(
        item_ids=item_ids,
        item_genre=genre[order],
        item_popularity=popularity[order],
        region=rng.normal(0.0, 1.0, (len(REGIONS), num_genres)),
        device=rng.normal(0.0, 0.7, (len(DEVICES), num_genres)),
        plan=rng.normal(0.0, 0.7, (len(PLANS), num_genres)),
        bump=rng.normal(0.0, 1.5, num_genres),
        slope=rng.normal(0.0, 1.0, num_genres),
    )


def sample_users(num_users: int, seed: int = 0) -> dict[str, list]:
    """users.csv's columns: user_id plus the ATTRIBUTES (age as int), unequal segment sizes."""
    rng = np.random.default_rng([seed, 1])
    age = np.clip(np.rint(rng.normal(38.0, 13.0, num_users)), AGE_MIN, AGE_MAX).astype(int)
    return {
        "user_id": [f"u{n:06d}" for n in range(1, num_users + 1)],
        "region": [REGIONS[i] for i in rng.choice(len(REGIONS), num_users, p=REGION_SHARES)],
        "device": [DEVICES[i] for i in rng.choice(len(DEVICES), num_users, p=DEVICE_SHARES)],
        "plan": [PLANS[i] for i in rng.choice(len(PLANS), num_users, p=PLAN_SHARES)],
        "age": age.tolist(),
        "color": [COLORS[i] for i in rng.integers(0, len(COLORS), num_users)],
    }


def sample_interactions(
    world: PlantedWorld,
    users: Mapping[str, Sequence],
    mean_interactions: float = 40.0,
    seed: int = 0,
    chunk: int = 1000,
) -> dict[str, list]:
    """interactions.csv's columns: each user's distinct items drawn from their own taste."""
    rng = np.random.default_rng([seed, 2])
    num_users, num_items = len(users["user_id"]), len(world.item_ids)
    attribute_taste = world.attribute_taste(users)
    personal = rng.dirichlet(np.full(world.num_genres, PERSONAL_CONCENTRATION), num_users)
    taste = (1 - PERSONAL_WEIGHT) * attribute_taste + PERSONAL_WEIGHT * personal
    counts = rng.lognormal(np.log(mean_interactions), 0.6, num_users)
    counts = np.clip(np.rint(counts), 5, max(5, num_items // 4)).astype(int)
    out: dict[str, list] = {"user_id": [], "item_id": [], "rating": [], "timestamp": []}
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        log_p = np.log(taste[start:stop][:, world.item_genre] * world.item_popularity[None, :])
        keys = log_p + rng.gumbel(size=log_p.shape)  # Gumbel top-k = sampling w/o replacement
        order = np.argsort(-keys, axis=1)
        for row, u in enumerate(range(start, stop)):
            items = order[row, : counts[u]]
            out["user_id"] += [users["user_id"][u]] * len(items)
            out["item_id"] += [world.item_ids[i] for i in items]
    total = len(out["item_id"])
    out["rating"] = rng.integers(1, 6, total).tolist()
    out["timestamp"] = (START_TIMESTAMP + rng.integers(0, 365 * 86400, total)).tolist()
    return out


def write_planted(
    out_dir: str,
    num_users: int = 6000,
    num_items: int = 1500,
    mean_interactions: float = 40.0,
    seed: int = 0,
) -> PlantedWorld:
    """Writes interactions.csv and users.csv into out_dir; returns the world behind them."""
    world = make_world(num_items=num_items, seed=seed)
    users = sample_users(num_users, seed=seed)
    interactions = sample_interactions(world, users, mean_interactions, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    for name, table in (("users", users), ("interactions", interactions)):
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(list(table))
            writer.writerows(zip(*table.values()))
    return world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for interactions.csv, users.csv")
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--mean-interactions", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_planted(args.out, args.users, args.items, args.mean_interactions, args.seed)
    print(f"wrote {args.out}/interactions.csv and users.csv")


if __name__ == "__main__":
    main()
