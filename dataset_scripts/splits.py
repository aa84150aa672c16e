"""Group-level, class-stratified, seeded splits, group-level training subsets, and the leakage check.

Every image of a group (`group_id`: ISIC 2019 `lesion_id`, ISIC 2024 `patient_id`, Derm7pt case) lands in the same
split. ISIC 2019 images without a `lesion_id` are their own group, so ISIC 2019 splits are lesion-level, not
patient-level (the release has no patient id).

Stratification is by the group's majority label (ties: the lowest class index; -1 is its own stratum). Inside each
stratum the groups are shuffled with `numpy.random.default_rng(seed)` and cut at the rounded cumulative fractions, so
a class with one or two groups puts them in the first split (train) instead of failing.
"""

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


class GroupLeakageError(ValueError):
    """A group appears in more than one split."""


def _group_strata(labels: Sequence[int], groups: Sequence[str]) -> dict:
    per_group = defaultdict(Counter)
    for label, group in zip(labels, groups):
        per_group[group][int(label)] += 1
    strata = defaultdict(list)
    for group in sorted(per_group):
        counts = per_group[group]
        top = max(counts.values())
        strata[min(k for k, v in counts.items() if v == top)].append(group)
    return strata


def _cut(n: int, fractions: Sequence[float]) -> list:
    bounds = [int(np.floor(n * c + 0.5)) for c in np.cumsum(fractions)]
    bounds[-1] = n
    return bounds


def group_split(
    labels: Sequence[int],
    groups: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    split_names: Sequence[str] = SPLIT_NAMES,
) -> list:
    """Assign each row a split name, group-level and stratified by class.

    Args:
        labels (`Sequence[int]`): class index per row (-1 allowed).
        groups (`Sequence[str]`): group id per row.
        fractions (`Sequence[float]`, *optional*, defaults to `(0.8, 0.1, 0.1)`): share of groups per split; must be
            non-negative and sum to 1.
        seed (`int`, *optional*, defaults to 0): shuffling seed.
        split_names (`Sequence[str]`, *optional*): one name per fraction.

    Returns:
        `list[str]`: the split name of every row.
    """
    if len(labels) != len(groups):
        raise ValueError(f"labels and groups differ in length: {len(labels)} vs {len(groups)}")
    if len(fractions) != len(split_names):
        raise ValueError(f"{len(fractions)} fractions for {len(split_names)} split names {list(split_names)}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    assignment = {}
    strata = _group_strata(labels, groups)
    for label in sorted(strata):
        members = list(strata[label])
        rng.shuffle(members)
        start = 0
        for name, end in zip(split_names, _cut(len(members), fractions)):
            for g in members[start:end]:
                assignment[g] = name
            start = end
    return [assignment[g] for g in groups]


def group_subset(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int = 0) -> list:
    """Indices of the rows kept when taking `fraction` of the groups of every class (at least one group per class).

    Used for the data-efficiency experiment (paper: 12% of the training data); applied to the training split only.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    keep = set()
    strata = _group_strata(labels, groups)
    for label in sorted(strata):
        members = list(strata[label])
        rng.shuffle(members)
        n = max(1, int(np.floor(len(members) * fraction + 0.5)))
        keep.update(members[:n])
    return [i for i, g in enumerate(groups) if g in keep]


def check_no_group_leakage(splits: Mapping[str, Iterable[str]]) -> None:
    """Raise `GroupLeakageError` if any group id occurs in more than one split.

    Args:
        splits: split name -> group ids, or a `DatasetDict` (its `group_id` columns are read).
    """
    seen = {}
    leaks = defaultdict(set)
    for split, groups in splits.items():
        if hasattr(groups, "column_names"):
            groups = groups["group_id"]
        for g in set(groups):
            if g in seen and seen[g] != split:
                leaks[g].update({seen[g], split})
            else:
                seen[g] = split
    if leaks:
        examples = ", ".join(f"{g} in {sorted(s)}" for g, s in sorted(leaks.items())[:5])
        raise GroupLeakageError(f"{len(leaks)} group(s) appear in more than one split, e.g. {examples}")


__all__ = ["SPLIT_NAMES", "GroupLeakageError", "check_no_group_leakage", "group_split", "group_subset"]
