"""The CLI contract of DESIGN.md: help everywhere, clean one-line errors, JSON shapes, and a real Omniglot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from siamesedb import __version__
from siamesedb.cli import cli

from helpers import run_cli as run  # tests/helpers.py
from helpers import unpack

ROOT = Path(__file__).resolve().parents[1]


def all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


COMMANDS = list(all_commands())


def test_the_design_contract_commands_exist():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"build", "add", "remove", "query", "classify", "verify", "calibrate", "info", "train", "eval oneshot"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_help_with_an_example_and_is_in_the_readme(path):
    for flag in ("--help", "-h"):
        result = run(*path, flag)
        assert result.exit_code == 0, result.output
        assert "Example" in result.output and "siamesedb" in result.output
    assert f"siamesedb {' '.join(path)}" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "siamesedb", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["build", "/no/such/folder", "--index", "{tmp}/idx"], "/no/such/folder"),
        (["info", "--index", "{tmp}/nothing-here"], "nothing-here"),
        (["query", "{tmp}/q.png", "--index", "{tmp}/nothing-here"], "no index"),
        (["eval", "oneshot", "/no/such/folder", "--encoder", "{tmp}/no-encoder"], "no-encoder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "siamesedb", *args], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "siamesedb", "build", str(tmp_path / "empty"), "--index", str(tmp_path / "i")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no images" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "i").exists()


@pytest.fixture(scope="module")
def omniglot_subset(tmp_path_factory) -> Path:
    """20 real characters of two evaluation alphabets, 4 drawings each, unpacked from the official zip."""
    root = tmp_path_factory.mktemp("omniglot")
    unpack(lambda alphabet, character, filename, drawer: root / alphabet / character / filename)
    return root


def test_end_to_end_on_real_omniglot(omniglot_subset, tmp_path):
    index = tmp_path / "omniglot-index"
    # Drawers 1-3 are the support set; drawer 4 is held out as queries.
    support = tmp_path / "support"
    queries = []
    for png in sorted(omniglot_subset.rglob("*.png")):
        if png.stem.endswith("_04"):
            queries.append(png)
        else:
            target = support / png.relative_to(omniglot_subset)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png.read_bytes())
    (support / "not-an-image.png").write_text("hello")

    result = run("build", support, "--index", index, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["added"] == 60 and summary["skipped"] == 1 and summary["classes"] == 20

    result = run("query", queries[0], queries[1], "--index", index, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["query"] for a in answers] == [str(queries[0]), str(queries[1])]
    for answer in answers:
        assert len(answer["hits"]) == 3
        assert set(answer["hits"][0]) == {"id", "label", "path", "score"}
        scores = [h["score"] for h in answer["hits"]]
        assert scores == sorted(scores, reverse=True)

    result = run("classify", *queries, "--index", index, "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert len(predictions) == 20
    assert set(predictions[0]) == {"query", "label", "score", "ranking"}
    assert set(predictions[0]["ranking"][0]) == {"label", "score"}
    truth = [str(Path(q).parent.relative_to(omniglot_subset)) for q in queries]
    accuracy = sum(p["label"] == t for p, t in zip(predictions, truth)) / len(truth)
    # 20-way with 3 references per class; chance is 5%. The trained default encoder must do far better.
    assert accuracy >= 0.6, accuracy

    result = run("calibrate", "--index", index, "--json")
    assert result.exit_code == 0, result.output
    threshold = json.loads(result.stdout)["threshold"]
    result = run("verify", queries[0], "--index", index, "--label", truth[0], "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert set(verdict) == {"query", "label", "accepted", "score", "threshold", "threshold_source"}
    assert verdict["threshold"] == threshold and verdict["label"] == truth[0]
    assert verdict["accepted"] == (verdict["score"] >= threshold)
    assert verdict["threshold_source"].startswith("index:prototype:")

    result = run("verify", queries[0], queries[1], "--json")
    assert result.exit_code == 0, result.output
    pair = json.loads(result.stdout)
    # The pair score is the cosine of the two encodings; the threshold is the one the default encoder carries.
    from siamesedb.encoder import Encoder

    default = Encoder.load("default")
    a, b = default.encode([queries[0], queries[1]])
    assert pair["score"] == pytest.approx(float(a @ b), abs=1e-5)
    assert pair["threshold"] == default.config.pair_threshold and pair["threshold_source"] == "encoder"
    assert pair["accepted"] == (pair["score"] >= pair["threshold"]) and pair["query"] == str(queries[0])

    result = run("add", queries[0], "--index", index, "--label", truth[0], "--json")
    assert result.exit_code == 0, result.output
    new_id = json.loads(result.stdout)["ids"][0]
    result = run("info", "--index", index, "--json")
    summary = json.loads(result.stdout)
    assert summary["items"] == 61
    assert summary["encoder"]["members"] == 1 and summary["encoder"]["whitening"] is False
    assert summary["encoder"]["test_time_shift"] == 3  # the shipped default's five views
    result = run("info", "--index", index)
    assert "test-time shift 3" in result.output and "members" not in result.output
    result = run("remove", "--index", index, "--id", new_id)
    assert result.exit_code == 0, result.output
    result = run("remove", "--index", index, "--label", truth[1], "--json")
    assert json.loads(result.stdout) == {"removed": 3, "items": 57}

    result = run("verify", queries[0], "--index", index, "--label", "Nowhere/character99")
    assert result.exit_code != 0 and "Nowhere/character99" in result.output


def squiggle_folder(root: Path, writers: int = 6, genuine: int = 4, forged: int = 3) -> Path:
    """Signature-like PNGs: each writer a wavy stroke of its own frequency; forgeries imitate it imperfectly."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for w in range(1, writers + 1):
        for kind, count, noise in (("genuine", genuine, 0.5), ("forged", forged, 3.0)):
            for i in range(count):
                image = Image.new("L", (64, 32), 255)
                xs = np.arange(0, 64, 2)
                ys = 16 + 8 * np.sin(xs * w / 20 + rng.normal(0, 0.1)) + rng.normal(0, noise, len(xs))
                ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=0, width=2)
                target = root / f"W{w:02d}" / kind / f"W{w:02d}S{i:02d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                image.save(target)
    return root


def test_signature_training_and_writer_independent_verification(tmp_path):
    folder = squiggle_folder(tmp_path / "signatures")
    model = tmp_path / "model"
    result = run("train", folder, "--out", model, "--groups", "W01-W04", "--loss", "contrastive", "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "8", "--backbone", "signet", "--width", "4",
                 "--embedding-dim", "8", "--image-size", "16", "--image-width", "32", "--keep-aspect", "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((model / "config.json").read_text())
    assert config["preprocessing"]["size"] == [16, 32] and config["preprocessing"]["keep_aspect"] is True
    assert config["notes"]["train_config"]["groups"] == "W01-W04"

    plots = tmp_path / "plots"
    result = run("eval", "verify", folder, "--encoder", model, "--references", "2", "--test-groups", "W05-W06",
                 "--calibration-groups", "W01-W04", "--repeats", "2", "--plots", plots, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test_groups"] == ["W05", "W06"] and report["calibration_groups"] == ["W01", "W02", "W03", "W04"]
    assert report["genuine_trials"] == 2 * 2 * (4 - 2) and report["forgery_trials"] == 2 * 2 * 3
    # The rates describe the same trials: accuracy is what FAR and FRR leave.
    g, f = report["genuine_trials"], report["forgery_trials"]
    assert report["accuracy"] == pytest.approx(1 - (report["frr"] * g + report["far"] * f) / (g + f))
    assert report["far"] * f == pytest.approx(round(report["far"] * f))  # a whole number of accepted forgeries
    for name in ("roc.png", "scores.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"

    result = run("eval", "verify", folder, "--encoder", model, "--test-groups", "W01-W02", "--calibration-groups", "W02-W04")
    assert result.exit_code != 0 and "overlap" in result.output


def test_signature_recipe_with_seeds_joined_and_whitened(tmp_path, monkeypatch):
    """The README recipe in small: seeds trained on every writer (--val-fraction 0), joined and whitened by
    tools/ensemble.py, then used by eval verify like any encoder."""
    import runpy
    import sys

    folder = squiggle_folder(tmp_path / "signatures", genuine=6, forged=6)  # proto episodes: 1 shot + 5 queries
    members = []
    for seed in ("1", "2"):
        members.append(tmp_path / f"seed{seed}")
        result = run("train", folder, "--out", members[-1], "--groups", "W01-W04", "--loss", "proto", "--way", "4",
                     "--shot", "1", "--epochs", "1", "--steps-per-epoch", "2", "--val-fraction", "0", "--seed", seed,
                     "--backbone", "signet", "--width", "4", "--embedding-dim", "8", "--image-size", "16",
                     "--image-width", "32", "--keep-aspect", "--quiet")
        assert result.exit_code == 0, result.output
        assert json.loads((members[-1] / "train_config.json").read_text())["val_fraction"] == 0.0
    joined = tmp_path / "joined"
    monkeypatch.setattr(sys, "argv", ["ensemble.py", "--out", str(joined), *map(str, members),
                                      "--whiten", str(folder), "--groups", "W01-W04"])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "ensemble.py"), run_name="__main__")
    config = json.loads((joined / "config.json").read_text())
    assert config["members"] == 2 and config["whitening"] is True
    assert config["notes"]["whitening"]["classes"] == 4  # the four genuine writers W01-W04, forgeries left out
    result = run("eval", "verify", folder, "--encoder", joined, "--references", "2", "--test-groups", "W05-W06",
                 "--calibration-groups", "W01-W04", "--repeats", "2", "--rule", "relative", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # EER is the mean of FAR and FRR at one threshold: (a / forgeries + r / genuine) / 2 for whole counts a and r,
    # and the ROC curve passes through (a / f, 1 - r / g), which bounds the AUC from both sides.
    g, f = report["genuine_trials"], report["forgery_trials"]
    points = [(a / f, r / g) for a in range(f + 1) for r in range(g + 1)
              if (a / f + r / g) / 2 == pytest.approx(report["eer"], abs=1e-9)]
    assert any((1 - x) * (1 - y) - 1e-9 <= report["auc"] <= 1 - x * y + 1e-9 for x, y in points), (report, points)
