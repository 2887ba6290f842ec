"""The two ways raw input is refused: a whole data directory, or one row of it.

Why a module of its own: detection (`layouts`), the MovieLens and generic table readers and the
shared row checks (`rows`) all raise these, and the Beam feature job catches them, so they sit
below every reader. `BadRow.reason` is the stable short code Beam counts and the dead letters
carry; the list of codes lives here, next to the class, so there is one place to look it up.
"""

from __future__ import annotations


class InputError(ValueError):
    """The data directory does not hold a usable layout (the message is one line for users)."""


class BadRow(ValueError):
    """One row cannot be used; `reason` is a short stable code, `detail` says what was wrong.

    Codes: wrong_field_count, undecodable, binary_garbage (control characters), field_too_long,
    repeated_header (a CSV header line again inside the file), empty_user_id, empty_item_id,
    bad_rating, bad_timestamp, bad_attribute (and, from the feature job, duplicate_user_id).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason
