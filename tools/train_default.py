"""Reproduce the shipped default encoder from scratch with one command: five training stages, then the test-time shift.

Each stage is a `siamesedb train` command, printed before it runs, that starts from the previous stage's weights
(`--init`); the recipe and its measurements are in BENCHMARKS.md ("The shipped default encoder"). Then
`tools/select_tta.py` picks the test-time shift on the held-out *background* characters and writes the final
encoder to RUNS/omni28-shot1b-tta. An interrupted run picks up where it stopped: a finished stage (its history.json
is written last) is skipped, an unfinished one resumes from its checkpoint.

On the project's 2-core CPU the five stages take about an hour when nothing else runs (their epochs' fastest times
add up to 54 minutes; the original runs took 2 h 13 min beside other jobs); with a GPU, minutes (`-- --device cuda`).

Run:  python tools/train_default.py [--background DIR] [--runs runs] [--install-to siamesedb/models/default]
      python tools/train_default.py --dry-run              # print the commands only
      python tools/train_default.py -- --device cuda       # arguments after `--` go to every `siamesedb train`
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent

# (run name, arguments beside the folder, --out and --init). Every stage: prototypical loss, 100 steps an epoch, seed 0.
FINE_TUNE = ["--rotate-classes", "--lr", "0.0003"]
STAGES: list[tuple[str, list[str]]] = [
    ("omni28-long", ["--epochs", "30"]),                                       # 60-way 5-shot episodes, lr 1e-3
    ("omni28-ft-rot", [*FINE_TUNE, "--epochs", "20"]),                         # + rotated copies as new classes
    ("omni28-wg", [*FINE_TUNE, "--within-group", "0.5", "--epochs", "12"]),    # + half the episodes in one alphabet
    ("omni28-shot1", [*FINE_TUNE, "--within-group", "0.5", "--shot", "1", "--epochs", "10"]),  # + one-shot episodes
    ("omni28-shot1b", [*FINE_TUNE, "--within-group", "0.5", "--shot", "1", "--epochs", "20"]),  # the same again
]
# float32: the shipped default was trained before bfloat16 autocast existed, and reproduces exactly only so
COMMON = ["--loss", "proto", "--steps-per-epoch", "100", "--seed", "0", "--precision", "fp32"]
SHIFTS = ["0", "2", "3", "4"]
DEFAULT_NAME = "default-omniglot"


def plan(background: str, runs: Path, extra: list[str], select_args: list[str]) -> list[list[str]]:
    """The commands, in order: one `siamesedb train` per stage, then the shift selection."""
    commands, previous = [], None
    for name, args in STAGES:
        init = ["--init", str(runs / previous)] if previous else []
        commands.append(["siamesedb", "train", background, "--out", str(runs / name), *init, *COMMON, *args,
                         "--resume", *extra])
        previous = name
    commands.append(["python", str(TOOLS / "select_tta.py"), str(runs / previous), background, "--shifts", *SHIFTS,
                     "--write", str(runs / f"{previous}-tta"), *select_args])
    return commands


def finished(command: list[str]) -> bool:
    """A training stage whose run folder already holds its last artefact (history.json is written at the very end)."""
    return command[1] == "train" and (Path(command[command.index("--out") + 1]) / "history.json").exists()


def run(command: list[str]) -> None:
    # Run with this interpreter, so the tools work from a virtual environment that is not activated.
    head = [sys.executable, "-m", "siamesedb"] if command[0] == "siamesedb" else [sys.executable]
    subprocess.run(head + command[1:], check=True)


def install(encoder_dir: Path, target: Path) -> None:
    """Save the final encoder into target (the package default: siamesedb/models/default) under its shipped name."""
    from siamesedb.encoder import Encoder

    encoder = Encoder.load(encoder_dir)
    encoder.config.name = DEFAULT_NAME
    encoder._fingerprint = None  # the name is part of the config, so of the fingerprint
    encoder.save(target)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after `--`: arguments for every `siamesedb train`
    own, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--background", default=None,
                        help="Omniglot's images_background folder (default: unpacked from ../shared/data/omniglot).")
    parser.add_argument("--runs", default="runs", type=Path, help="Where the stages' run folders go (default runs).")
    parser.add_argument("--install-to", default=None, type=Path, metavar="DIR",
                        help="Copy the final encoder here, e.g. siamesedb/models/default.")
    parser.add_argument("--select-args", default="", help="Extra arguments for tools/select_tta.py, one string.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands and stop.")
    args = parser.parse_args(own)
    background = args.background
    if background is None:
        if args.dry_run:
            background = "BACKGROUND"
        else:
            from siamesedb.datasets import omniglot

            background = str(omniglot("background"))
    commands = plan(background, args.runs, extra, args.select_args.split())
    for command in commands:
        skip = not args.dry_run and finished(command)
        print(("# done already: " if skip else "") + " ".join(command), flush=True)
        if not args.dry_run and not skip:
            run(command)
    if args.install_to and not args.dry_run:
        final = Path(commands[-1][commands[-1].index("--write") + 1])
        install(final, args.install_to)
        print(f"installed {final} as {DEFAULT_NAME} in {args.install_to}")


if __name__ == "__main__":
    main()
