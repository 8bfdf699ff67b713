"""The `siamesedb` commands that ask an index and show its answers: query, classify, verify, info, plot-map, and serve
(the same questions over HTTP), registered on the `siamesedb` group in cli.py."""

from __future__ import annotations

from pathlib import Path

import click

from siamesedb.cli_common import (
    CONTEXT_SETTINGS,
    device_option,
    ef_search_option,
    emit_json,
    encode_each,
    encoder_option,
    finish_batch,
    image_error,
    images_argument,
    index_option,
    json_option,
    nprobe_option,
    open_db,
    report_image_error,
    sheet_option,
    writable_file,
)
from siamesedb.classes import CLASSIFY_METHODS
from siamesedb.rules import VERIFY_RULES

EXIT_REJECTED = 3  # `verify --exit-code` when an image is rejected: apart from 1 (an error) and 2 (a usage error)


@click.command(context_settings=CONTEXT_SETTINGS)
@images_argument
@index_option()
@click.option("-k", "k", default=5, show_default=True, help="How many neighbours to return.")
@nprobe_option
@ef_search_option
@device_option
@json_option
@sheet_option
def query(images: tuple[Path, ...], index_dir: Path, k: int, nprobe: int | None, ef_search: int | None, device: str,
          as_json: bool, sheet: Path | None) -> None:
    """Find the K most similar indexed items to each IMAGE.

    \b
    Example:
      siamesedb query new.png --index indexes/omniglot -k 5 --json
      siamesedb query new.png --index indexes/omniglot --sheet answers.png
      siamesedb query new.png --index indexes/big --nprobe 32
    """
    db = open_db(index_dir, device)
    images, vectors = encode_each(db, images)
    results = db.search_vectors(vectors, k=k, nprobe=nprobe, ef_search=ef_search) if images else []
    if sheet is not None and images:
        from siamesedb.plots import search_sheet

        click.echo(f"wrote {search_sheet(list(images), results, sheet)}", err=True)
    if as_json:
        emit_json([{"query": str(p), "hits": [h.to_dict() for h in hits]} for p, hits in zip(images, results)])
        finish_batch()
        return
    for path, hits in zip(images, results):
        click.echo(str(path))
        for rank, hit in enumerate(hits, 1):
            click.echo(f"  {rank:>2}. {hit.score:.4f}  {hit.label}  (id {hit.id}, {hit.path})")
    finish_batch()


@click.command(context_settings=CONTEXT_SETTINGS)
@images_argument
@index_option()
@click.option("--method", type=click.Choice(CLASSIFY_METHODS), default="prototype", show_default=True,
              help="Nearest class prototype, or a score-weighted vote of the k nearest items.")
@click.option("-k", "k", default=5, show_default=True, help="Neighbours that vote (knn only).")
@click.option("--class", "classes", multiple=True, help="Restrict to these classes (repeatable): an N-way episode.")
@click.option("--top", default=5, show_default=True, help="Ranking entries shown (all are in --json).")
@nprobe_option
@ef_search_option
@device_option
@json_option
@sheet_option
def classify(images: tuple[Path, ...], index_dir: Path, method: str, k: int, classes: tuple[str, ...], top: int,
             nprobe: int | None, ef_search: int | None, device: str, as_json: bool, sheet: Path | None) -> None:
    """Say which of the index's classes each IMAGE belongs to.

    \b
    Example:
      siamesedb classify new.png --index indexes/omniglot --method prototype --json
      siamesedb classify new.png --index indexes/omniglot --sheet classes.png
    """
    db = open_db(index_dir, device)
    images, vectors = encode_each(db, images)
    # Only --json lists every class; printing needs the best `top` (with 100k classes: a FAISS search, not a sort).
    predictions = db.classify_vectors(vectors, method=method, k=k, classes=list(classes) or None, nprobe=nprobe,
                                      ef_search=ef_search, top=None if as_json else max(1, top)) if images else []
    if sheet is not None and images:
        from siamesedb.plots import classify_sheet

        click.echo(f"wrote {classify_sheet(db, list(images), predictions, sheet, top=top)}", err=True)
    if as_json:
        emit_json([{"query": str(p), **pred.to_dict()} for p, pred in zip(images, predictions)])
        finish_batch()
        return
    for path, pred in zip(images, predictions):
        click.echo(f"{path}: {pred.label} ({pred.score:.4f})")
        for label, score in pred.ranking[1:top]:
            click.echo(f"    {score:.4f}  {label}")
    finish_batch()


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option(required=False)
@click.option("--label", default=None, help="Claimed class (with --index).")
@encoder_option
@click.option("--threshold", type=float, default=None,
              help="Accept at or above this score (default: the index's calibration for the rule, else the "
                   "encoder's own threshold, which does not serve --rule relative).")
@click.option("--rule", type=click.Choice(VERIFY_RULES), default=None,
              help="Scoring rule against the support set (default: the rule calibrated last, else prototype).")
@device_option
@json_option
@click.option("--exit-code", "exit_code", is_flag=True,
              help=f"Exit {EXIT_REJECTED} when any image is REJECTED (0: all accepted; 1: an error, as always).")
def verify(images: tuple[Path, ...], index_dir: Path | None, label: str | None, encoder: str,
           threshold: float | None, rule: str | None, device: str, as_json: bool, exit_code: bool) -> None:
    """Verify IMAGE(s) against a claimed --label of an index, or IMAGE_A against IMAGE_B.

    With --index and --label, each IMAGE is scored against that class's support set and
    accepted when the score reaches the threshold: the index's calibrated one for the
    rule if there is one, else the encoder's own (so a one-reference-per-class index
    verifies without calibration). The answer names the threshold's source. With two
    images and no index, they are compared directly with the encoder's pair threshold.
    --json prints one object for one IMAGE (or a pair), a list for several. --exit-code
    exits 3 when any image is rejected, for shell scripts.

    \b
    Example:
      siamesedb verify questioned.png --index indexes/signatures --label U31/genuine
      siamesedb verify questioned.png --index indexes/signatures --label U31/genuine --exit-code
      siamesedb verify a.png b.png --json
    """
    if index_dir is not None:
        if label is None:
            raise click.UsageError("with --index, give the claimed class with --label")
        db = open_db(index_dir, device)
        answered, vectors = encode_each(db, images)
        if answered:
            db.check_domain(answered)
        results = [db.verify_vector(v, label, threshold=threshold, rule=rule) for v in vectors]
        single = len(images) == 1
    else:
        if len(images) != 2:
            raise click.UsageError("give IMAGE... --index DIR --label LABEL, or two images IMAGE_A IMAGE_B")
        from siamesedb.db import verify_pair
        from siamesedb.errors import ImageLoadError

        answered, results, single, label = images[:1], [], True, str(images[1])
        try:
            results = [verify_pair(images[0], images[1], encoder=encoder, threshold=threshold, device=device)]
        except ImageLoadError as exc:
            if not as_json:
                raise
            report_image_error(images[0], exc)
            answered = []
    documents = [{**result.to_dict(), "query": str(path)} for path, result in zip(answered, results)]
    if as_json:
        if not single:
            emit_json(documents)
        elif documents:
            emit_json(documents[0])
        else:  # one IMAGE that could not be read: still one object, saying why (no verdict)
            emit_json({"query": str(images[0]), "label": label, "error": image_error(images[0])})
    else:
        for path, result in zip(answered, results):
            verdict = "ACCEPTED" if result.accepted else "REJECTED"
            click.echo(f"{path} as {result.label}: {verdict} (score {result.score:.4f}, threshold "
                       f"{result.threshold:.4f} from {result.threshold_source})")
    finish_batch()
    if exit_code and not all(result.accepted for result in results):
        click.get_current_context().exit(EXIT_REJECTED)


@click.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--labels", "list_labels", is_flag=True, help="List every class and its item count.")
@json_option
def info(index_dir: Path, list_labels: bool, as_json: bool) -> None:
    """Show an index's size, classes, dimension, encoder and thresholds.

    --json holds every class ("labels": {label: count}); --labels prints them all.

    \b
    Example:
      siamesedb info --index indexes/omniglot
      siamesedb info --index indexes/omniglot --labels
    """
    db = open_db(index_dir)
    summary = db.info()
    if as_json:
        emit_json({**summary, "labels": db.label_counts()})
        return
    if list_labels:
        for label, count in sorted(db.label_counts().items()):
            click.echo(f"{count:>8}  {label}")
        return
    calibration = summary["calibration"]
    click.echo(f"index      {summary['path']}")
    click.echo(f"items      {summary['items']} in {summary['classes']} classes")
    defaults = ", ".join(f"{key} {value}" for key, value in summary.get("search_defaults", {}).items())
    click.echo(f"vectors    {summary['dimension']}-d, {summary['metric']}, {summary['backend_summary']}"
               + (f" ({defaults})" if defaults else ""))
    if summary["backend_location"]:
        click.echo(f"backend    {summary['backend_location']}")
    enc = summary["encoder"]
    extras = "".join([f", {enc['members']} members" if enc["members"] > 1 else "",
                      ", whitened" if enc["whitening"] else "",
                      f", test-time shift {enc['test_time_shift']}" if enc["test_time_shift"] else ""])
    size = f", {enc['parameters']:,} parameters ({enc['parameters'] * 4 / 1e6:.1f} MB)" if enc.get("parameters") else ""
    click.echo(f"encoder    {enc['backbone']} {enc['name']} (fingerprint {enc['fingerprint']}, input {enc['image_size']}"
               f"{size}{extras})")
    for rule, cal in sorted((summary.get("calibrations") or {}).items()):
        latest = " (verify's default rule)" if calibration and calibration.get("rule") == rule else ""
        stale = f", stale: the index changed since ({cal['items_now']} items now)" if cal.get("stale") else ""
        click.echo(f"threshold  {cal['threshold']:.4f} ({rule}, {cal['method']}, {cal['genuine_pairs']} genuine / "
                   f"{cal['impostor_pairs']} impostor pairs{stale}){latest}")
    carried = summary["encoder"].get("pair_threshold")
    if carried is not None:
        click.echo(f"threshold  {carried:.4f} (the encoder's own: used for a rule not calibrated here whose score "
                   "is on its scale; not `relative`)")
    elif not calibration:
        click.echo("threshold  none: run `siamesedb calibrate`, or pass --threshold to verify")


# ---------------------------------------------------------------------------------------------- serving


@click.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback makes the write endpoints need a token).")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="SIAMESEDB_TOKEN", default=None,
              help="Bearer token for POST /items and DELETE /items/ID (env SIAMESEDB_TOKEN; made up when needed).")
@click.option("--max-upload-mb", type=float, default=10.0, show_default=True, help="Largest accepted request body.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Server processes sharing the port (each opens the index; writes take turns through its lock). "
                   "Default: one per CPU core (at most 4) for a FAISS index on the CPU, else 1.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Most concurrent requests encoded together in one forward pass.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="Longest a batch waits for requests still being decoded (never for ones not yet sent).")
@device_option
def serve(index_dir: Path, host: str, port: int, token: str | None, max_upload_mb: float, workers: int | None,
          max_batch: int, max_wait_ms: float, device: str) -> None:
    """Serve an index over HTTP: a JSON API and a web page at http://HOST:PORT/.

    POST an image to /search, /classify or /verify?label=L; GET /info, /labels,
    /items/ID; POST /items?label=L and DELETE /items/ID change the index. The
    OpenAPI schema is at /openapi.json, its interactive page at /docs. Several
    multipart `file` fields ask about several images at once (a list back).
    Concurrent requests are encoded together (--max-batch, --max-wait-ms).

    \b
    Example:
      siamesedb serve --index indexes/omniglot-demo --port 8000
      curl -s -H 'Content-Type: image/png' --data-binary @new.png 'http://127.0.0.1:8000/search?k=5'
    """
    from siamesedb.serve import default_workers, serve as run_server

    open_db(index_dir, device).close()  # a missing or broken index fails here, as one line, before the server starts
    workers = workers or default_workers(index_dir, device)
    click.echo(f"serving {index_dir} on http://{host}:{port}/ with {workers} process{'es' if workers > 1 else ''} "
               "(API schema: /docs; Ctrl-C stops)", err=True)
    run_server(index_dir, host=host, port=port, token=token, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
               device=device, workers=workers, max_batch=max_batch, max_wait_ms=max_wait_ms)


@click.command(name="plot-map", context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), callback=writable_file,
              help="PNG to write (into a folder that exists).")
@click.option("--class", "classes", multiple=True, help="Draw these classes (repeatable; default: the largest ones).")
@click.option("--max-classes", default=20, show_default=True, help="How many of the largest classes to draw.")
def plot_map(index_dir: Path, out: Path, classes: tuple[str, ...], max_classes: int) -> None:
    """Draw an index's vectors in 2-D (PCA), one colour per class, class means as crosses.

    \b
    Example:
      siamesedb plot-map --index indexes/omniglot-demo --out map.png --max-classes 12
    """
    from siamesedb.plots import index_map

    click.echo(f"wrote {index_map(open_db(index_dir), out, classes=list(classes) or None, max_classes=max_classes)}")



READ_COMMANDS = (query, classify, verify, info, serve, plot_map)
