"""The two MovieLens layouts: their fixed file names, columns and separators, and their codes.

Why a module of its own: MovieLens files have no header, so everything `detect_layout` reads
from a generic table's header is fixed here instead, and their users and items rows need
layout-specific meaning (ML-1M age and occupation codes, ML-100K genre flags, the zip region
derived from the zip code) before the shared checks of `rows` apply. Nothing here opens a file.

    ml-100k   u.data (user\\titem\\trating\\ttimestamp), u.user (user|age|gender|occupation|zip),
              u.item (item|title|date|video date|url|19 genre flags), latin-1
    ml-1m     ratings.dat, users.dat (UserID::Gender::Age::Occupation::Zip-code), movies.dat,
              `::`-separated, latin-1
"""

from __future__ import annotations

from collections.abc import Mapping

from recsys_cvae.datasets.errors import BadRow
from recsys_cvae.datasets.rows import INTERACTIONS, ITEMS, USERS
from recsys_cvae.derivations import FIRST_CHAR_UPPER
from recsys_cvae.spec import CATEGORICAL, NUMERIC

ML_100K = "ml-100k"
ML_1M = "ml-1m"
ENCODING = "latin-1"

# MovieLens-1M codes (README of ml-1m). Codes stay the values (what users.dat and a serving
# client send); the sets only reject codes the README does not define.
ML_1M_AGE_CODES = frozenset({"1", "18", "25", "35", "45", "50", "56"})
ML_1M_OCCUPATION_CODES = frozenset(str(code) for code in range(21))
ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

FILE_NAMES = {
    ML_100K: {INTERACTIONS: "u.data", USERS: "u.user", ITEMS: "u.item"},
    ML_1M: {INTERACTIONS: "ratings.dat", USERS: "users.dat", ITEMS: "movies.dat"},
}
COLUMNS = {
    ML_100K: {
        INTERACTIONS: ("user_id", "item_id", "rating", "timestamp"),
        USERS: ("user_id", "age", "gender", "occupation", "zip_code"),
        ITEMS: ("item_id", "title", "release_date", "video_release_date", "url")
        + tuple(f"genre_{i}" for i in range(len(ML_100K_GENRES))),
    },
    ML_1M: {
        INTERACTIONS: ("user_id", "item_id", "rating", "timestamp"),
        USERS: ("user_id", "gender", "age", "occupation", "zip_code"),
        ITEMS: ("item_id", "title", "genres"),
    },
}
SEPARATORS = {
    ML_100K: {INTERACTIONS: "\t", USERS: "|", ITEMS: "|"},
    ML_1M: {INTERACTIONS: "::", USERS: "::", ITEMS: "::"},
}
# ML-100K: age is a number of years. zip_region keeps the first character of the zip code:
# raw zips are ~800 near-unique values (one user each, nothing to learn), while the first
# digit is a US postal region (0 = north-east ... 9 = west coast; letters = Canada).
# It is derived (DERIVED below), so the serving signatures take the raw `zip_code` and
# derive the region in the graph.
KINDS = {
    ML_100K: {"age": NUMERIC, "gender": CATEGORICAL, "occupation": CATEGORICAL,
              "zip_region": CATEGORICAL},
    # ML-1M: age is already a bucket code (1 = under 18, 18 = 18-24, ...) and occupation a
    # code 0..20, so both are categories, not quantities.
    ML_1M: {"gender": CATEGORICAL, "age": CATEGORICAL, "occupation": CATEGORICAL,
            "zip_region": CATEGORICAL},
}  # fmt: skip
# Derived attributes: attribute -> (raw users column, `recsys_cvae.derivations` name). The
# Layout applies them to every users row and the feature spec records them.
DERIVED = {
    ML_100K: {"zip_region": ("zip_code", FIRST_CHAR_UPPER)},
    ML_1M: {"zip_region": ("zip_code", FIRST_CHAR_UPPER)},
}


def ml_100k_user(fields: Mapping[str, str]) -> dict[str, str]:
    """The raw profile values of one u.user row (named fields); `DERIVED` adds zip_region."""
    return {
        "age": fields["age"],
        "gender": fields["gender"],
        "occupation": fields["occupation"],
        "zip_code": fields["zip_code"],
    }


def ml_1m_user(fields: Mapping[str, str]) -> dict[str, str]:
    """The raw profile values of one users.dat row (named fields); `DERIVED` adds zip_region.

    Raises:
      BadRow: the age or occupation code is not one the ml-1m README defines.
    """
    if fields["age"] not in ML_1M_AGE_CODES:
        raise BadRow("bad_attribute", f"age code {fields['age']!r} is not an ml-1m code")
    if fields["occupation"] not in ML_1M_OCCUPATION_CODES:
        raise BadRow("bad_attribute", f"occupation code {fields['occupation']!r} is not 0..20")
    return {
        "gender": fields["gender"],
        "age": fields["age"],
        "occupation": fields["occupation"],
        "zip_code": fields["zip_code"],
    }


def ml_100k_item(fields: Mapping[str, str]) -> dict[str, str]:
    """The descriptive columns of one u.item row: its 19 genre flags become `genres` (a|b).

    Raises:
      BadRow: a genre flag is neither 0 nor 1.
    """
    flags = [fields[f"genre_{i}"] for i in range(len(ML_100K_GENRES))]
    if any(flag not in ("0", "1") for flag in flags):
        raise BadRow("bad_attribute", "genre flags must be 0 or 1")
    genres = "|".join(g for g, flag in zip(ML_100K_GENRES, flags) if flag == "1")
    return {"title": fields["title"], "release_date": fields["release_date"], "genres": genres}


def ml_1m_item(fields: Mapping[str, str]) -> dict[str, str]:
    """The descriptive columns of one movies.dat row (genres are already `a|b`)."""
    return {"title": fields["title"], "genres": fields["genres"]}
