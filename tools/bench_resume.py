"""Resuming an interrupted build: kill -9 a build of Omniglot's 13,180 evaluation images once 90% of them are
committed, then time re-running the same build, against a full build from nothing measured in the same run.

The resume re-scans and re-hashes every file (the content hash decides what is already stored) and encodes only the
missing tenth, so it should cost a fraction of a full build.

Each setting: one warm-up run, then --runs timed runs; prints the median, one line per setting.

Run:  python tools/bench_resume.py [--data PATH] [--runs 3] [--at 0.9]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from siamesedb.data import scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import STORE_FILE, SiameseDB

CHILD = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[3])); from siamesedb.db import SiameseDB; "
    "SiameseDB.build(sys.argv[1], path=sys.argv[2], workers=0)"
)


def stored(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / STORE_FILE}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


def interrupted_build(folder: Path, index: Path, at: int) -> int:
    """Start a build in a child process and SIGKILL it once `at` items are committed; returns how many were."""
    shutil.rmtree(index, ignore_errors=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(index), str(torch.get_num_threads())],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    while child.poll() is None and stored(index) < at:
        time.sleep(0.02)
    if child.poll() is not None:
        raise SystemExit("the build finished before it could be interrupted; lower --at")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return stored(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.9, help="Fraction committed when the build is killed.")
    args = parser.parse_args()
    folder = omniglot("evaluation", source=args.data)
    total = len(scan_folder(folder))
    work = Path(tempfile.mkdtemp(prefix="siamesedb-resume-"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {total} images; kill at {args.at:.0%}", flush=True)

    def full() -> float:
        shutil.rmtree(work / "full", ignore_errors=True)
        started = time.perf_counter()
        SiameseDB.build(folder, path=work / "full", workers=0).close()
        return time.perf_counter() - started

    def resume() -> tuple[float, int, int]:
        committed = interrupted_build(folder, work / "resumed", int(total * args.at))
        started = time.perf_counter()
        db = SiameseDB.build(folder, path=work / "resumed", workers=0)
        seconds = time.perf_counter() - started
        report, count = db.last_report, len(db)
        db.close()
        if count != total or report.already_indexed != committed or report.added != total - committed:
            raise SystemExit(f"resume went wrong: {committed} committed, report {report.to_dict()}, {count} items")
        return seconds, committed, report.added

    full()  # warm-up: page cache, torch kernels
    full_times = [full() for _ in range(args.runs)]
    resume()
    resumed = [resume() for _ in range(args.runs)]
    full_median = statistics.median(full_times)
    resume_median = statistics.median(r[0] for r in resumed)
    print(f"full build from nothing: median {full_median:.2f} s over {args.runs} runs ({total / full_median:,.0f} images/s)")
    print(f"resume after kill -9 at {args.at:.0%}: median {resume_median:.2f} s over {args.runs} runs "
          f"(committed before the kill: {', '.join(str(r[1]) for r in resumed)}; added by the resume: "
          f"{', '.join(str(r[2]) for r in resumed)}); {resume_median / full_median:.2f}x the full build")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
