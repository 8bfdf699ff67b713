"""tools/train_default.py: its recipe is the shipped default's, and the whole chain runs, resumes and installs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from siamesedb.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "train_default.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("train_default", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(command: list[str]) -> dict[str, str | bool]:
    """`--name value` and bare `--flag` pairs of a command line; a later repeat wins, as in click."""
    out: dict[str, str | bool] = {}
    for i, word in enumerate(command):
        if word.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else "--"
            out[word[2:].replace("-", "_")] = True if following.startswith("--") else following
    return out


def test_the_last_stage_is_the_shipped_defaults_training():
    tool = load_tool()
    commands = tool.plan("BG", Path("runs"), [], [])
    shipped = json.loads((ROOT / "siamesedb" / "models" / "default" / "config.json").read_text())
    trained = shipped["notes"]["train_config"]
    last = flags(commands[-2])
    assert last["loss"] == trained["loss"] == "proto"
    for key in ("epochs", "steps_per_epoch", "seed", "lr", "shot", "within_group"):
        assert float(last[key]) == float(trained[key]), key
    assert last["rotate_classes"] is True and trained["rotate_classes"] is True
    assert Path(last["init"]).name == Path(trained["init"]).name  # same chain of run names as the original runs
    # each stage starts from the one before it; the first from scratch
    assert "init" not in flags(commands[0])
    for before, after in zip(commands[:-2], commands[1:-1]):
        assert flags(after)["init"] == flags(before)["out"]
    select = flags(commands[-1])
    assert select["write"].endswith("omni28-shot1b-tta")
    assert str(shipped["test_time_shift"]) in commands[-1][commands[-1].index("--shifts") + 1:]


def make_alphabets(root: Path) -> Path:
    """2 alphabets x 6 characters x 12 drawings, 28x28: enough for 5-shot 5-query episodes."""
    rng = np.random.default_rng(0)
    for alphabet in ("Alpha", "Beta"):
        for c in range(6):
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            strokes = rng.integers(3, 25, size=(3, 4))
            for i in range(12):
                image = Image.new("L", (28, 28), 255)
                pen = ImageDraw.Draw(image)
                for stroke in strokes:
                    x0, y0, x1, y1 = (stroke + rng.integers(-1, 2, size=4)).tolist()
                    pen.line((x0, y0, x1, y1), fill=0, width=2)
                image.save(folder / f"{i}.png")
    return root


def test_the_chain_runs_resumes_and_installs(tmp_path):
    background = make_alphabets(tmp_path / "background")
    runs, target = tmp_path / "runs", tmp_path / "installed"
    command = [sys.executable, str(SCRIPT), "--background", str(background), "--runs", str(runs),
               "--install-to", str(target), "--select-args", "--way 3 --episodes 10 --val-fraction 0.34",
               "--", "--epochs", "1", "--steps-per-epoch", "2", "--way", "4", "--width", "8", "--val-fraction", "0.34",
               "--quiet"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    for name, _ in load_tool().STAGES:
        history = json.loads((runs / name / "history.json").read_text())
        assert len(history) == 1
    config = json.loads((target / "config.json").read_text())
    assert config["name"] == "default-omniglot" and config["test_time_shift"] in (0, 2, 3, 4)
    assert Path(config["notes"]["train_config"]["init"]) == runs / "omni28-shot1"
    assert Encoder.load(target).encode(np.zeros((28, 28), dtype=np.uint8)).shape == (64,)
    # a second run trains nothing again: every stage is reported done
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("# done already: ") == len(load_tool().STAGES)
