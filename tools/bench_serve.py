"""HTTP API throughput: `POST /search` through a real uvicorn server, one client and several concurrent clients,
against the Python API's `db.search` on the same images in the same run (what the HTTP layer costs on top).

The index: --index DIR if given, else drawers 01-02 of every Omniglot evaluation character (as `make demo`).
Queries: --queries PNG files of drawer 03. Each setting: one warm-up pass, then --runs timed passes over all
queries; prints the median, one line per setting.

Run:  python tools/bench_serve.py [--data PATH] [--index DIR] [--queries 200] [--runs 3] [--clients 1 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from siamesedb.data import scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import SiameseDB
from siamesedb.evaluation import drawer_of
from siamesedb.serve import create_app


def timed(fn, runs: int) -> float:
    fn()  # warm-up: torch kernels, connection set-up, page cache
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def start_server(index: Path):
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index, device="cpu"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/info", timeout=2):
                return server, thread, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--index", default=None, help="An existing index (default: build a demo-like one).")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()

    folder = omniglot("evaluation", source=args.data)
    images = scan_folder(folder)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        if args.index:
            index = Path(args.index)
        else:
            support = scratch / "support"
            for im in images:
                if drawer_of(im.path) in ("01", "02"):
                    target = support / im.label / im.path.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(im.path, target)
            index = scratch / "index"
            SiameseDB.build(support, path=index, device="cpu").close()
        queries = [im.path for im in images if drawer_of(im.path) == "03"][: args.queries]
        bodies = [q.read_bytes() for q in queries]
        db = SiameseDB.open(index, device="cpu")
        print(f"# index {len(db)} items, {len(queries)} query PNGs, k={args.k}, torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
              f"{time.strftime('%Y-%m-%d')}")

        def python_api() -> None:
            for q in queries:
                db.search(q, k=args.k)

        # The baseline runs in a worker thread, as the server's handlers do: torch's and FAISS's OpenMP pools
        # behave differently in the main thread (on a loaded 2-core machine, several times slower there).
        with ThreadPoolExecutor(max_workers=1) as worker:
            baseline = timed(lambda: worker.submit(python_api).result(), args.runs)
        print(f"python api db.search, 1 caller:   {len(queries) / baseline:7.1f} queries/s  "
              f"({1000 * baseline / len(queries):.1f} ms each)  1.00x")
        server, thread, url = start_server(index)

        def post(body: bytes) -> None:
            request = urllib.request.Request(f"{url}/search?k={args.k}", data=body, method="POST",
                                             headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()

        for clients in args.clients:
            with ThreadPoolExecutor(max_workers=clients) as pool:
                seconds = timed(lambda: list(pool.map(post, bodies)), args.runs)
            print(f"http POST /search, {clients} client(s):  {len(queries) / seconds:7.1f} queries/s  "
                  f"({1000 * seconds / len(queries):.1f} ms each)  {baseline / seconds:.2f}x")
        server.should_exit = True
        thread.join(timeout=10)
        db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
