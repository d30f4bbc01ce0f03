"""Seeded, stratified carving of validation and test sets out of a training set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved) with about ``fraction`` of each class carved.

    ``labels`` is (N,) int. With ``groups`` (e.g. patient ids) whole groups move together,
    so no group is on both sides; a group is stratified by its first image's label.
    The same labels, fraction and seed always give the same split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(n).astype(str)
    groups = np.asarray(groups).astype(str)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first]
    group_size = np.bincount(inverse, minlength=len(uniq))
    carved_groups: list[int] = []
    for cls in np.unique(group_label):
        members = np.flatnonzero(group_label == cls)
        members = members[rng.permutation(len(members))]
        target = fraction * group_size[members].sum()
        taken, carved_here = 0, 0
        for g in members:
            size = group_size[g]
            # Take a group while that brings the carved count closer to the target, and always
            # leave at least one group of the class on the kept side.
            if abs(taken + size - target) > abs(taken - target) or carved_here == len(members) - 1:
                break
            carved_groups.append(int(g))
            taken, carved_here = taken + size, carved_here + 1
    carved_mask = np.isin(inverse, carved_groups)
    return np.flatnonzero(~carved_mask), np.flatnonzero(carved_mask)
