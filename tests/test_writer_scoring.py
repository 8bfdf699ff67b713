"""tools/writer_scoring.py on synthetic vectors: its prototype / relative trials are `eval verify`'s own
(trials.reference_trials), and its cohort normalisations and logistic regression are what their definitions say,
checked against slow obvious loops over `rules.verification_score`."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from siamesedb.rules import verification_score
from siamesedb.scoring import eer_threshold
from siamesedb.trials import reference_trials

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "writer_scoring.py"
_spec = importlib.util.spec_from_file_location("writer_scoring", _TOOL)
ws = importlib.util.module_from_spec(_spec)
sys.modules["writer_scoring"] = ws  # dataclasses look their module up there
_spec.loader.exec_module(ws)

TRAIN, CALIBRATION, TESTS = ["U01", "U02", "U03", "U04"], ["U05", "U06", "U07"], ["U08", "U09", "U10"]
REFERENCES, REPEATS = 3, 2


def _folder(seed: int = 0, dim: int = 6, metric: str = "cosine") -> tuple[np.ndarray, list[str], dict]:
    """Writers with 8 genuine and 4 forged vectors around a centre each (forgeries nearer it than other writers)."""
    rng = np.random.default_rng(seed)
    vectors, labels = [], []
    for group in TRAIN + CALIBRATION + TESTS:
        centre = rng.normal(size=dim)
        for kind, count, noise in (("genuine", 8, 0.5), ("forged", 4, 0.9)):
            vectors.append(centre + noise * rng.normal(size=(count, dim)))
            labels += [f"{group}/{kind}"] * count
    v = np.concatenate(vectors).astype(np.float32)
    if metric == "cosine":
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    label_array = np.asarray(labels, dtype=object)
    train_rows = {g: np.flatnonzero(label_array == f"{g}/genuine") for g in TRAIN}
    return v, labels, train_rows


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("rule", ["prototype", "relative"])
def test_model_scores_are_the_rules_own(metric: str, rule: str) -> None:
    v, _, _ = _folder(metric=metric)
    support, queries = v[:5], v[5:30]
    slow = [verification_score(q, support, rule, metric) for q in queries]
    np.testing.assert_allclose(ws.model_scores(queries, support, rule, metric), slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_trials_and_eer_are_eval_verifys(metric: str) -> None:
    """Same draws, same scores, same EER as evaluate_verification's calls (calibration drawn first, then tests)."""
    v, labels, train_rows = _folder(metric=metric)
    test, cal, _ = ws.run_seed(v, labels, CALIBRATION, TESTS, train_rows, REFERENCES, REPEATS, 7, metric)
    for rule in ("prototype", "relative"):
        rng = np.random.default_rng(7)
        cal_g, cal_f = reference_trials(v, labels, CALIBRATION, REFERENCES, REPEATS, rng, rule, metric)
        genuine, forged = reference_trials(v, labels, TESTS, REFERENCES, REPEATS, rng, rule, metric)
        for ours, theirs in ((ws.pooled(test[rule]), (genuine, forged)), (ws.pooled(cal[rule]), (cal_g, cal_f))):
            np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
        assert ws.eer(test[rule]) == pytest.approx(eer_threshold(genuine, forged)[1])


def test_cohort_normalisation_as_defined() -> None:
    """T-norm against the other enrolled writers' reference sets of the same draw, Z-norm against their
    references / the training writers' genuine items: recomputed query by query with verification_score."""
    v, labels, train_rows = _folder(seed=3)
    draws = ws.draw_references(labels, TESTS, REFERENCES, REPEATS, np.random.default_rng(5))
    scores = ws.method_scores(v, draws, train_rows, REFERENCES, "cosine", np.random.default_rng(9))
    train_items = np.concatenate(list(train_rows.values()))
    for group in TESTS:
        expected: dict[str, list[float]] = {}
        for r in range(REPEATS):
            d = draws[group][r]
            refs = v[d.refs]
            others = [v[draws[h][r].refs] for h in TESTS if h != group]
            z_enrolled = [verification_score(x, refs) for o in others for x in o]
            z_train = [verification_score(x, refs) for x in v[train_items]]
            for q in np.concatenate([d.genuine, d.forged]):
                for rule in ("prototype", "relative"):
                    s = verification_score(v[q], refs, rule)
                    cohort = [verification_score(v[q], o, rule) for o in others]
                    expected.setdefault(f"{rule} T-norm enrolled", []).append(
                        (s - statistics.fmean(cohort)) / statistics.stdev(cohort))
                s = verification_score(v[q], refs)
                own = [verification_score(refs[j], np.delete(refs, j, axis=0)) for j in range(REFERENCES)]
                expected.setdefault("reference offset", []).append(s - statistics.fmean(own))
                expected.setdefault("reference Z-norm", []).append((s - statistics.fmean(own)) / statistics.stdev(own))
                expected.setdefault("Z-norm enrolled", []).append(
                    (s - statistics.fmean(z_enrolled)) / statistics.stdev(z_enrolled))
                expected.setdefault("Z-norm train", []).append(
                    (s - statistics.fmean(z_train)) / statistics.stdev(z_train))
        for name, values in expected.items():
            genuine, forged = scores[name][group]
            n = len(draws[group][0].genuine)
            got = np.concatenate([np.concatenate([genuine[r * n:(r + 1) * n], forged[r * 4:(r + 1) * 4]])
                                  for r in range(REPEATS)])
            np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_training_cohort_models_hold_r_genuine_items_of_each_training_writer() -> None:
    """The training T-norm's cohort: one model of R genuine items per training writer, drawn from `rng`."""
    v, labels, train_rows = _folder(seed=4)
    draws = ws.draw_references(labels, TESTS[:1] + TESTS[1:], REFERENCES, 1, np.random.default_rng(1))
    scores = ws.method_scores(v, draws, train_rows, REFERENCES, "cosine", np.random.default_rng(2))
    rng = np.random.default_rng(2)
    models = [v[rng.choice(rows, size=REFERENCES, replace=False)] for rows in train_rows.values()]
    d = draws[TESTS[0]][0]
    q = v[d.genuine[0]]
    s = verification_score(q, v[d.refs], "relative")
    cohort = [verification_score(q, m, "relative") for m in models]
    expected = (s - statistics.fmean(cohort)) / statistics.stdev(cohort)
    assert scores["relative T-norm train"][TESTS[0]][0][0] == pytest.approx(expected, rel=1e-5)


def test_logistic_regression_minimises_its_loss() -> None:
    """Newton's answer is the minimum of the weighted, ridge-penalised log loss: every coordinate step raises it."""
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(0.7, 1.0, size=(5, 4)), rng.normal(0.0, 1.0, size=(60, 4))
    ridge = 0.1

    def loss(w: np.ndarray) -> float:
        total = 0.0
        for rows, y in ((positives, 1), (negatives, 0)):
            for x in rows:
                z = float(x @ w[:-1] + w[-1])
                total += 0.5 / len(rows) * (np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z)))
        return total + 0.5 * ridge * float(w[:-1] @ w[:-1])

    w = ws.fit_logistic(positives, negatives, ridge)
    best = loss(w)
    for i in range(len(w)):
        for step in (1e-3, -1e-3):
            nudged = w.copy()
            nudged[i] += step
            assert loss(nudged) > best
    assert (positives @ w[:-1] + w[-1]).mean() > (negatives @ w[:-1] + w[-1]).mean()


def test_summary_pairs_each_method_with_the_relative_rule_seed_by_seed() -> None:
    """A monotone copy of the relative scores has its EER exactly, in every seed and every bootstrap resample."""
    v, labels, train_rows = _folder(seed=6)
    tests, cals = [], []
    for seed in range(2):
        test, cal, _ = ws.run_seed(v, labels, CALIBRATION, TESTS, train_rows, REFERENCES, REPEATS, seed, "cosine")
        for scores in (test, cal):
            scores["copy"] = {g: (2 * a + 1, 2 * b + 1) for g, (a, b) in scores["relative"].items()}
        tests.append(test)
        cals.append(cal)
    rows = {row["method"]: row for row in ws.summarise(tests, cals, TESTS, 0)}
    assert rows["copy"]["eers"] == rows["relative"]["eers"]
    assert rows["copy"]["minus_relative"] == 0.0 and rows["copy"]["minus_relative_ci95"] == [0.0, 0.0]
    assert rows["prototype"]["eers"] == [ws.eer(t["prototype"]) for t in tests]
