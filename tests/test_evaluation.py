"""One-shot episode protocol: drawer-disjoint support/query, within-group classes, accuracy on known vectors."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from siamesedb.errors import InvalidInputError
from siamesedb.data import group_of
from siamesedb.evaluation import drawer_of, episode_accuracies, sample_episode


def omniglot_like(groups: int = 3, chars: int = 25, drawers: int = 6, dim: int = 16, seed: int = 0):
    """Labels `Gg/character_cc`, paths `gg_cc_dd.png` with drawer dd, and one tight cluster of vectors per class."""
    rng = np.random.default_rng(seed)
    labels, paths, vectors = [], [], []
    for g in range(groups):
        for c in range(chars):
            centre = rng.normal(size=dim)
            for d in range(1, drawers + 1):
                labels.append(f"G{g}/character{c:02d}")
                paths.append(f"/data/G{g}/character{c:02d}/{g:02d}{c:02d}_{d:02d}.png")
                vectors.append(centre + 0.01 * rng.normal(size=dim))
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, labels, paths


def index_maps(labels):
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    by_class = {c: np.asarray(ix) for c, ix in by_class.items()}
    by_group = defaultdict(list)
    for c in sorted(by_class):
        by_group[group_of(c)].append(c)
    return by_class, by_group


def test_drawer_and_group_parsing():
    assert drawer_of("images_evaluation/Angelic/character01/0965_01.png") == "01"
    assert drawer_of("signature.png") is None
    assert group_of("Latin/character07") == "Latin"
    assert group_of("s12") == "s12"


@pytest.mark.parametrize("shot", [1, 3])
def test_within_group_episode_follows_lakes_protocol(shot):
    vectors, labels, paths = omniglot_like()
    label_array = np.asarray(labels, dtype=object)
    drawers = np.asarray([drawer_of(p) for p in paths], dtype=object)
    by_class, by_group = index_maps(labels)
    rng = np.random.default_rng(1)
    for _ in range(50):
        support, queried = sample_episode(label_array, drawers, 20, shot, 1, rng, True, by_class, by_group)
        assert len(support) == 20 * shot and len(queried) == 20
        classes = set(label_array[support])
        assert len(classes) == 20 and set(label_array[queried]) == classes
        assert len({group_of(c) for c in classes}) == 1  # one alphabet per episode
        support_drawers, query_drawers = set(drawers[support]), set(drawers[queried])
        assert len(support_drawers) == shot and len(query_drawers) == 1  # shared by every class
        assert not support_drawers & query_drawers  # drawer-disjoint
        assert not set(support) & set(queried)


def test_unstructured_episode_draws_distinct_images_across_groups():
    vectors, labels, paths = omniglot_like()
    label_array = np.asarray(labels, dtype=object)
    drawers = np.asarray([drawer_of(p) for p in paths], dtype=object)
    by_class, by_group = index_maps(labels)
    rng = np.random.default_rng(2)
    groups_seen = set()
    for _ in range(30):
        support, queried = sample_episode(label_array, drawers, 5, 2, 2, rng, False, by_class, by_group)
        assert len(support) == 10 and len(queried) == 10
        assert not set(support) & set(queried)
        groups_seen |= {group_of(c) for c in label_array[support]}
    assert len(groups_seen) > 1


def test_separable_vectors_score_perfectly_and_random_ones_near_chance():
    vectors, labels, paths = omniglot_like()
    perfect = episode_accuracies(vectors, labels, paths, way=20, episodes=50, within_group=True, seed=0)
    assert perfect.shape == (50,) and np.all(perfect == 1.0)
    noise = np.random.default_rng(3).normal(size=vectors.shape).astype(np.float32)
    chance = episode_accuracies(noise, labels, paths, way=5, episodes=400, seed=0)
    assert 0.1 < chance.mean() < 0.3  # 1/5 expected


def test_episodes_are_deterministic_for_a_seed():
    vectors, labels, paths = omniglot_like()
    noise = vectors + 0.3 * np.random.default_rng(4).normal(size=vectors.shape).astype(np.float32)
    a = episode_accuracies(noise, labels, paths, way=10, episodes=20, seed=7)
    b = episode_accuracies(noise, labels, paths, way=10, episodes=20, seed=7)
    assert np.array_equal(a, b)


def test_too_few_classes_is_a_clear_error():
    vectors, labels, paths = omniglot_like(groups=2, chars=5)
    with pytest.raises(InvalidInputError, match="20-way"):
        episode_accuracies(vectors, labels, paths, way=20, episodes=1)
    with pytest.raises(InvalidInputError, match="no group"):
        episode_accuracies(vectors, labels, paths, way=6, episodes=1, within_group=True)


def test_roc_auc_against_an_explicit_double_loop():
    from siamesedb.evaluation import roc_auc

    rng = np.random.default_rng(5)
    genuine = np.round(rng.normal(0.6, 0.2, 40), 2)  # rounded: ties are counted as halves
    impostor = np.round(rng.normal(0.4, 0.2, 60), 2)
    explicit = sum((g > i) + 0.5 * (g == i) for g in genuine for i in impostor) / (40 * 60)
    assert roc_auc(genuine, impostor) == pytest.approx(explicit)
    assert roc_auc([1.0], [0.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0


def signature_like(writers=8, genuine=6, forged=5, dim=8, seed=0):
    """Writer w: genuine vectors near centre_w, forgeries near it too but shifted (hard impostors)."""
    rng = np.random.default_rng(seed)
    labels, vectors = [], []
    for w in range(1, writers + 1):
        centre = rng.normal(size=dim)
        for _ in range(genuine):
            labels.append(f"U{w:02d}/genuine")
            vectors.append(centre + 0.1 * rng.normal(size=dim))
        for _ in range(forged):
            labels.append(f"U{w:02d}/forged")
            vectors.append(centre + 0.6 * rng.normal(size=dim))
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def test_reference_trials_follow_the_protocol():
    from siamesedb import rules
    from siamesedb.evaluation import reference_trials

    vectors, labels = signature_like()
    rng = np.random.default_rng(0)
    genuine, forged = reference_trials(vectors, labels, ["U01", "U02"], references=2, repeats=3, rng=rng)
    assert len(genuine) == 2 * 3 * (6 - 2) and len(forged) == 2 * 3 * 5
    # Re-draw the same references explicitly and score with the query layer.
    rng = np.random.default_rng(0)
    label_array = np.asarray(labels, dtype=object)
    expected_genuine = []
    for group in ["U01", "U02"]:
        members = np.flatnonzero(label_array == f"{group}/genuine")
        for _ in range(3):
            chosen = rng.permutation(members)
            refs = vectors[chosen[:2]]
            expected_genuine += [rules.verification_score(vectors[i], refs) for i in chosen[2:]]
    assert np.allclose(genuine, expected_genuine)
    with pytest.raises(InvalidInputError, match="references"):
        reference_trials(vectors, labels, ["U01"], references=6, repeats=1, rng=rng)
