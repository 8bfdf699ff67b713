"""Several members in one time budget (issue 27): short members trained one after another (their own seeds, one
held-out split), then the combination validation favours: a member alone, the members joined, either whitened on
the training classes; and the verification rule (prototype or relative) the held-out writers favour.

What BENCHMARKS.md measured by hand on SVC2004 ("Ensembles of seeds and within-class whitening"): one member
20.8-24.7% EER, nine joined + whitened 16.1%. Here the members share the budget, so each is shorter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from siamesedb.encoder import Encoder, ensemble_of
from siamesedb.errors import InvalidInputError
from siamesedb.scoring import eer_threshold
from siamesedb.validation import (
    ValidationPlan,
    eer_interval,
    verification_report,
    ensure_threshold,
    writer_trials,
)
from siamesedb.whitening import whitened_encoder

PREFERRED = "joined + whitening"  # BENCHMARKS.md's best by hand: kept unless validation says clearly otherwise
RESERVE_SECONDS = 45.0  # joining, whitening, scoring the candidates and saving, after the last member (at most)
MIN_MEMBER_SECONDS = 90.0  # a member shorter than this learns too little to be worth joining: fewer members
MEMBERS_DIR = "members"


def _candidates(members: list[Encoder], fit: tuple[Any, np.ndarray]) -> dict[str, Encoder]:
    """name -> encoder: each member, the members joined, and both whitened on the training genuine images `fit`
    ((N, C, H, W) tensor, class (N,))."""
    found: dict[str, Encoder] = {f"member {i + 1}": m for i, m in enumerate(members)}
    if len(members) > 1:
        found["joined"] = ensemble_of(members)
    x_fit, y_fit = fit
    for name in list(found):
        if name.startswith("member") and name != "member 1" and len(members) > 1:
            continue  # whiten the first member and the joined one: two candidates, not one per member
        base = found[name]
        try:
            found[f"{name} + whitening"] = whitened_encoder(base, base.encode_tensors(x_fit), y_fit.tolist(),
                                                            notes={"classes": int(len(np.unique(y_fit))),
                                                                   "fitted_on": "training classes, genuine only"})
        except InvalidInputError:
            pass
    return found


def _score(encoder: Encoder, data: Any, plan: ValidationPlan, seed: int) -> dict[str, tuple[float, float]]:
    """rule -> (held-out EER of `encoder`, its 95% half-width) for verification, or (-accuracy, 0) for classes /
    images: lower is better either way."""
    vectors = encoder.encode_tensors(data.x_val)
    if plan.task != "verification":
        from siamesedb.episodes import run_episodes

        keep = ~np.isin(data.y_val, list(data.forgeries))
        scores = run_episodes(vectors[keep], data.y_val[keep], min(data.val_way, len(np.unique(data.y_val[keep]))),
                              1, 1, 200, np.random.default_rng(seed), encoder.config.metric)
        return {"prototype": (-scores.pooled, 0.0)}
    rules = ("prototype", "relative") if plan.references >= 3 else ("prototype",)
    out = {}
    for rule in rules:
        genuine, impostor = writer_trials(vectors, data.y_val, data.forgeries, plan.references, 10, seed, rule,
                                          encoder.config.metric)
        out[rule] = (float(eer_threshold(genuine, impostor)[1]), eer_interval(genuine, impostor, seed, 100))
    return out


def train_members(folder: str | os.PathLike, out_dir: str | os.PathLike, config: Any, progress: bool = True,
                  log: Callable[[str], None] | None = None, started: float | None = None) -> Encoder:
    """Train `config.members` members inside `config.time_budget` (from `started`), keep the combination and rule
    the held-out validation favours, give it its verify threshold and write it to `out_dir`."""
    from siamesedb.training import _clock, _load_folder, _split_for_training, train

    log = log or (lambda line: None)
    run_started = started if started is not None else _clock()
    out = Path(out_dir)
    budget = config.time_budget
    reserve = 0.0 if budget is None else min(RESERVE_SECONDS, 0.1 * budget)
    count = config.members if budget is None else max(1, min(config.members, int((budget - reserve) // MIN_MEMBER_SECONDS)))
    if count < config.members:
        log(f"{count} member{'s' if count > 1 else ''} instead of {config.members}: the budget gives each at least "
            f"{MIN_MEMBER_SECONDS:.0f} s")
    members: list[Encoder] = []
    for i in range(count):
        spent = _clock() - run_started
        share = None if budget is None else (budget - spent - reserve) / (count - i)
        if share is not None and share < 30 and members:
            log(f"member {i + 1} of {count} skipped: {share:.0f} s of the budget left for it")
            break
        member_config = replace(config, members=1, seed=config.seed + i, split_seed=config.seed,
                                time_budget=None if share is None else max(share, 20.0))
        log(f"member {i + 1} of {count} (seed {member_config.seed}" +
            (f", {share / 60:.1f} min)" if share is not None else ")"))
        members.append(train(folder, out / MEMBERS_DIR / f"member{i + 1}", member_config, progress=progress,
                             log=lambda line: log(f"  {line}"), started=_clock()))
    images, labels, names = _load_folder(Path(folder), config, lambda line: None)
    data = _split_for_training(folder, images, labels, names, replace(config, split_seed=config.seed),
                               lambda line: None)
    genuine = ~np.isin(data.y_train[:data.originals], list(data.forgeries))
    fit = (data.x_train[:data.originals][genuine], data.y_train[:data.originals][genuine])
    candidates = _candidates(members, fit)
    table: dict[str, dict[str, float]] = {}
    if data.has_val:
        scored = {name: _score(encoder, data, data.plan, config.seed + 2) for name, encoder in candidates.items()}
        table = {name: {r: v[0] for r, v in rules.items()} for name, rules in scored.items()}
        choice, rule = min(((n, r) for n in table for r in table[n]), key=lambda nr: table[nr[0]][nr[1]])
        why = "the lowest"
        if PREFERRED in table and choice != PREFERRED:
            # Held-out writers are few, so their EER is noisy: keep the measured best recipe unless another
            # candidate beats it by more than its 95% interval.
            own = min(table[PREFERRED], key=table[PREFERRED].get)
            if table[choice][rule] >= table[PREFERRED][own] - scored[PREFERRED][own][1]:  # a tie keeps it too
                # (accuracies are stored negated, so that lower is better for every task: shown as they are)
                why = (f"{choice} ({abs(table[choice][rule]):.2%}) is within the interval of {PREFERRED} "
                       f"({abs(table[PREFERRED][own]):.2%} ± {scored[PREFERRED][own][1]:.2%}), the measured best recipe")
                choice, rule = PREFERRED, own
        unit = "EER" if data.plan.task == "verification" else "1-shot accuracy"
        for name, scores in table.items():
            log(f"  {name}: " + ", ".join(f"{r} {abs(v):.2%}" for r, v in scores.items())
                + ("  <- chosen" if name == choice else ""))
        log(f"chosen by held-out {unit}: {choice}, rule {rule} ({why})")
    else:
        choice = "joined + whitening" if "joined + whitening" in candidates else list(candidates)[-1]
        rule = "prototype"
        log(f"no held-out classes to choose by: {choice} (what BENCHMARKS.md measured best)")
    final = candidates[choice]
    notes: dict[str, Any] = {"trained_on": str(folder), "train_config": config.to_dict(), "members": len(members),
                             "chosen": choice, "verify_rule": rule, "candidates": table,
                             "member_fingerprints": [m.fingerprint for m in members],
                             "validation": {"task": data.plan.task, "reason": data.plan.reason}}
    if data.plan.task == "verification":
        fake = SimpleNamespace(x_val=data.x_val, y_val=data.y_val, forgeries=data.forgeries)
        notes["held_out"] = verification_report(final, fake, data.plan, config.seed + 1, log,
                                                chose="the combination and rule")
        notes["verify_rule"] = notes["held_out"]["rule"]
    final.config.notes = {**final.config.notes, **notes}
    held_source = "held-out images" if data.plan.task == "images" else "held-out classes"
    source = ensure_threshold(final, notes, data.x_val, data.y_val, data.x_train[:data.originals],
                              data.y_train[:data.originals], names, data.forgeries, config.seed, held_source)
    log(f"verify threshold {final.config.pair_calibration['threshold']:.4f} from {source}")
    if budget is not None:
        used = _clock() - run_started
        final.config.notes["budget"] = {"budget_s": round(budget, 1), "used_s": round(used, 1)}
        log(f"run took {used / 60:.2f} min of its {budget / 60:.2f}-minute budget ({len(members)} member{'s' if len(members) > 1 else ''})")
    final.config.data_profile = members[0].config.data_profile
    final.config.name = out.name
    final._fingerprint = None
    final.save(out)
    for name in ("train_config.json", "history.json", "loss_curve.png"):
        source_file = out / MEMBERS_DIR / "member1" / name
        if source_file.exists():
            shutil.copy(source_file, out / name)
    return final
