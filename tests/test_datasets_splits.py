"""Group-level splits, training subsets and the leakage check."""

from collections import Counter

import pytest

from dataset_scripts.splits import GroupLeakageError, check_no_group_leakage, group_split, group_subset


def _toy(n_groups=200, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        label = int(rng.choice(4, p=[0.6, 0.25, 0.13, 0.02]))
        for _ in range(int(rng.integers(1, 4))):
            labels.append(label)
            groups.append(f"G{g}")
    return labels, groups


def test_group_split_no_group_in_two_splits_and_seeded():
    labels, groups = _toy()
    a = group_split(labels, groups, seed=3)
    assert a == group_split(labels, groups, seed=3)
    assert a != group_split(labels, groups, seed=4)
    by_split = {}
    for g, s in zip(groups, a):
        by_split.setdefault(s, []).append(g)
    check_no_group_leakage(by_split)
    assert set(a) == {"train", "validation", "test"}


def test_group_split_is_stratified():
    labels, groups = _toy(n_groups=1000)
    a = group_split(labels, groups, fractions=(0.8, 0.1, 0.1), seed=0)
    per = {s: Counter(lab for lab, x in zip(labels, a) if x == s) for s in ("train", "validation", "test")}
    for label in (0, 1, 2):
        total = sum(per[s][label] for s in per)
        assert 0.7 < per["train"][label] / total < 0.9


def test_classes_with_very_few_groups_do_not_crash():
    labels = [0] * 50 + [1, 2, 2]
    groups = [f"a{i}" for i in range(50)] + ["b0", "c0", "c1"]
    a = group_split(labels, groups, seed=0)
    assert a[50] == "train"  # a class with one group keeps it in train
    assert len(a) == 53


def test_leakage_check_fails_on_a_leaking_split():
    with pytest.raises(GroupLeakageError, match="1 group"):
        check_no_group_leakage({"train": ["L1", "L2"], "validation": ["L3"], "test": ["L2"]})
    check_no_group_leakage({"train": ["L1", "L1", "L2"], "test": ["L3"]})


def test_leakage_check_reads_dataset_dicts():
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"train": Dataset.from_dict({"group_id": ["a", "b"]}),
                      "test": Dataset.from_dict({"group_id": ["b"]})})
    with pytest.raises(GroupLeakageError):
        check_no_group_leakage(dd)


def test_group_subset_keeps_whole_groups_and_every_class():
    labels, groups = _toy(n_groups=400)
    keep = group_subset(labels, groups, fraction=0.12, seed=0)
    kept_groups = {groups[i] for i in keep}
    # whole groups only
    assert all(groups[i] in kept_groups for i in range(len(groups)) if groups[i] in kept_groups) and all(
        i in set(keep) for i, g in enumerate(groups) if g in kept_groups
    )
    assert {labels[i] for i in keep} == set(labels)
    n_groups = len(set(groups))
    assert 0.08 * n_groups < len(kept_groups) < 0.16 * n_groups
    with pytest.raises(ValueError, match="train_fraction"):
        group_subset(labels, groups, fraction=0.0)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        group_split([0, 1], ["a", "b"], fractions=(0.5, 0.2, 0.2))
