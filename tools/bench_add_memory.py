"""Peak memory of adding 1M vectors: `SiameseDB.add_vectors` against the budget 2 x raw vector bytes + the model.

Each phase runs in a fresh process; RSS is sampled every 2 ms by a thread (VmRSS) besides Linux's own peak (VmHWM):
- baseline: interpreter + siamesedb + the default encoder loaded (the "model" of the budget);
- add: baseline + the caller's data (tools/bench_scale.py's clustered 64-d vectors, 1M in 100k classes, and the
  label list), then `create` + `add_vectors` of it all in one call; the peak is split into the chunk loop and the
  final save, and RSS is read again once the call returns (what the open index keeps);
- faiss: baseline + the same vectors, then only FAISS: `IndexIDMap2(IndexFlatIP)` fed 16k rows at a time as the
  add path does (its vector storage and id maps, and the std::vector regrowth copies);
- sqlite: baseline + the same vectors, then only the store: `ItemStore` inserts of 16k-row transactions.
Budget = 2 x the vectors' raw bytes + the baseline's RSS.

Run:  python tools/bench_add_memory.py [--items 1000000] [--classes 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1024 * 1024


def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


class Sampler:
    """Highest VmRSS seen per named stage, sampled every `every` seconds by a daemon thread."""

    def __init__(self, every: float = 0.002):
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            rss = rss_mib()[0]
            if rss > self.peaks.get(self.stage, 0.0):
                self.peaks[self.stage] = rss
            time.sleep(every)

    def mark(self, stage: str) -> None:
        rss = rss_mib()[0]
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
        self.stage = stage

    def stop(self) -> dict[str, float]:
        self.mark("stopped")
        self._stop.set()
        self._thread.join()
        return self.peaks


def phase(args: argparse.Namespace) -> dict:
    import numpy as np

    from bench_scale import make_data
    from siamesedb.db import SiameseDB
    from siamesedb.encoder import Encoder

    encoder = Encoder.load("default", device="cpu")
    out: dict = {"baseline_rss_mib": rss_mib()[0]}
    if args.phase == "baseline":
        return out
    _, codes, vectors = make_data(args.items, args.classes, args.sigma, seed=0)
    names = [f"class{c:06d}" for c in range(args.classes)]
    labels = [names[c] for c in codes]
    del codes
    out["raw_mib"] = vectors.nbytes / MiB
    out["with_data_rss_mib"] = rss_mib()[0]
    sampler = Sampler()
    sampler.mark("work")
    with tempfile.TemporaryDirectory(prefix="bench-add-memory-") as scratch:
        if args.phase == "add":
            db = SiameseDB.create(Path(scratch) / "index", encoder=encoder, factory="Flat", device="cpu")
            save = db._save

            def marked_save(*a, **kw):
                sampler.mark("save")
                return save(*a, **kw)

            db._save = marked_save
            started = time.perf_counter()
            db.add_vectors(vectors, labels)
            out["add_s"] = time.perf_counter() - started
            sampler.mark("after")
            out["after_rss_mib"] = rss_mib()[0]
            db.close()
        elif args.phase == "faiss":
            import faiss

            index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
            for start in range(0, len(vectors), 16384):
                chunk = np.ascontiguousarray(vectors[start : start + 16384])
                index.add_with_ids(chunk, np.arange(start + 1, start + 1 + len(chunk), dtype=np.int64))
            sampler.mark("after")
            out["after_rss_mib"] = rss_mib()[0]
        elif args.phase == "sqlite":
            from siamesedb.ingest import array_sha256
            from siamesedb.backends.faiss.store import ItemStore

            store = ItemStore(Path(scratch) / "items.sqlite", dim=vectors.shape[1])
            for start in range(0, len(vectors), 16384):
                chunk = np.ascontiguousarray(vectors[start : start + 16384])
                store.add(labels[start : start + 16384], [""] * len(chunk), [array_sha256(v) for v in chunk], chunk)
            sampler.mark("after")
            out["after_rss_mib"] = rss_mib()[0]
            store.close()
    peaks = sampler.stop()
    out["peak_work_mib"] = peaks.get("work", 0.0)
    out["peak_save_mib"] = peaks.get("save", 0.0)
    out["vmhwm_mib"] = rss_mib()[1]
    return out


def run_phase(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--items", str(args.items), "--classes", str(args.classes)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode != 0:
        sys.exit(f"phase {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--sigma", type=float, default=0.35)
    parser.add_argument("--phases", default="baseline,add,faiss,sqlite")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    print(f"# {args.items:,} x 64 float32 vectors in {args.classes:,} classes, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {name: run_phase(name, args) for name in args.phases.split(",")}
    base = results["baseline"]["baseline_rss_mib"] if "baseline" in results else None
    for name, r in results.items():
        print(name, json.dumps({k: round(v, 1) for k, v in r.items()}), flush=True)
    if base is not None and "add" in results:
        add = results["add"]
        budget = 2 * add["raw_mib"] + base
        peak = max(add["peak_work_mib"], add["peak_save_mib"], add["vmhwm_mib"])
        print(f"budget 2 x {add['raw_mib']:.0f} MiB + baseline {base:.0f} MiB = {budget:.0f} MiB; add_vectors peak "
              f"{peak:.0f} MiB = {peak / budget:.2f}x budget (caller's data {add['with_data_rss_mib'] - base:.0f} MiB "
              f"over baseline; chunk loop peak {add['peak_work_mib']:.0f}, save {add['peak_save_mib']:.0f}, "
              f"after the call {add['after_rss_mib']:.0f})")


if __name__ == "__main__":
    main()
