"""`siamesedb serve` under load, before and after issue 28, in one run: latency p50 / p99 and answers/s at several
numbers of concurrent clients, search-only and mixed, and the encode batch sizes the micro-batcher reached.

BEFORE is `siamesedb/serve.py` as it was at --before-ref (read with `git show`, one lock around every index call,
each request encoded alone), AFTER the working tree's `create_app` in one process (uvicorn, on 127.0.0.1), and
`serve wN` the working tree's `siamesedb serve --workers N` (N server processes on one port; `--serve-workers`);
all run over the same package otherwise, each started fresh on a fresh copy of the index for every setting, with
the clients in this process (one keep-alive HTTP connection per client thread). `siamesedb serve` with no
--workers runs `serve.default_workers` processes (one per core, at most 4, on the CPU).

Mixed load at 10 clients: 4 searching, 2 classifying, 2 adding with the token (images of drawer 04, each added
once), 1 tokenless writer (401s), 1 junk uploader (400s); other client counts take the same roles in the order of
MIX_ROLES, cycled (1 client: one searcher; 4: search, classify, add, search; 32: the 10-client mix 3 times + 2).
Every answer counts (errors too: they are answers); any 5xx or transport error is reported.

The index: drawers 01-02 of every Omniglot evaluation character (as `make demo`, 1,318 items); queries drawer 03.

Run:  python tools/bench_serve.py [--data PATH] [--seconds 10] [--clients 1 4 10 32] [--loads search mixed]
          [--serve-workers 1 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIX_ROLES = ["search", "classify", "add", "search", "tokenless", "search", "classify", "add", "search", "junk"]
TOKEN = "bench-token-0123456789abcdef"
JUNK = b"\x89PNG\r\n\x1a\n this is not an image"

# The server process: the app of one variant, run by uvicorn until SIGTERM, plus a route giving its batch sizes.
LAUNCHER = r"""
import importlib.util, sys
import uvicorn
variant, index, port, token, settings = sys.argv[1:6]
if variant == "after":
    import siamesedb.serve as module
else:
    spec = importlib.util.spec_from_file_location("serve_before", variant)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_before"] = module  # pydantic resolves the answer models' annotations through it
    spec.loader.exec_module(module)
extra = {}
nchw = settings == "nchw"  # BEFORE with the encoder in torch's NCHW layout too: the server as it was, whole
if nchw:
    settings = ""
if settings:  # AFTER's batcher settings, "MAX_BATCH:MAX_WAIT_MS"
    batch, wait = settings.split(":")
    extra = {"max_batch": int(batch), "max_wait_ms": float(wait)}
app = module.create_app(index, token=token, device="cpu", **extra)
if nchw:
    app.state.db.encoder.channels_last = False

@app.get("/_bench/batches")
def batches():  # the batch sizes reached, read by the benchmark before it stops the server
    batcher = getattr(app.state, "batcher", None)
    return {str(k): v for k, v in (batcher.batch_sizes if batcher else {}).items()}

uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(variant: str, index: Path, settings: str = "") -> tuple[subprocess.Popen, int]:
    port = free_port()
    if variant.startswith("serve:"):  # the real command, N processes (no batch-size route: uvicorn's workers)
        command = [sys.executable, "-m", "siamesedb", "serve", "--index", str(index), "--port", str(port),
                   "--token", TOKEN, "--device", "cpu", "--workers", variant.split(":")[1]]
    else:
        command = [sys.executable, "-c", LAUNCHER, variant, str(index), str(port), TOKEN, settings]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: an unread pipe would stall a chatty server
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    for _ in range(600):
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server ({variant}) exited: {log.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/info")
            if connection.getresponse().status == 200:
                connection.close()
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server ({variant}) did not start")


def stop(process: subprocess.Popen, port: int) -> Counter:
    """Stop the server; returns its batch sizes (empty for BEFORE, which has no batcher)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/_bench/batches")
    response = connection.getresponse()
    body = response.read()
    batches = Counter({int(k): v for k, v in json.loads(body).items()}) if response.status == 200 else Counter()
    connection.close()
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return batches


def client(role: str, port: int, queries: list[bytes], adds: list[tuple[str, bytes]], stop_at: float,
           warm_until: float, record: list) -> None:
    """One client: requests of its role back to back on one keep-alive connection until `stop_at`; records
    (latency s, status) of the calls started after `warm_until`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    n = 0
    while True:
        started = time.perf_counter()
        if started >= stop_at:
            break
        headers = {"Content-Type": "image/png"}
        if role == "search":
            path, body = "/search?k=5", queries[n % len(queries)]
        elif role == "classify":
            path, body = "/classify", queries[(n * 7) % len(queries)]
        elif role == "add":
            if n >= len(adds):
                break  # this client's images are all added
            label, body = adds[n]
            path, headers = f"/items?label={label}", {**headers, "Authorization": f"Bearer {TOKEN}"}
        elif role == "tokenless":
            path, body = "/items?label=intruder", queries[n % len(queries)]
        else:
            path, body = "/search", JUNK
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0  # transport error
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        if started >= warm_until:
            record.append((time.perf_counter() - started, status, role))
        n += 1
    connection.close()


def run_setting(variant: str, pristine: Path, scratch: Path, clients: int, load: str, seconds: float,
                warmup: float, queries: list[bytes], add_pool: list[tuple[str, bytes]], settings: str = "") -> dict:
    index = scratch / "index-run"
    shutil.rmtree(index, ignore_errors=True)
    shutil.copytree(pristine, index)
    process, port = start(variant, index, settings)
    roles = ["search"] * clients if load == "search" else [MIX_ROLES[i % len(MIX_ROLES)] for i in range(clients)]
    adders = [i for i, role in enumerate(roles) if role == "add"]
    record: list = []
    now = time.perf_counter()
    threads = []
    for i, role in enumerate(roles):
        mine = add_pool[adders.index(i)::len(adders)] if role == "add" else []
        threads.append(threading.Thread(target=client, args=(role, port, queries, mine, now + warmup + seconds,
                                                             now + warmup, record)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batches = stop(process, port)
    latencies = sorted(latency for latency, _, _ in record)
    statuses = Counter(status for _, status, _ in record)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else (latencies or [float("nan")]) * 99
    images = sum(size * count for size, count in batches.items())
    roles_seen: dict[str, list[float]] = {}
    for latency, _, role in record:
        roles_seen.setdefault(role, []).append(latency)
    per_role = {role: {"per_s": len(values) / seconds, "p50": 1000 * statistics.median(values),
                       "p99": 1000 * (statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0])}
                for role, values in sorted(roles_seen.items())}
    return {"variant": variant, "clients": clients, "load": load, "answers": len(record),
            "per_s": len(record) / seconds, "p50": 1000 * q[49], "p99": 1000 * q[98],
            "errors_5xx": sum(v for s, v in statuses.items() if s >= 500 or s == 0),
            "statuses": dict(sorted(statuses.items())), "added": sum(1 for _, s, r in record if r == "add" and s == 200),
            "batches": sum(batches.values()), "mean_batch": images / max(1, sum(batches.values())),
            "max_batch": max(batches, default=0), "roles": per_role}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--index", default=None, help="An index to copy for each setting (default: build the demo one).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured seconds per setting.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of load before measuring.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 10, 32])
    parser.add_argument("--loads", nargs="+", default=["search", "mixed"], choices=["search", "mixed"])
    parser.add_argument("--before-ref", default="914d379",
                        help="The commit whose siamesedb/serve.py is BEFORE (default: the one before issue 28).")
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--after-settings", nargs="+", default=[""], metavar="MAX_BATCH:MAX_WAIT_MS",
                        help="AFTER's batcher settings to compare, e.g. 32:2 8:0 (default: create_app's defaults).")
    parser.add_argument("--before-nchw", action="store_true",
                        help="Also measure BEFORE with the encoder's NCHW layout, as the package was before issue 28 "
                             "('before nchw'; BEFORE itself runs over today's package, channels-last encoding included).")
    parser.add_argument("--serve-workers", type=int, nargs="*", default=[], metavar="N",
                        help="Also measure `siamesedb serve --workers N` for each N (e.g. 1 2).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args()

    from siamesedb.data import scan_folder
    from siamesedb.datasets import omniglot
    from siamesedb.db import SiameseDB
    from siamesedb.evaluation import drawer_of

    folder = omniglot("evaluation", source=args.data)
    images = scan_folder(folder)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        pristine = Path(args.index) if args.index else scratch / "index"
        if not args.index:
            support = scratch / "support"
            for im in images:
                if drawer_of(im.path) in ("01", "02"):
                    target = support / im.label / im.path.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(im.path, target)
            SiameseDB.build(support, path=pristine, device="cpu").close()
        queries = [im.path.read_bytes() for im in images if drawer_of(im.path) == "03"]
        add_pool = [(im.label, im.path.read_bytes()) for im in images if drawer_of(im.path) == "04"]
        variants = {}
        for variant in args.variants:
            if variant == "after":
                for settings in args.after_settings:
                    variants[f"after {settings}".strip()] = ("after", settings)
                continue
            before = scratch / "serve_before.py"
            source = subprocess.run(["git", "show", f"{args.before_ref}:siamesedb/serve.py"], cwd=ROOT,
                                    capture_output=True, text=True)
            if source.returncode:
                raise SystemExit(f"git show {args.before_ref}:siamesedb/serve.py failed: {source.stderr.strip()}")
            before.write_text(source.stdout, encoding="utf-8")
            variants["before"] = (str(before), "")
            if args.before_nchw:
                variants["before nchw"] = (str(before), "nchw")
        for n in args.serve_workers:
            variants[f"serve w{n}"] = (f"serve:{n}", "")
        print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}"
              f", load average {os.getloadavg()[0]:.2f} at start; index {len(queries)} queries, {args.seconds:g} s per "
              f"setting after {args.warmup:g} s warm-up; before = {args.before_ref}:siamesedb/serve.py", flush=True)
        print("| load | clients | variant | answers/s | p50 ms | p99 ms | 5xx | adds stored | batches | mean batch | "
              "max batch |", flush=True)
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        rows = []
        for load in args.loads:
            for clients in args.clients:
                for name, (variant, settings) in variants.items():
                    row = run_setting(variant, pristine, scratch, clients, load, args.seconds, args.warmup, queries,
                                      add_pool, settings)
                    row["variant"] = name
                    rows.append(row)
                    batch = (f"{row['batches']} | {row['mean_batch']:.2f} | {row['max_batch']}" if variant == "after"
                             else "- | - | -" if variant.startswith("serve:") else "- | 1 | 1")
                    print(f"| {load} | {clients} | {name} | {row['per_s']:.1f} | {row['p50']:.1f} | {row['p99']:.1f} | "
                          f"{row['errors_5xx']} | {row['added']} | {batch} |", flush=True)
                    if load == "mixed":  # per role: answers/s, p50 / p99 ms
                        print("|  | | roles: " + "; ".join(f"{role} {r['per_s']:.1f}/s {r['p50']:.0f}/{r['p99']:.0f} ms"
                                                        for role, r in row["roles"].items()) + " |", flush=True)
        print(f"# load average {os.getloadavg()[0]:.2f} at the end", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
