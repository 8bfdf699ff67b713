"""The numpy query layer against slow, obvious loops on random vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from siamesedb import query, rules, scoring
from siamesedb.errors import DimensionMismatchError, InvalidInputError


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


def test_brute_force_search_in_blocks_gives_the_same_answer(monkeypatch):
    rng = np.random.default_rng(10)
    corpus, queries = unit(rng, 60), unit(rng, 25)
    D, I = query.brute_force_search(queries, corpus, 7)
    monkeypatch.setattr(scoring, "_BLOCK", 100)  # 1 query per block
    D2, I2 = query.brute_force_search(queries, corpus, 7)
    assert np.array_equal(I, I2) and np.allclose(D, D2, atol=1e-6)  # BLAS may round a lone row differently


def test_brute_force_search_past_the_corpus_returns_what_there_is():
    rng = np.random.default_rng(1)
    D, I = query.brute_force_search(unit(rng, 2), unit(rng, 3), 5)
    assert I.shape == D.shape == (2, 3) and np.isfinite(D).all()
    assert sorted(I[0].tolist()) == [0, 1, 2]
    with pytest.raises(InvalidInputError):
        query.brute_force_search(unit(rng, 1), unit(rng, 3), 0)
    D, I = query.brute_force_search(unit(rng, 2), np.empty((0, 8)), 2)
    assert (I == -1).all() and np.isneginf(D).all()
    with pytest.raises(DimensionMismatchError):
        query.brute_force_search(unit(rng, 1), unit(rng, 3, d=4), 1)


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
    with pytest.raises(DimensionMismatchError):
        query.rank_by_prototype(unit(rng, 1, d=4), protos, names)
    with pytest.raises(InvalidInputError, match="class names"):
        query.rank_by_prototype(queries, protos, names[:3])


def test_rank_by_knn_is_a_score_weighted_vote():
    labels = [["a", "b", "b", None], ["c", "c", "a", "a"]]
    scores = np.array([[0.9, 0.5, 0.45, -np.inf], [0.8, 0.1, 0.5, 0.4]])
    rankings = query.rank_by_knn(labels, scores, k=3)
    # query 0: a = 0.9, b = 0.95 -> b wins; query 1 (top 3 only): c = 0.9, a = 0.5
    assert rankings[0][0][0] == "b" and rankings[0][0][1] == pytest.approx(0.95)
    assert rankings[1] == [("c", pytest.approx(0.9)), ("a", pytest.approx(0.5))]


def test_rank_by_knn_against_an_explicit_loop():
    rng = np.random.default_rng(4)
    for _ in range(30):
        n_hits = 6
        labels = rng.choice(list("abcd"), size=(3, n_hits)).astype(object)
        # Coarse scores make tied votes likely, so the tie-break is exercised too.
        scores = -np.sort(-rng.integers(-2, 5, size=(3, n_hits)) / 4, axis=1)
        missing = int(rng.integers(0, 3))  # trailing FAISS padding: label None, score -inf
        if missing:
            labels[:, -missing:] = None
            scores[:, -missing:] = -np.inf
        k = int(rng.integers(1, n_hits + 1))
        if all(lab is None for lab in labels[:, :k].ravel()):
            continue
        rankings = query.rank_by_knn(labels.tolist(), scores, k)
        for row_labels, row_scores, ranking in zip(labels, scores, rankings):
            votes, best = {}, {}
            for j in range(k):
                if row_labels[j] is None:
                    continue
                votes[row_labels[j]] = votes.get(row_labels[j], 0.0) + row_scores[j]
                best[row_labels[j]] = max(best.get(row_labels[j], -np.inf), row_scores[j])
            expected = sorted(votes, key=lambda c: (-votes[c], -best[c], c))
            assert [c for c, _ in ranking] == expected
            assert [v for _, v in ranking] == pytest.approx([votes[c] for c in expected])


def slow_consistency(support):
    """Mean over references of the cosine to the normalised mean of the other references, by hand."""
    if len(support) < 2:
        return 1.0
    cosines = []
    for j in range(len(support)):
        rest = np.mean([support[i] for i in range(len(support)) if i != j], axis=0)
        cosines.append(float(support[j] @ rest) / float(np.linalg.norm(rest)))
    return max(float(np.mean(cosines)), 0.1)


@pytest.mark.parametrize("rule", ["prototype", "max", "mean_top3", "relative"])
def test_verification_score_rules(rule):
    rng = np.random.default_rng(5)
    q, support = unit(rng, 1)[0], unit(rng, 5)
    sims = sorted((float(q @ s) for s in support), reverse=True)
    mean = support.mean(axis=0)
    if rule == "prototype":
        expected = float(q @ (mean / np.linalg.norm(mean)))
    elif rule == "relative":
        expected = float(q @ (mean / np.linalg.norm(mean))) / slow_consistency(support)
    elif rule == "max":
        expected = sims[0]
    else:
        expected = sum(sims[:3]) / 3
    assert query.verification_score(q, support, rule) == pytest.approx(expected, abs=1e-6)
    # Fewer references than 3: mean_top3 averages all of them; one reference: every rule is plain cosine.
    two = support[:2]
    small = {"prototype": None, "relative": None, "max": max(float(q @ s) for s in two),
             "mean_top3": float(np.mean(two @ q))}
    if small[rule] is not None:
        assert query.verification_score(q, two, rule) == pytest.approx(small[rule], abs=1e-6)
    if rule == "relative":  # a consistent reference set raises the bar, a scattered one lowers it
        tight = query.normalize(support[:1] + 0.05 * support)
        assert query.reference_consistency(tight) == pytest.approx(slow_consistency(tight), abs=1e-6)
        assert query.reference_consistency(tight) > 0.9
    assert query.verification_score(q, support[:1], rule) == pytest.approx(float(q @ support[0]), abs=1e-6)
    with pytest.raises(InvalidInputError):
        query.verification_score(q, support, "median")
    with pytest.raises(InvalidInputError, match="empty"):
        query.verification_score(q, support[:0], rule)
    with pytest.raises(DimensionMismatchError):
        query.verification_score(q[:4], support, rule)


def slow_genuine_impostor(vectors, labels, rule):
    genuine, impostor = [], []
    for i in range(len(vectors)):
        for c in sorted(set(labels)):
            members = [j for j in range(len(vectors)) if labels[j] == c]
            if c == labels[i]:
                rest = [j for j in members if j != i]
                if rest:
                    genuine.append(query.verification_score(vectors[i], vectors[rest], rule))
            else:
                impostor.append(query.verification_score(vectors[i], vectors[members], rule))
    return np.array(genuine), np.array(impostor)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("rule", ["prototype", "max", "mean_top3", "relative"])
def test_genuine_impostor_scores_against_a_double_loop(rule, clustered, monkeypatch):
    rng = np.random.default_rng(6)
    # Classes of 1 to 5 members, shuffled: singletons, classes smaller than 3 and larger ones.
    labels = [c for c, size in zip("abcdefg", [1, 2, 3, 4, 5, 2, 1]) for _ in range(size)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    vectors = unit(rng, len(labels))
    if clustered:  # members near their class centre: consistencies well above relative's 0.1 floor
        centres = {c: unit(rng, 1)[0] for c in set(labels)}
        vectors = query.normalize(np.array([centres[c] for c in labels]) + 0.3 * vectors)
    genuine, impostor = slow_genuine_impostor(vectors, labels, rule)
    g, imp = query.genuine_impostor_scores(vectors, labels, rule)
    assert g.dtype == np.float64 and imp.dtype == np.float64
    assert np.allclose(g, genuine, atol=1e-5) and np.allclose(imp, impostor, atol=1e-5)  # same order too
    monkeypatch.setattr(rules, "_BLOCK", 4)  # one row per block: the blocked path agrees
    monkeypatch.setattr(rules, "_CONSISTENCY_ROWS", 2)
    g2, imp2 = query.genuine_impostor_scores(vectors, labels, rule)
    assert np.allclose(g2, g, atol=1e-6) and np.allclose(imp2, imp, atol=1e-6)
    with pytest.raises(InvalidInputError, match="two or more"):
        query.genuine_impostor_scores(vectors[:3], ["x", "y", "z"], rule)


def test_genuine_impostor_scores_refuses_bad_input():
    rng = np.random.default_rng(11)
    with pytest.raises(InvalidInputError, match="rule"):
        query.genuine_impostor_scores(unit(rng, 4), ["a", "a", "b", "b"], "median")
    with pytest.raises(InvalidInputError, match="labels"):
        query.genuine_impostor_scores(unit(rng, 4), ["a", "a", "b"])


def slow_rates(genuine, impostor, t):
    far = sum(s >= t for s in impostor) / len(impostor)
    frr = sum(s < t for s in genuine) / len(genuine)
    return far, frr


def random_scores(rng):
    genuine = rng.normal(0.7, 0.15, size=int(rng.integers(1, 40)))
    impostor = rng.normal(0.3, 0.15, size=int(rng.integers(1, 80)))
    if rng.random() < 0.5:  # coarse scores: many ties between and within the two sets
        genuine, impostor = np.round(genuine, 1), np.round(impostor, 1)
    return genuine, impostor


def test_eer_threshold_against_a_sweep_of_every_score():
    rng = np.random.default_rng(7)
    for _ in range(40):
        genuine, impostor = random_scores(rng)
        candidates = sorted(set(genuine.tolist()) | set(impostor.tolist()))
        gaps = [abs(np.subtract(*slow_rates(genuine, impostor, t))) for t in candidates]
        slow_t = candidates[int(np.argmin(gaps))]  # lowest threshold among the closest
        far, frr = slow_rates(genuine, impostor, slow_t)
        threshold, eer = query.eer_threshold(genuine, impostor)
        assert threshold == slow_t
        assert eer == pytest.approx((far + frr) / 2)
    with pytest.raises(InvalidInputError):
        query.eer_threshold([], [0.1])
    with pytest.raises(InvalidInputError, match="NaN"):
        query.eer_threshold([np.nan, 0.5], [0.1])


def test_far_threshold_is_the_lowest_meeting_the_target():
    rng = np.random.default_rng(8)
    for _ in range(20):
        _, impostor = random_scores(rng)
        for target in (0.0, 0.01, 0.1, 0.25, 0.5, 1.0):
            t = query.far_threshold(impostor, target)
            # Slow sweep: the target is met at t, and not just below it (the next impostor score down is refused
            # only because t sits above it: t is the lowest threshold meeting the target, up to float32 precision).
            assert np.mean(impostor >= t) <= target + 1e-12
            below = impostor[impostor < t]
            if len(below):
                highest_refused = below.max()
                assert np.mean(impostor >= highest_refused) > target
                assert t - highest_refused <= 2 * np.spacing(np.float32(abs(highest_refused)))
            else:
                assert t == impostor.min()
    # The case: 30 impostors, the top one at 0.968, the next at 0.90; target 5% allows one accept, so the
    # threshold sits just above 0.90, not at 0.968 (which rejected genuine scores of 0.95 for nothing).
    impostor = np.concatenate([np.linspace(0.1, 0.8, 28), [0.90, 0.968]])
    t = query.far_threshold(impostor, 0.05)
    assert 0.90 < t < 0.9001 and np.mean(impostor >= t) == pytest.approx(1 / 30)
    with pytest.raises(InvalidInputError):
        query.far_threshold([0.1, 0.2], 1.5)
    with pytest.raises(InvalidInputError):
        query.far_threshold([], 0.1)


def test_roc_points_match_explicit_rates():
    rng = np.random.default_rng(9)
    genuine, impostor = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    thresholds, far, frr = query.roc_points(genuine, impostor)
    assert np.all(np.diff(thresholds) > 0) and len(thresholds) == len(far) == len(frr)
    for t, a, r in zip(thresholds, far, frr):
        assert (a, r) == pytest.approx(slow_rates(genuine, impostor, t))
    assert (far[-1], frr[-1]) == (0.0, 1.0)  # above every score nothing is accepted


def test_results_serialise_to_plain_json_types():
    import json

    hit = query.Hit(id=np.int64(3), label="a", path="p.png", score=np.float32(0.5))
    pred = query.Prediction(label="a", score=np.float32(0.9), ranking=[("a", np.float32(0.9)), ("b", 0.1)])
    ver = query.Verification(label="a", accepted=np.bool_(True), score=0.8, threshold=0.5)
    text = json.dumps([hit.to_dict(), pred.to_dict(), ver.to_dict()])
    assert json.loads(text)[1]["ranking"][0] == {"label": "a", "score": pytest.approx(0.9)}


def test_backends_and_array_maths_never_import_torch():
    # DESIGN.md: backends, scoring and results are numpy only (a query server or a Ray writer must not pay for torch);
    # the old import paths (index, store, query) are shims over them.
    modules = ("siamesedb.backends.faiss, siamesedb.backends.milvus, siamesedb.scoring, siamesedb.rules, "
               "siamesedb.results, siamesedb.checks, siamesedb.classes, siamesedb.index, siamesedb.store, siamesedb.query")
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_search_results_build_hits_lazily_with_one_lookup():
    scores = np.array([[0.9, 0.5, -1.0], [0.8, 0.7, 0.6]], dtype=np.float32)
    ids = np.array([[4, 2, -1], [2, 9, 4]], dtype=np.int64)  # -1: fewer than k found; 9: removed meanwhile
    calls = []

    def lookup(wanted):
        calls.append(wanted.tolist())
        return {i: (f"L{i}", f"p{i}.png") for i in wanted.tolist() if i != 9}

    results = query.SearchResults(scores, ids, lookup)
    assert calls == [] and len(results) == 2  # nothing read until a Hit is asked for
    assert results[0] == [query.Hit(4, "L4", "p4.png", pytest.approx(0.9)), query.Hit(2, "L2", "p2.png", pytest.approx(0.5))]
    assert [h.id for h in results[-1]] == [2, 4]  # the removed item is left out, the order kept
    assert results[1][1].score == pytest.approx(0.6)
    assert results[:] == [results[0], results[1]] and results == list(results)
    assert calls == [[2, 4, 9]]  # one lookup of the unique ids, however many hits are read
    with pytest.raises(IndexError):
        results[2]
    with pytest.raises(InvalidInputError):
        query.SearchResults(scores, ids[:, :2], lookup)


def full_sort(queries, protos, names, metric="cosine"):
    """The ranking as it was built before it became lazy: one stable sort of every class per query."""
    scores = query.scores_for(metric, queries, protos)
    return [[(names[j], float(row[j])) for j in np.argsort(-row, kind="stable")] for row in scores]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_lazy_rankings_match_a_full_sort(metric, monkeypatch):
    rng = np.random.default_rng(11)
    protos = unit(rng, 300, d=16)
    protos[7] = protos[3]  # an exact tie: class order decides
    queries = unit(rng, 9, d=16)
    queries[4] = protos[3]
    names = [f"c{j:03d}" for j in range(300)]
    expected = full_sort(queries, protos, names, metric)
    monkeypatch.setattr(scoring, "_BLOCK", 300 * 4)  # 4 queries per block, the last block a lone row
    rankings = query.rank_by_prototype(queries, protos, names, metric=metric)
    for ranking, want in zip(rankings, expected):
        assert isinstance(ranking, query.Ranking) and len(ranking) == 300
        assert ranking[0][0] == want[0][0] and ranking[0][1] == pytest.approx(want[0][1], abs=1e-6)
        prefix = ranking[:10]  # partial sort only
        assert [c for c, _ in prefix] == [c for c, _ in want[:10]]
        assert ranking[2:5] == prefix[2:5]
        assert ranking._entries is None  # nothing but the prefix was sorted so far
        assert [c for c, _ in ranking] == [c for c, _ in want]
        assert np.allclose([s for _, s in ranking], [s for _, s in want], atol=1e-6)
        scores = [s for _, s in ranking]
        assert scores == sorted(scores, reverse=True) and scores[0] == ranking[0][1]
        assert ranking[-1] == want[-1] and ranking == list(ranking) and list(ranking) == ranking
    assert [c for c, _ in rankings[4][:2]] == ["c003", "c007"]


def test_lazy_ranking_reads_its_own_copy_and_serialises_as_a_list():
    import json
    import pickle

    rng = np.random.default_rng(12)
    protos, queries = unit(rng, 50), unit(rng, 1)
    names = [f"n{j}" for j in range(50)]
    ranking = query.rank_by_prototype(queries, protos, names)[0]
    want = full_sort(queries, protos, names)[0]
    protos[:] = 0  # the caller changes its array afterwards: the ranking kept its own copy
    queries[:] = 0
    assert [c for c, _ in ranking] == [c for c, _ in want]
    assert type(pickle.loads(pickle.dumps(ranking))) is list and pickle.loads(pickle.dumps(ranking)) == ranking
    pred = query.Prediction(label=ranking[0][0], score=ranking[0][1], ranking=ranking)
    assert json.loads(json.dumps(pred.to_dict()))["ranking"][0]["label"] == want[0][0]
    assert json.loads(json.dumps(ranking, default=query.json_default))[1][0] == want[1][0]
    with pytest.raises(IndexError):
        ranking[50]


def test_lazy_ranking_puts_every_run_of_equal_scores_in_class_order():
    rng = np.random.default_rng(13)
    protos = np.zeros((500, 4), np.float32)
    protos[np.arange(500), rng.integers(0, 4, 500)] = 1  # 4 distinct prototypes: runs of ~125 equal scores each
    queries = query.normalize(rng.normal(size=(3, 4)))
    names = [f"c{j:03d}" for j in range(500)]
    for ranking, want in zip(query.rank_by_prototype(queries, protos, names), full_sort(queries, protos, names)):
        assert list(ranking) == want
        assert ranking[:7] == want[:7]
