"""The numpy query layer against slow, obvious loops on random vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from siamesedb import query
from siamesedb.errors import InvalidInputError


def unit(rng, n, d=8):
    return query.normalize(rng.normal(size=(n, d)))


def test_brute_force_search_matches_a_full_sort():
    rng = np.random.default_rng(0)
    corpus, queries = unit(rng, 50), unit(rng, 7)
    D, I = query.brute_force_search(queries, corpus, 5)
    for q, d_row, i_row in zip(queries, D, I):
        scores = [float(q @ c) for c in corpus]
        expected = sorted(range(len(corpus)), key=lambda j: -scores[j])[:5]
        assert i_row.tolist() == expected
        assert np.allclose(d_row, [scores[j] for j in expected], atol=1e-6)


def test_brute_force_search_pads_past_the_corpus():
    rng = np.random.default_rng(1)
    D, I = query.brute_force_search(unit(rng, 2), unit(rng, 3), 5)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert sorted(I[0, :3].tolist()) == [0, 1, 2]
    with pytest.raises(InvalidInputError):
        query.brute_force_search(unit(rng, 1), unit(rng, 3), 0)


def test_class_prototypes_are_normalised_means():
    rng = np.random.default_rng(2)
    vectors = unit(rng, 12)
    labels = ["b", "a", "c"] * 4
    classes, protos = query.class_prototypes(vectors, labels)
    assert classes == ["a", "b", "c"]
    for name, proto in zip(classes, protos):
        members = [v for v, lab in zip(vectors, labels) if lab == name]
        mean = np.mean(members, axis=0)
        assert np.allclose(proto, mean / np.linalg.norm(mean), atol=1e-6)


def test_rank_by_prototype_ranks_every_class_best_first():
    rng = np.random.default_rng(3)
    protos, queries = unit(rng, 4), unit(rng, 3)
    names = ["w", "x", "y", "z"]
    for q, ranking in zip(queries, query.rank_by_prototype(queries, protos, names)):
        explicit = sorted(((n, float(q @ p)) for n, p in zip(names, protos)), key=lambda t: -t[1])
        assert [n for n, _ in ranking] == [n for n, _ in explicit]
        assert np.allclose([s for _, s in ranking], [s for _, s in explicit], atol=1e-6)


def test_rank_by_knn_is_a_score_weighted_vote():
    labels = [["a", "b", "b", None], ["c", "c", "a", "a"]]
    scores = np.array([[0.9, 0.5, 0.45, -np.inf], [0.8, 0.1, 0.5, 0.4]])
    rankings = query.rank_by_knn(labels, scores, k=3)
    # query 0: a = 0.9, b = 0.95 -> b wins; query 1 (top 3 only): c = 0.9, a = 0.5
    assert rankings[0][0][0] == "b" and rankings[0][0][1] == pytest.approx(0.95)
    assert rankings[1] == [("c", pytest.approx(0.9)), ("a", pytest.approx(0.5))]


def test_rank_by_knn_against_an_explicit_loop():
    rng = np.random.default_rng(4)
    for _ in range(20):
        labels = rng.choice(list("abcd"), size=(1, 6)).tolist()
        scores = np.sort(rng.uniform(-1, 1, size=(1, 6)))[:, ::-1]
        k = int(rng.integers(1, 7))
        votes = {}
        for lab, s in zip(labels[0][:k], scores[0][:k]):
            votes[lab] = votes.get(lab, 0.0) + s
        best = max(votes.values())
        top = query.rank_by_knn(labels, scores, k)[0][0]
        assert top[1] == pytest.approx(best)


@pytest.mark.parametrize("rule", ["prototype", "max", "mean_top3"])
def test_verification_score_rules(rule):
    rng = np.random.default_rng(5)
    q, support = unit(rng, 1)[0], unit(rng, 5)
    sims = sorted((float(q @ s) for s in support), reverse=True)
    if rule == "prototype":
        mean = support.mean(axis=0)
        expected = float(q @ (mean / np.linalg.norm(mean)))
    elif rule == "max":
        expected = sims[0]
    else:
        expected = sum(sims[:3]) / 3
    assert query.verification_score(q, support, rule) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InvalidInputError):
        query.verification_score(q, support, "median")


@pytest.mark.parametrize("rule", ["prototype", "max", "mean_top3"])
def test_genuine_impostor_scores_against_a_double_loop(rule):
    rng = np.random.default_rng(6)
    vectors = unit(rng, 10)
    labels = ["a", "a", "a", "b", "b", "c", "d", "d", "d", "d"]
    genuine, impostor = [], []
    for i in range(10):
        for c in sorted(set(labels)):
            members = [j for j in range(10) if labels[j] == c]
            if c == labels[i]:
                rest = [j for j in members if j != i]
                if rest:
                    genuine.append(query.verification_score(vectors[i], vectors[rest], rule))
            else:
                impostor.append(query.verification_score(vectors[i], vectors[members], rule))
    g, imp = query.genuine_impostor_scores(vectors, labels, rule)
    assert np.allclose(np.sort(g), np.sort(genuine), atol=1e-5)
    assert np.allclose(np.sort(imp), np.sort(impostor), atol=1e-5)
    with pytest.raises(InvalidInputError, match="two or more"):
        query.genuine_impostor_scores(vectors[:3], ["x", "y", "z"], rule)


def slow_rates(genuine, impostor, t):
    far = sum(s >= t for s in impostor) / len(impostor)
    frr = sum(s < t for s in genuine) / len(genuine)
    return far, frr


def test_eer_threshold_against_a_sweep_of_every_score():
    rng = np.random.default_rng(7)
    for _ in range(10):
        genuine = rng.normal(0.7, 0.15, size=int(rng.integers(5, 40)))
        impostor = rng.normal(0.3, 0.15, size=int(rng.integers(5, 80)))
        candidates = sorted(set(genuine) | set(impostor))
        best_gap = min(abs(np.subtract(*slow_rates(genuine, impostor, t))) for t in candidates)
        threshold, eer = query.eer_threshold(genuine, impostor)
        far, frr = slow_rates(genuine, impostor, threshold)
        assert abs(far - frr) == pytest.approx(best_gap)
        assert eer == pytest.approx((far + frr) / 2)


def test_far_threshold_is_the_lowest_meeting_the_target():
    rng = np.random.default_rng(8)
    impostor = rng.normal(size=200)
    for target in (0.0, 0.01, 0.1, 0.5, 1.0):
        t = query.far_threshold(impostor, target)
        assert sum(s >= t for s in impostor) / 200 <= target + 1e-12
        lower = [s for s in impostor if s < t]
        if lower:  # the next lower candidate would exceed the target
            t_lower = max(lower)
            assert sum(s >= t_lower for s in impostor) / 200 > target
    with pytest.raises(InvalidInputError):
        query.far_threshold(impostor, 1.5)


def test_roc_points_match_explicit_rates():
    rng = np.random.default_rng(9)
    genuine, impostor = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    thresholds, far, frr = query.roc_points(genuine, impostor)
    for t, a, r in list(zip(thresholds, far, frr))[::7]:
        assert (a, r) == pytest.approx(slow_rates(genuine, impostor, t))


def test_results_serialise_to_plain_json_types():
    import json

    hit = query.Hit(id=np.int64(3), label="a", path="p.png", score=np.float32(0.5))
    pred = query.Prediction(label="a", score=np.float32(0.9), ranking=[("a", np.float32(0.9)), ("b", 0.1)])
    ver = query.Verification(label="a", accepted=np.bool_(True), score=0.8, threshold=0.5)
    text = json.dumps([hit.to_dict(), pred.to_dict(), ver.to_dict()])
    assert json.loads(text)[1]["ranking"][0] == {"label": "a", "score": pytest.approx(0.9)}


def test_index_store_query_never_import_torch():
    code = "import sys, siamesedb.index, siamesedb.store, siamesedb.query; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
