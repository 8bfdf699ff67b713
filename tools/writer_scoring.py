"""Writer-dependent scoring on skilled-forgery verification (issue 27 item 4): does anything beat the `relative` rule?

    python tools/writer_scoring.py $SIG --encoder runs/auto-sig --seeds 10 --cache /tmp/sig-vectors.npz

The protocol is `siamesedb eval verify $SIG --references 5 --calibration-groups U25-U30` (evaluation.py): per seed,
one rng draws `--repeats` reference sets per calibration writer, then per test writer (U31-U40), exactly as
`trials.reference_trials` consumes it; the other genuine signatures are genuine trials, the writer's skilled
forgeries impostors. EER / AUC are threshold-free on the test writers; FAR / FRR are read at the EER threshold of
the same method on the calibration writers, and any weight a method has (the logistic regression's ridge, a
combination's share) is chosen on the calibration writers too, never on the test answers.

Methods, every one scored on the same trials (a query q claiming writer W, whose references are refs(W)):
- prototype, relative: the registered rules (`rules.verification_score`), the figures `eval verify` prints;
- T-norm (per query): (s(q, W) - mean_j s(q, C_j)) / std_j s(q, C_j) over cohort writers C_j's reference sets;
- reference offset: s(q, W) minus the mean prototype score of each reference against the others (the references'
  own spread, subtracted where relative divides by it); reference Z-norm: also divided by those scores' std;
- Z-norm (per writer, fixed at enrolment): (s(q, W) - mu_W) / sd_W, mu_W / sd_W the scores of refs(W)'s model
  against the cohort's signatures (one method for both rules: it divides out relative's per-writer constant);
  cohort "enrolled": the other test writers' references in the same draw (what one index holds); "train": the
  training writers' (U01-U24) genuine signatures, R of them per writer as a model (T-norm) or all of them (Z-norm);
- LR train: a writer-dependent L2 logistic regression per reference set, the R references against the training
  writers' genuine signatures (balanced weights; Hafemann et al.'s writer-dependent setting), scored by its decision
  value; LR enrolled: the other enrolled writers' references as the only negatives (what an index holds);
  LR train+enrolled: both;
- relative + a * X: the relative score plus a share of another method's, each standardised on the calibration
  trials, `a` chosen on the calibration writers.

The spread: the EER over `--seeds` seeds (each seed `--repeats` draws pooled, as `eval verify`), and a paired
bootstrap over the test writers of each method's mean EER over seeds minus the relative rule's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from siamesedb.data import GENUINE, group_of, parse_groups  # noqa: E402
from siamesedb.rules import reference_consistency, reference_spread  # noqa: E402
from siamesedb.scoring import eer_threshold, normalize  # noqa: E402
from siamesedb.trials import rates_at, reference_draws, reference_trials, roc_auc  # noqa: E402

_MIN_SD = 1e-6  # floor of a cohort's standard deviation (identical cohort scores)
_RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # LR ridge choices, picked on the calibration writers
_SHARES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)  # 0: relative alone  # combination shares, picked on the calibration writers
_BOOTSTRAPS = 1000


@dataclass
class Draw:
    """One reference draw of one writer: row indices of its references, other genuine items and forgeries."""

    group: str
    refs: np.ndarray
    genuine: np.ndarray
    forged: np.ndarray


def draw_references(labels: list[str], groups: list[str], references: int, repeats: int,
                    rng: np.random.Generator) -> dict[str, list[Draw]]:
    """group -> `repeats` draws: `trials.reference_draws`, the sets `trials.reference_trials` scores."""
    draws: dict[str, list[Draw]] = {group: [] for group in groups}
    for group, refs, others, forged in reference_draws(labels, groups, references, repeats, rng):
        draws[group].append(Draw(group, refs, others, forged))
    return draws


def model_scores(queries: np.ndarray, support: np.ndarray, rule: str, metric: str) -> np.ndarray:
    """(Q,) `rules.verification_score(q, support, rule, metric)` of every row of `queries`, vectorised (equal to
    the rule's own score: tests/test_writer_scoring.py)."""
    if metric == "euclidean":
        raw = -np.linalg.norm(queries.astype(np.float64) - support.mean(axis=0, dtype=np.float64), axis=1)
    else:
        raw = (queries @ normalize(support.sum(axis=0))).astype(np.float64)
    if rule == "prototype":
        return raw
    if rule == "relative":
        return raw / (reference_spread(support) if metric == "euclidean" else reference_consistency(support))
    raise ValueError(f"model_scores knows prototype and relative, not {rule!r}")


def leave_one_out(support: np.ndarray, metric: str) -> np.ndarray:
    """(M,) prototype score of each reference against the other M - 1 (the references' own spread)."""
    return np.asarray([model_scores(support[j:j + 1], np.delete(support, j, axis=0), "prototype", metric)[0]
                       for j in range(len(support))])


def t_norm(raw: np.ndarray, cohort: np.ndarray) -> np.ndarray:
    """(Q,) raw scores normalised by each query's scores against the cohort models, `cohort` (J, Q)."""
    if len(cohort) < 2:
        raise ValueError(f"T-norm needs at least two cohort models, got {len(cohort)}")
    return (raw - cohort.mean(axis=0)) / np.maximum(cohort.std(axis=0, ddof=1), _MIN_SD)


def z_norm(raw: np.ndarray, impostor: np.ndarray) -> np.ndarray:
    """(Q,) raw scores normalised by the claimed model's scores against cohort signatures, `impostor` (K,)."""
    return (raw - impostor.mean()) / max(float(impostor.std(ddof=1)), _MIN_SD)


def fit_logistic(positives: np.ndarray, negatives: np.ndarray, ridge: float, steps: int = 25) -> np.ndarray:
    """(D + 1,) weights (last: bias) of an L2 logistic regression, classes weighted to equal total weight, fitted
    by Newton's method (the loss is convex and D small); the bias is not penalised."""
    x = np.concatenate([positives, negatives]).astype(np.float64)
    x = np.hstack([x, np.ones((len(x), 1))])
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    weight = np.where(y == 1, 0.5 / len(positives), 0.5 / len(negatives))
    penalty = np.full(x.shape[1], ridge)
    penalty[-1] = 0.0
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (weight * (p - y)) + penalty * w
        hessian = (x * (weight * p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        update = np.linalg.solve(hessian, gradient)
        w -= update
        if np.abs(update).max() < 1e-8:
            break
    return w


def method_scores(vectors: np.ndarray, draws: dict[str, list[Draw]], train_rows: dict[str, np.ndarray],
                  references: int, metric: str, rng: np.random.Generator) -> dict[str, dict[str, tuple]]:
    """method -> group -> (genuine scores, forged scores), every draw of the group pooled in draw order.

    `train_rows`: training writer -> its genuine rows (the "train" cohort and the LR's negatives); `rng` draws the
    training writers' cohort models (R references each), once per repeat.
    """
    groups = list(draws)
    repeats = len(draws[groups[0]])
    train_all = np.concatenate(list(train_rows.values()))
    out: dict[str, dict[str, list]] = {}

    def add(name: str, group: str, scores: np.ndarray, n_genuine: int) -> None:
        pair = out.setdefault(name, {}).setdefault(group, ([], []))
        pair[0].append(scores[:n_genuine])
        pair[1].append(scores[n_genuine:])

    for r in range(repeats):
        train_models = [rng.choice(rows, size=references, replace=False) for rows in train_rows.values()]
        for group in groups:
            d = draws[group][r]
            support = vectors[d.refs]
            queries = vectors[np.concatenate([d.genuine, d.forged])]
            others = [draws[h][r].refs for h in groups if h != group]
            enrolled_items = vectors[np.concatenate(others)]
            for rule in ("prototype", "relative"):
                raw = model_scores(queries, support, rule, metric)
                add(rule, group, raw, len(d.genuine))
                enrolled = np.stack([model_scores(queries, vectors[o], rule, metric) for o in others])
                trained = np.stack([model_scores(queries, vectors[m], rule, metric) for m in train_models])
                add(f"{rule} T-norm enrolled", group, t_norm(raw, enrolled), len(d.genuine))
                add(f"{rule} T-norm train", group, t_norm(raw, trained), len(d.genuine))
            # The references' own spread, subtracted instead of divided by (relative), and as a genuine-side Z-norm.
            own = leave_one_out(support, metric)
            raw = model_scores(queries, support, "prototype", metric)
            add("reference offset", group, raw - own.mean(), len(d.genuine))
            add("reference Z-norm", group, z_norm(raw, own), len(d.genuine))
            # Z-norm divides out any per-writer constant, so relative's (the consistency) too: one Z-norm serves both.
            raw = model_scores(queries, support, "prototype", metric)
            add("Z-norm enrolled", group, z_norm(raw, model_scores(enrolled_items, support, "prototype", metric)),
                len(d.genuine))
            add("Z-norm train", group, z_norm(raw, model_scores(vectors[train_all], support, "prototype", metric)),
                len(d.genuine))
            for ridge in _RIDGES:
                for negatives, rows in (("train", train_all), ("enrolled", np.concatenate(others)),
                                        ("train+enrolled", np.concatenate([train_all, *others]))):
                    w = fit_logistic(support, vectors[rows], ridge)
                    add(f"LR {negatives} ridge {ridge:g}", group, queries.astype(np.float64) @ w[:-1] + w[-1],
                        len(d.genuine))
    return {name: {g: (np.concatenate(a), np.concatenate(b)) for g, (a, b) in per.items()} for name, per in out.items()}


def pooled(per_group: dict[str, tuple], groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, forged) scores of `groups` (default all, in order; repeats allowed: the bootstrap)."""
    groups = list(per_group) if groups is None else groups
    return (np.concatenate([per_group[g][0] for g in groups]), np.concatenate([per_group[g][1] for g in groups]))


def combine(first: dict[str, tuple], second: dict[str, tuple], share: float, scale: tuple) -> dict[str, tuple]:
    """first + share * second, each standardised by `scale` = (mean1, sd1, mean2, sd2) from calibration trials."""
    m1, s1, m2, s2 = scale
    return {g: tuple((first[g][k] - m1) / s1 + share * (second[g][k] - m2) / s2 for k in (0, 1)) for g in first}


def standardise(per_group: dict[str, tuple]) -> tuple[float, float]:
    scores = np.concatenate(pooled(per_group))
    return float(scores.mean()), max(float(scores.std()), _MIN_SD)


def eer(per_group: dict[str, tuple], groups: list[str] | None = None) -> float:
    return eer_threshold(*pooled(per_group, groups))[1]


def run_seed(vectors: np.ndarray, labels: list[str], calibration: list[str], tests: list[str],
             train_rows: dict[str, np.ndarray], references: int, repeats: int, seed: int,
             metric: str) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """(test scores, calibration scores, chosen settings) of every method for one seed; chosen settings (ridge,
    share) are picked by calibration EER and the chosen variant is stored under the method's plain name."""
    rng = np.random.default_rng(seed)  # the draws of evaluate_verification: calibration first, then tests
    cal_draws = draw_references(labels, calibration, references, repeats, rng)
    test_draws = draw_references(labels, tests, references, repeats, rng)
    cohort_rng = np.random.default_rng([seed, 27])  # training cohort models: a stream apart from the draws
    cal = method_scores(vectors, cal_draws, train_rows, references, metric, cohort_rng)
    test = method_scores(vectors, test_draws, train_rows, references, metric, cohort_rng)
    chosen: dict[str, str] = {}
    for negatives in ("train", "enrolled", "train+enrolled"):
        ridges = [f"LR {negatives} ridge {r:g}" for r in _RIDGES]
        best = min(ridges, key=lambda name: eer(cal[name]))
        chosen[f"LR {negatives}"] = "ridge " + best.rsplit(" ", 1)[1]
        for scores in (cal, test):
            scores[f"LR {negatives}"] = scores[best]
            for name in ridges:
                del scores[name]
    for partner in ("LR train", "LR enrolled", "LR train+enrolled", "relative T-norm train", "Z-norm train", "Z-norm enrolled"):
        scale = (*standardise(cal["relative"]), *standardise(cal[partner]))
        trial = {a: combine(cal["relative"], cal[partner], a, scale) for a in _SHARES}
        share = min(_SHARES, key=lambda a: eer(trial[a]))
        name = f"relative + a*({partner})"
        chosen[name] = f"a={share:g}"
        cal[name] = trial[share]
        test[name] = combine(test["relative"], test[partner], share, scale)
    return test, cal, chosen


def summarise(tests_by_seed: list[dict], cals_by_seed: list[dict], tests: list[str], seed: int) -> list[dict]:
    """One row per method: EER mean / sd / min / max over seeds, AUC, FAR / FRR at the calibration threshold, and
    the writer-bootstrap 95% interval of (mean EER over seeds) minus the relative rule's. Seeds are not pooled into
    one ROC: a method's fitted settings (ridge, share, standardisation) differ from seed to seed."""
    rng = np.random.default_rng([seed, 1])
    samples = [list(rng.choice(tests, size=len(tests), replace=True)) for _ in range(_BOOTSTRAPS)]

    def boot(method: str) -> np.ndarray:  # (bootstraps,) mean EER over seeds on each resample of the writers
        return np.asarray([np.mean([eer(t[method], s) for t in tests_by_seed]) for s in samples])

    relative_boot = boot("relative")
    relative_eers = [eer(t["relative"]) for t in tests_by_seed]
    rows = []
    for method in tests_by_seed[0]:
        eers, aucs, fars, frrs = [], [], [], []
        for test, cal in zip(tests_by_seed, cals_by_seed):
            genuine, forged = pooled(test[method])
            threshold, _ = eer_threshold(*pooled(cal[method]))
            eers.append(eer_threshold(genuine, forged)[1])
            aucs.append(roc_auc(genuine, forged))
            far, frr = rates_at(genuine, forged, threshold)
            fars.append(far)
            frrs.append(frr)
        lo, hi = np.percentile(boot(method) - relative_boot, [2.5, 97.5]) if method != "relative" else (0.0, 0.0)
        paired = np.asarray(eers) - np.asarray(relative_eers)
        rows.append({"method": method, "eer_mean": float(np.mean(eers)), "eer_sd": float(np.std(eers, ddof=1)) if
                     len(eers) > 1 else 0.0, "eer_min": float(min(eers)), "eer_max": float(max(eers)),
                     "auc": float(np.mean(aucs)), "far": float(np.mean(fars)), "frr": float(np.mean(frrs)),
                     "minus_relative": float(paired.mean()), "seeds_better": int((paired < 0).sum()),
                     "minus_relative_ci95": [float(lo), float(hi)], "eers": eers})
    return rows


def load_vectors(folder: Path, encoder_name: str, cache: Path | None) -> tuple[np.ndarray, list[str], str, str]:
    """((N, D) vectors, labels, metric, fingerprint) of every image of `folder`, from `cache` when it holds this
    encoder's vectors of this folder (encoding is the only slow step)."""
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import encode_folder

    encoder = Encoder.load(encoder_name)
    key = f"{encoder.fingerprint}:{folder.resolve()}"
    if cache is not None and cache.exists():
        held = np.load(cache, allow_pickle=False)
        if str(held["key"]) == key:
            return held["vectors"], [str(x) for x in held["labels"]], encoder.config.metric, encoder.fingerprint
    vectors, images, _ = encode_folder(folder, encoder)
    labels = [im.label for im in images]
    if cache is not None:
        np.savez(cache, vectors=vectors, labels=np.asarray(labels), key=np.asarray(key))
    return vectors, labels, encoder.config.metric, encoder.fingerprint


def groups_of(labels: list[str], first: int, last: int) -> list[str]:
    """The groups U<first>..U<last> present with genuine items, sorted (as evaluation's group selection)."""
    wanted = parse_groups(f"U{first:02d}-U{last:02d}") or set()
    return sorted({group_of(l) for l in labels if l.endswith(f"/{GENUINE}") and group_of(l) in wanted})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="SVC2004 folder: U01..U40, each genuine/ + forged/")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--references", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="reference draws per writer and seed (eval's)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1; seed 0 is `eval verify`'s default")
    parser.add_argument("--cache", type=Path, default=None, help="npz file for the encoded vectors")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args()

    started = time.perf_counter()
    vectors, labels, metric, fingerprint = load_vectors(args.folder, args.encoder, args.cache)
    encoded = time.perf_counter() - started
    train, calibration, tests = groups_of(labels, 1, 24), groups_of(labels, 25, 30), groups_of(labels, 31, 40)
    label_array = np.asarray(labels, dtype=object)
    train_rows = {g: np.flatnonzero(label_array == f"{g}/{GENUINE}") for g in train}

    # The reproduction check: `eval verify`'s own trial code on the same seed, for both registered rules.
    reproduced = {}
    for rule in ("prototype", "relative"):
        rng = np.random.default_rng(0)
        cal_g, cal_f = reference_trials(vectors, labels, calibration, args.references, args.repeats, rng, rule, metric)
        genuine, forged = reference_trials(vectors, labels, tests, args.references, args.repeats, rng, rule, metric)
        threshold = eer_threshold(cal_g, cal_f)[0]
        far, frr = rates_at(genuine, forged, threshold)
        reproduced[rule] = eer_threshold(genuine, forged)[1]
        print(f"eval-verify protocol (trials.reference_trials, seed 0), rule {rule}: EER {reproduced[rule]:.2%}"
              f", AUC {roc_auc(genuine, forged):.4f}, FAR {far:.2%}, FRR {frr:.2%}")

    tests_by_seed, cals_by_seed, chosen_by_seed = [], [], []
    for seed in range(args.seeds):
        test, cal, chosen = run_seed(vectors, labels, calibration, tests, train_rows, args.references,
                                     args.repeats, seed, metric)
        tests_by_seed.append(test)
        cals_by_seed.append(cal)
        chosen_by_seed.append(chosen)
    rows = summarise(tests_by_seed, cals_by_seed, tests, 0)
    for row in rows:
        if row["method"] in reproduced:
            same = "equal" if abs(row["eers"][0] - reproduced[row["method"]]) < 1e-12 else "DIFFERENT"
            print(f"this tool, seed 0, {row['method']}: EER {row['eers'][0]:.2%} ({same} to trials.reference_trials)")
    print(f"encoder {args.encoder} ({fingerprint}, {metric}), {len(labels)} images, tests {tests[0]}-{tests[-1]}, "
          f"calibration {calibration[0]}-{calibration[-1]}, train cohort {train[0]}-{train[-1]}, R={args.references},"
          f" {args.repeats} draws x {args.seeds} seeds; encode {encoded:.0f} s, total {time.perf_counter() - started:.0f} s")
    print("method | EER mean ± sd (min-max) over seeds | AUC | FAR / FRR at calibration threshold | "
          "EER - relative, mean over seeds [writer-bootstrap 95%] (seeds better)")
    for row in rows:
        lo, hi = row["minus_relative_ci95"]
        print(f"{row['method']} | {row['eer_mean']:.2%} ± {row['eer_sd']:.2%} ({row['eer_min']:.2%}-{row['eer_max']:.2%})"
              f" | {row['auc']:.4f} | {row['far']:.2%} / {row['frr']:.2%} | {row['minus_relative']:+.2%} "
              f"[{lo:+.2%}, {hi:+.2%}] ({row['seeds_better']}/{len(row['eers'])})")
    print("chosen on calibration (seed: settings):", "; ".join(
        f"{s}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for s, c in enumerate(chosen_by_seed)))
    if args.json is not None:
        args.json.write_text(json.dumps({"encoder": args.encoder, "fingerprint": fingerprint, "rows": rows,
                                         "chosen": chosen_by_seed}, indent=1))


if __name__ == "__main__":
    main()
