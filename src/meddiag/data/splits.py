"""Seeded, stratified carving of validation and test sets out of a training set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratification_key(labels: np.ndarray) -> np.ndarray:
    """One class per image to stratify splits by: the label itself (N,) for single-label data; for
    multi-label (N, K) 1/0/NaN targets the image's rarest present finding (K for an image with
    none), so that carved splits and folds keep every finding represented."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    positives = np.nan_to_num(labels) > 0.5
    frequency = positives.sum(0)
    rank = np.where(positives, frequency[None, :], np.iinfo(np.int64).max)
    return np.where(positives.any(1), rank.argmin(1), labels.shape[1])


def stratified_group_folds(labels: np.ndarray, k: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """A fold number in 0..k-1 for each image: each class spread evenly over the folds and, with
    ``groups`` (patients), every group in exactly one fold. Seeded, so the same inputs give the same folds."""
    labels = np.asarray(labels)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups if groups is not None else np.arange(len(labels)).astype(str)).astype(str)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label, group_size = labels[first], np.bincount(inverse, minlength=len(uniq))
    group_fold = np.zeros(len(uniq), dtype=np.int64)
    for cls in np.unique(group_label):
        members = np.flatnonzero(group_label == cls)
        members = members[rng.permutation(len(members))]
        load = np.zeros(k)
        for g in members[np.argsort(-group_size[members], kind="stable")]:  # biggest first, to the lightest fold
            fold = int(np.argmin(load + rng.random(k) * 1e-6))
            group_fold[g] = fold
            load[fold] += group_size[g]
    return group_fold[inverse]


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
