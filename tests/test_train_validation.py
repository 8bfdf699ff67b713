"""What a training run validates on (issue 27): a few-class folder holds out images and still ships a verify
threshold; a forgery folder picks its epoch by held-out verification EER; a budget is re-planned to what the steps
really cost (a fake clock: no wall time) and says when it left the encoder barely trained."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from siamesedb import training
from siamesedb.encoder import Encoder
from siamesedb.training import TrainConfig, train
from siamesedb.episodes import EpisodeScores
from siamesedb.validation import plan_validation, split_classes, split_images, writer_trials

from helpers import run_cli


def shapes(root: Path, classes: int, per_class: int = 8) -> Path:
    """`classes` classes of 16x16 stroke patterns (distinct random strokes per class, jittered a pixel)."""
    rng = np.random.default_rng(3)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        strokes = rng.integers(2, 14, size=(2, 4))
        for i in range(per_class):
            image = Image.new("L", (16, 16), 255)
            for stroke in strokes:
                ImageDraw.Draw(image).line(tuple((stroke + rng.integers(-1, 2, 4)).tolist()), fill=0, width=2)
            image.save(root / f"c{c}" / f"{i}.png")
    return root


def writers(root: Path, count: int = 20, per_class: int = 8) -> Path:
    """W00/genuine, W00/forged, ...: each writer a wave of its own frequency (writers are easy to tell apart: N-way
    identification saturates), its forgeries the same wave a little shifted and noisier (close to the genuine)."""
    rng = np.random.default_rng(4)
    for w in range(count):
        for kind, shift, noise in (("genuine", 0.0, 0.3), ("forged", 1.5, 1.0)):
            (root / f"W{w:02d}" / kind).mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("L", (32, 16), 255)
                xs = np.arange(1, 31, 1.0)
                ys = 8 + 5 * np.sin(xs * (0.15 + 0.05 * w) + shift) + rng.normal(0, noise, len(xs))
                ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=0, width=1)
                image.save(root / f"W{w:02d}" / kind / f"{i}.png")
    return root


def tiny(**overrides) -> TrainConfig:
    base = dict(loss="proto", epochs=2, steps_per_epoch=3, image_size=16, width=8, embedding_dim=8, way=4, shot=2,
                queries=2, val_fraction=0.2, val_episodes=5, final_episodes=20, augment=False, workers=0,
                device="cpu", precision="fp32")
    base.update(overrides)
    return TrainConfig(**base)


def notes_of(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# ----------------------------------------------------------------------------------------- few classes, threshold


def test_the_plan_follows_the_classes_there_are():
    names = [f"c{i}" for i in range(20)]
    labels = np.repeat(np.arange(20), 4)
    assert plan_validation(names, {}, np.arange(3), 0.15, labels).task == "images"  # 3 held out: too few
    assert plan_validation(names, {}, np.arange(8), 0.4, labels).task == "classes"
    assert plan_validation(names, {}, np.arange(8), 0.0, labels).task == "none"
    forged = [f"W{i}/{k}" for i in range(4) for k in ("forged", "genuine")]
    plan = plan_validation(forged, {0: 1, 2: 3, 4: 5, 6: 7}, np.arange(4), 0.5, np.repeat(np.arange(8), 6))
    assert plan.task == "verification" and plan.references == 5 and plan.lower_is_better
    held = split_images(np.repeat(np.arange(3), [10, 4, 3]), 0.2, seed=0)
    assert held[:10].sum() == 2 and held[10:14].sum() == 2 and held[14:].sum() == 0  # >= 2 a class, none of 3


def test_a_few_class_folder_warns_holds_out_images_and_records_a_threshold(tmp_path):
    folder = shapes(tmp_path / "few", classes=5)
    lines: list[str] = []
    train(folder, tmp_path / "run", tiny(), progress=False, log=lines.append)
    warning = [line for line in lines if line.startswith("validation: only 1 classes could be held out")]
    assert len(warning) == 1 and "fewer than 8" in warning[0], lines
    assert not any("1-way" in line or "2-way" in line for line in lines), lines  # no tiny N-way score reported
    notes = notes_of(tmp_path / "run")
    assert notes["notes"]["validation"]["task"] == "images"
    assert notes["notes"]["held_out"]["task"] == "images" and notes["notes"]["held_out"]["way"] == 5
    assert notes["pair_calibration"]["source"] == "held-out images" and "caveat" in notes["pair_calibration"]
    threshold = Encoder.load(tmp_path / "run").config.pair_threshold
    assert threshold is not None and threshold.source == "encoder (held-out images)"


def test_no_validation_still_ships_a_threshold_from_training_pairs(tmp_path):
    folder = shapes(tmp_path / "few", classes=3)
    lines: list[str] = []
    train(folder, tmp_path / "run", tiny(val_fraction=0.0, way=3), progress=False, log=lines.append)
    cal = notes_of(tmp_path / "run")["pair_calibration"]
    assert cal["source"] == "training pairs" and "training images" in cal["caveat"]
    assert any(line.startswith("verify threshold") and "from training pairs" in line for line in lines), lines
    encoder = tmp_path / "run"
    image = folder / "c0" / "0.png"
    # An index built with it verifies without calibration, and says where the threshold came from.
    built = run_cli("build", folder, "--index", tmp_path / "idx", "--encoder", encoder, "--json")
    assert built.exit_code == 0, built.output
    answer = run_cli("verify", image, "--index", tmp_path / "idx", "--label", "c0", "--json")
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output)["threshold_source"] == "encoder (training pairs)"
    pair = run_cli("verify", image, folder / "c0" / "1.png", "--encoder", encoder, "--json")
    assert pair.exit_code == 0, pair.output
    assert json.loads(pair.output)["threshold"] == pytest.approx(cal["threshold"])


# ----------------------------------------------------------------------------------------- whole groups held out


def grouped(root: Path, groups: int = 6, per_group: int = 5, per_class: int = 6) -> Path:
    """G0/c0 ... G5/c4: `groups` groups of `per_group` stroke classes each (an alphabet-shaped folder)."""
    rng = np.random.default_rng(5)
    for g in range(groups):
        for c in range(per_group):
            (root / f"G{g}" / f"c{c}").mkdir(parents=True)
            strokes = rng.integers(2, 14, size=(2, 4))
            for i in range(per_class):
                image = Image.new("L", (16, 16), 255)
                for stroke in strokes:
                    ImageDraw.Draw(image).line(tuple((stroke + rng.integers(-1, 2, 4)).tolist()), fill=0, width=2)
                image.save(root / f"G{g}" / f"c{c}" / f"{i}.png")
    return root


def test_whole_groups_are_held_out_and_validated_within_group(tmp_path):
    names = [f"G{g}/c{c}" for g in range(6) for c in range(5)]
    _, held = split_classes(names, 0.2, seed=0, by_group=True)
    held_groups = {names[i].split("/")[0] for i in held}
    assert len(held_groups) == 2 and len(held) == 10  # whole groups, until >= 8 classes and >= 2 groups
    assert all(names[i] in {f"{g}/c{c}" for g in held_groups for c in range(5)} for i in held)
    _, flat_held = split_classes(names, 0.2, seed=0)  # the class split, as before, without by_group
    assert len(flat_held) == 6

    folder = grouped(tmp_path / "alphabets")
    lines: list[str] = []
    train(folder, tmp_path / "run", tiny(hold_out_groups=True, val_way=20), progress=False, log=lines.append)
    notes = notes_of(tmp_path / "run")["notes"]
    assert notes["validation"]["task"] == "groups" and "2 whole groups held out" in notes["validation"]["reason"]
    held_out = notes["held_out"]
    assert held_out["task"] == "groups" and held_out["groups"] == 2 and held_out["classes"] == 10
    assert held_out["max_way"] == 10 and 0 <= held_out["accuracy"] <= 1
    assert held_out["unstructured"]["way"] == 10  # the second line: all held-out classes in one episode
    lead = [line for line in lines if line.startswith("held-out score: within-group 1-shot")]
    assert len(lead) == 1 and "2 held-out groups of 10 classes" in lead[0], lines
    assert any(line.startswith("  all held-out classes at once: 10-way") for line in lines), lines


def test_within_group_scores_pick_the_epoch(tmp_path, monkeypatch):
    folder = grouped(tmp_path / "alphabets")
    scripted = iter([0.5, 0.9, 0.7])
    real = training.within_group_episodes

    def scores(*args, **kwargs):
        real(*args, **kwargs)  # the real call still runs (shapes, groups)
        value = next(scripted)
        return EpisodeScores(np.asarray([round(value * 10)]), np.asarray([10]))

    monkeypatch.setattr(training, "within_group_episodes", scores)
    train(folder, tmp_path / "run", tiny(hold_out_groups=True, epochs=3), progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["val_accuracy"] for h in history] == [0.5, 0.9, 0.7]
    assert [h["val_task"] for h in history] == ["groups"] * 3
    assert notes_of(tmp_path / "run")["notes"]["best_epoch"] == 2


def test_too_few_groups_keep_the_class_split(tmp_path):
    names = [f"G{g}/c{c}" for g in range(2) for c in range(15)]
    _, held = split_classes(names, 0.3, seed=0, by_group=True)
    assert len(held) == 9 and len({names[i][:2] for i in held}) == 2  # 2 groups: a class split across both
    labels = np.repeat(np.arange(30), 4)
    assert plan_validation(names, {}, held, 0.3, labels, by_group=True).task == "groups"  # both groups hold several
    flat = [f"c{i}" for i in range(30)]
    _, flat_held = split_classes(flat, 0.3, seed=0, by_group=True)
    assert plan_validation(flat, {}, flat_held, 0.3, labels, by_group=True).task == "classes"  # no group of two


# ----------------------------------------------------------------------------------------- verification picks


def test_writer_trials_hold_forgeries_and_other_writers_as_impostors():
    # 3 writers: genuine at +e_w, forged at -e_w; with 1 reference every genuine query scores 1.
    vectors = np.zeros((18, 3), dtype=np.float32)
    labels = np.repeat(np.arange(6), 3)  # classes 0,2,4 forged; 1,3,5 genuine
    for w in range(3):
        vectors[labels == 2 * w + 1, w] = 1.0
        vectors[labels == 2 * w, w] = -1.0
    genuine, impostor = writer_trials(vectors, labels, {0: 1, 2: 3, 4: 5}, references=1, repeats=2, seed=0)
    assert len(genuine) == 3 * 2 * 2 and np.allclose(genuine, 1.0)
    assert len(impostor) == 3 * 2 * (3 + 3)  # its 3 forgeries + 3 items of the other writers, per repeat
    assert np.allclose(np.sort(impostor)[:18], -1.0) and np.allclose(np.sort(impostor)[18:], 0.0)


def test_a_forgery_folder_picks_the_epoch_by_verification_eer(tmp_path, monkeypatch):
    folder = writers(tmp_path / "sig")
    # Identification of held-out writers saturates (scripted: always 100%); the EER moves. The best epoch is the
    # EER's (2), not the last of the tied accuracies (3).
    eers = iter([0.30, 0.10, 0.20])
    real = training.writer_eer
    monkeypatch.setattr(training, "writer_eer", lambda *a, **k: {**real(*a, **k), "eer": next(eers)})
    monkeypatch.setattr(training, "validation_accuracy", lambda *a, **k: 1.0)
    lines: list[str] = []
    train(folder, tmp_path / "run", tiny(epochs=3, val_fraction=0.15, image_size=16, image_width=32),
          progress=False, log=lines.append)
    notes = notes_of(tmp_path / "run")["notes"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["val_eer"] for h in history] == [0.30, 0.10, 0.20]
    assert notes["best_epoch"] == 2 and notes["val_eer"] == 0.10
    assert notes["validation"]["task"] == "verification"
    lead = [i for i, line in enumerate(lines) if line.startswith("held-out verification EER")]
    assert lead and lead[0] < min(i for i, line in enumerate(lines) if "writer identification" in line), lines
    held = notes["held_out"]
    assert held["task"] == "verification" and 0 <= held["eer"] <= 1 and held["ci95"] >= 0
    assert held["references"] == 5 and held["writers"] == 3 and held["rule"] in ("prototype", "relative")


def test_unscripted_forgery_run_keeps_its_lowest_eer_epoch(tmp_path):
    folder = writers(tmp_path / "sig")
    train(folder, tmp_path / "run", tiny(epochs=3, val_fraction=0.15, image_size=16, image_width=32), progress=False)
    notes = notes_of(tmp_path / "run")["notes"]
    eers = [h["val_eer"] for h in json.loads((tmp_path / "run" / "history.json").read_text())]
    assert eers[notes["best_epoch"] - 1] == min(eers), (eers, notes["best_epoch"])
    assert notes_of(tmp_path / "run")["pair_calibration"]["source"] == "held-out classes"


# ----------------------------------------------------------------------------------------- the budget is a budget


class FakeClock:
    """Seconds that pass only when the run looks at the clock: each look costs `tick` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def budget_run(tmp_path, monkeypatch, budget: float, tick: float = 1.0, timed: float = 0.01, epochs: int = 30,
               steps: int = 10) -> tuple[dict, list[str], list[dict]]:
    folder = shapes(tmp_path / "g", classes=4)
    monkeypatch.setattr(training, "_clock", FakeClock(tick))  # tick 1: about 2 s a step (two looks)
    monkeypatch.setattr(training, "time_steps", lambda *a, **k: timed)  # what the timing promised a step
    lines: list[str] = []
    train(folder, tmp_path / "run", tiny(time_budget=budget, epochs=epochs, steps_per_epoch=steps, val_fraction=0.0),
          progress=False, log=lines.append)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    return notes_of(tmp_path / "run")["notes"], lines, history


def test_a_slow_machine_is_replanned_after_the_first_epoch(tmp_path, monkeypatch):
    notes, lines, history = budget_run(tmp_path, monkeypatch, budget=200.0)
    assert any(line.startswith("time budget") and "30 epochs x 10 steps" in line for line in lines), lines
    replanned = [line for line in lines if line.startswith("re-planned to the time budget")]
    assert replanned and "instead of 30" in replanned[0] and "against 0.01 s timed" in replanned[0], lines
    assert 3 <= len(history) < 30 and notes["train_config"]["epochs"] < 30
    budget = notes["budget"]
    assert budget["budget_s"] == 200.0 and budget["used_s"] <= 200.0 + 5 and budget["steps"] == sum(
        h["steps"] for h in history)
    assert any(line.startswith("run took") and "of its 3.33-minute budget" in line for line in lines)


def test_too_few_steps_for_the_budget_are_said_out_loud(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    notes, lines, history = budget_run(tmp_path, monkeypatch, budget=40.0)
    steps = sum(h["steps"] for h in history)
    assert steps < training.MIN_STEPS
    assert any(line.startswith(f"WARNING: only {steps} training steps") for line in lines), lines
    assert "barely trained" in notes["budget"]["warning"]


def test_steps_faster_than_timed_get_more_steps_up_to_the_cap(tmp_path, monkeypatch):
    # timed 5 s a step, really 0.2 s (two looks at a 0.1 s clock): 3 short epochs planned, then grown to the cap
    notes, lines, history = budget_run(tmp_path, monkeypatch, budget=200.0, tick=0.1, timed=5.0, epochs=3, steps=40)
    first = history[0]["steps"]
    assert first < 40 and [h["steps"] for h in history[1:]] == [40, 40], history
    assert any(f"40 steps each from now on instead of {first}" in line for line in lines), lines
    assert notes["budget"]["used_s"] <= 200.0 + 5


def test_a_val_fraction_flag_holds_out_classes_however_few_with_a_warning(tmp_path):
    folder = shapes(tmp_path / "few", classes=12)
    result = run_cli("train", folder, "--out", tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2",
                     "--val-fraction", "0.34", "--image-size", "16", "--width", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "validation: WARNING: only 4 held-out classes" in result.output
    notes = notes_of(tmp_path / "run")["notes"]
    assert notes["validation"]["task"] == "classes" and notes["held_out"]["way"] == 4
    default = run_cli("train", folder, "--out", tmp_path / "auto", "--epochs", "1", "--steps-per-epoch", "2",
                      "--image-size", "16", "--width", "8", "--device", "cpu")
    assert default.exit_code == 0, default.output
    assert notes_of(tmp_path / "auto")["notes"]["validation"]["task"] == "images"  # 12 classes: images held out
