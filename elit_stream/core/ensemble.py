"""The active-member state: an immutable value, swapped whole between frames.

Every change returns a NEW `ActiveSet` with `version + 1`, or raises `SelectionError` and leaves
the current one untouched, so a result can always name the exact set and version it used.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


class SelectionError(ValueError):
    """A requested active set is refused (empty, unknown ids, malformed); nothing changes."""


@dataclass(frozen=True)
class ActiveSet:
    all_members: tuple[int, ...]
    active: tuple[int, ...]
    version: int = 0
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.all_members:
            raise SelectionError("an ensemble needs at least one member")
        object.__setattr__(self, "_index", {m: i for i, m in enumerate(self.all_members)})

    @classmethod
    def full(cls, member_ids: Iterable[int]) -> ActiveSet:
        ids = _as_ids(member_ids)
        if len(set(ids)) != len(ids):
            raise SelectionError(f"member ids repeat: {list(ids)}")
        return cls(ids, ids, 0)

    def set_active(self, ids) -> ActiveSet:
        """Exactly these members count from the next frame on."""
        return self._with(set(self._known(ids)))

    def deselect(self, ids) -> ActiveSet:
        return self._with(set(self.active) - set(self._known(ids)))

    def select(self, ids) -> ActiveSet:
        return self._with(set(self.active) | set(self._known(ids)))

    def reset(self) -> ActiveSet:
        """All members active again (a new version even if nothing was deselected)."""
        return self._with(set(self.all_members))

    @property
    def indices(self) -> np.ndarray:
        """Positions of the active members in `all_members` (= rows of probs), for analyse()."""
        return np.fromiter((self._index[m] for m in self.active), np.intp, len(self.active))

    @property
    def inactive(self) -> tuple[int, ...]:
        return tuple(m for m in self.all_members if m not in self.active)

    def is_active(self, member_id: int) -> bool:
        return member_id in self.active

    def _known(self, ids) -> tuple[int, ...]:
        ids = _as_ids(ids)
        unknown = sorted(set(ids) - set(self.all_members))
        if unknown:
            raise SelectionError(f"unknown member ids {unknown}; members are "
                                 f"{list(self.all_members)}")
        return ids

    def _with(self, chosen: set) -> ActiveSet:
        if not chosen:
            raise SelectionError("the active set would be empty; at least one member must stay")
        active = tuple(m for m in self.all_members if m in chosen)
        return ActiveSet(self.all_members, active, self.version + 1)


def _as_ids(ids) -> tuple[int, ...]:
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = (ids,)
    try:
        out = tuple(ids)
    except TypeError:
        raise SelectionError(f"member ids must be a list of integers, got {ids!r}") from None
    for i in out:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise SelectionError(f"member ids must be integers, got {i!r}")
    return tuple(int(i) for i in out)
