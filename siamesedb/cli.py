"""The `siamesedb` command line: a thin click layer over db, training and evaluation.

Every command's real work lives in the Python API; this module parses options, calls it, and prints. Errors the
user can fix (SiameseDBError) become one line on stderr and exit status 1, in one place: `SiameseGroup.invoke`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from siamesedb import __version__
from siamesedb.query import VERIFY_RULES
from siamesedb.cli_common import (  # noqa: F401 - re-exported: the shared pieces used to live here
    CONTEXT_SETTINGS,
    SiameseGroup,
    UsageLine,
    ImageFailures,
    backend_options,
    device_option,
    ef_search_option,
    emit_json,
    encode_each,
    encoder_option,
    finish_batch,
    images_argument,
    index_option,
    json_option,
    lock_timeout_option,
    nprobe_option,
    open_db,
    quiet_option,
    sheet_option,
)
from siamesedb.cli_train import datasets_group, eval_group, train


# ---------------------------------------------------------------------------------------------- the group


@click.group(cls=SiameseGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="siamesedb")
def cli() -> None:
    """siamesedb: one-shot image recognition with Siamese encoders and a FAISS index.

    \b
    Build an index from a labelled folder (label = the image's parent folder), then
    query it for similar images, classify new images against its classes, or verify
    that an image belongs to a claimed class.

    \b
    Example:
      siamesedb build data/omniglot/images_evaluation --index indexes/omniglot
      siamesedb classify new.png --index indexes/omniglot
    """


for _command in (train, eval_group, datasets_group):  # cli_train.py: training, evaluation, datasets
    cli.add_command(_command)


# ---------------------------------------------------------------------------------------------- writing


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@index_option()
@encoder_option
@click.option("--factory", default="Flat", show_default=True,
              help="FAISS index factory string (Flat, IVF256,Flat, HNSW32, IVF1024,PQ16…) or 'auto' (by collection size).")
@device_option
@click.option("--batch-size", default=256, show_default=True, help="Images encoded per batch.")
@click.option("--workers", type=int, default=None, help="Decoding processes (default: automatic).")
@backend_options
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the pipeline on Ray Data: read + decode tasks, encoder actors (one per GPU). pip install 'siamesedb[ray]'.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --ray: join this Ray cluster ('auto', 'ray://host:10001'); default: start a local Ray.")
@lock_timeout_option
@quiet_option
@json_option
def build(folder: Path, index_dir: Path, encoder: str, factory: str, device: str, batch_size: int,
          workers: int | None, backend: str, milvus_uri: str | None, use_ray: bool, ray_address: str | None,
          quiet: bool, as_json: bool) -> None:
    """Build (or resume building) an index from a labelled FOLDER.

    Each image's label is its parent folder's path relative to FOLDER (Latin/character07);
    an image directly in FOLDER is labelled by its file stem. Unreadable files are skipped
    with a warning. Re-running the same build adds only what the index lacks.

    \b
    Example:
      siamesedb build ~/omniglot/images_evaluation --index indexes/omniglot
      siamesedb build ~/photos --index indexes/photos --factory auto
      siamesedb build ~/photos --index indexes/photos --ray --ray-address auto
      siamesedb build ~/photos --index indexes/photos --backend milvus --milvus-uri http://milvus:19530
    """
    from siamesedb.db import SiameseDB

    if ray_address is not None and not use_ray:
        raise click.UsageError("--ray-address needs --ray")
    if use_ray:
        if workers is not None:
            raise click.UsageError("--workers is for the in-process build; Ray sizes its own read tasks")
        from siamesedb.ray_build import build_with_ray

        db = build_with_ray(folder, path=index_dir, encoder=encoder, factory=factory, device=device,
                            batch_size=batch_size, address=ray_address, progress=not (quiet or as_json),
                            backend=backend, milvus_uri=milvus_uri)
    else:
        db = SiameseDB.build(folder, path=index_dir, encoder=encoder, factory=factory, device=device,
                             batch_size=batch_size, workers=workers, progress=not (quiet or as_json),
                             backend=backend, milvus_uri=milvus_uri)
    report = db.last_report
    for path, reason in report.skipped:
        click.echo(f"warning: skipped {path}: {reason}", err=True)
    if as_json:
        emit_json({"index": str(index_dir), **report.to_dict(), "items": len(db), "classes": len(db.labels())})
        return
    click.echo(
        f"{index_dir}: added {report.added} images ({report.images_per_second:.0f} images/s), "
        f"{report.already_indexed} already indexed, {len(report.skipped)} skipped; "
        f"{len(db)} items in {len(db.labels())} classes"
    )


@cli.command(context_settings=CONTEXT_SETTINGS)
@images_argument
@index_option()
@click.option("--label", required=True, help="Class label for the added image(s).")
@device_option
@lock_timeout_option
@json_option
def add(images: tuple[Path, ...], index_dir: Path, label: str, device: str, as_json: bool) -> None:
    """Add IMAGE(s) to an index under one LABEL.

    \b
    Example:
      siamesedb add new1.png new2.png --index indexes/omniglot --label Latin/character27
    """
    db = open_db(index_dir, device)
    ids = [int(i) for i in db.add(list(images), label)]
    held = db.last_add_duplicates
    if as_json:
        emit_json({"label": label, "ids": ids, "paths": [str(p) for p in images], "already_stored": held})
    else:
        note = f", {held} already stored under {label!r} (not added twice)" if held else ""
        click.echo(f"added {len(ids) - held} image(s) as {label!r} (ids {', '.join(map(str, ids))}){note}; "
                   f"{len(db)} items")


@cli.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--id", "ids", type=int, multiple=True, help="Item id to remove (repeatable).")
@click.option("--label", default=None, help="Remove every item of this label.")
@lock_timeout_option
@json_option
def remove(index_dir: Path, ids: tuple[int, ...], label: str | None, as_json: bool) -> None:
    """Remove items by --id or a whole class by --label.

    \b
    Example:
      siamesedb remove --index indexes/omniglot --label Latin/character27
      siamesedb remove --index indexes/omniglot --id 42 --id 43
    """
    if bool(ids) == (label is not None):
        raise click.UsageError("give either --id (one or more) or --label")
    db = open_db(index_dir)
    removed = db.remove(ids=list(ids)) if ids else db.remove(label=label)
    if as_json:
        emit_json({"removed": removed, "items": len(db)})
    else:
        click.echo(f"removed {removed} item(s); {len(db)} left")


@cli.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--factory", default=None,
              help="New FAISS factory string, or 'auto' to choose again for today's size (default: keep the type).")
@click.option("--reroot", nargs=2, type=str, default=None, metavar="OLD NEW",
              help="The images moved: rewrite stored paths under folder OLD to lie under NEW (nothing else changes).")
@lock_timeout_option
@json_option
def reindex(index_dir: Path, factory: str | None, reroot: tuple[str, str] | None, as_json: bool) -> None:
    """Rebuild the FAISS index from the store: retrain, drop removed items, optionally change type.

    With --reroot OLD NEW, only rewrite the stored image paths (the images moved).

    \b
    Example:
      siamesedb reindex --index indexes/omniglot --factory auto
      siamesedb reindex --index indexes/omniglot --reroot /old/data /new/data
    """
    db = open_db(index_dir)
    if reroot is not None:
        changed = db.reroot(*reroot)
        if as_json:
            emit_json({"index": str(index_dir), "rerooted": changed, "items": len(db)})
        else:
            click.echo(f"{index_dir}: {changed} of {len(db)} image paths now under {reroot[1]}")
        return
    chosen = db.reindex(factory)
    if as_json:
        emit_json({"index": str(index_dir), "factory": chosen, "items": len(db),
                   "search_defaults": db.backend.search_defaults})
    else:
        click.echo(f"{index_dir}: rebuilt as {chosen} over {len(db)} items")


@cli.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--target-far", type=click.FloatRange(0, 1), default=None,
              help="Lowest threshold whose false-accept rate is at most this, instead of the equal-error point "
                   "(needs impostor pairs only: works on a one-reference-per-class index).")
@lock_timeout_option
@click.option("--rule", type=click.Choice(VERIFY_RULES), default="prototype", show_default=True,
              help="Score against the class prototype, the best reference, or the mean of the top 3.")
@json_option
def calibrate(index_dir: Path, target_far: float | None, rule: str, as_json: bool) -> None:
    """Calibrate the verification threshold on the index's own genuine/impostor pairs.

    \b
    Example:
      siamesedb calibrate --index indexes/signatures --target-far 0.01
    """
    result = open_db(index_dir).calibrate(target_far=target_far, rule=rule)
    if result.get("warning"):
        click.echo(f"warning: {result['warning']}", err=True)
    if as_json:
        emit_json(result)
        return
    where = "equal-error point" if result["method"] == "eer" else f"target FAR {target_far}"
    frr = "unknown (no genuine pairs: one item per class)" if result["frr"] is None else f"{result['frr']:.2%}"
    click.echo(
        f"threshold {result['threshold']:.4f} ({rule}, {where}): FAR {result['far']:.2%}, FRR {frr} "
        f"over {result['genuine_pairs']} genuine / {result['impostor_pairs']} impostor pairs"
    )


@cli.command("export", context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.parquet, or FILE.npy (vectors) with its sidecar FILE.json (ids, labels, paths, hashes).")
@json_option
def export_command(index_dir: Path, to: Path, as_json: bool) -> None:
    """Export every item's id, label, path, content hash and vector, with the encoder fingerprint.

    For moving a collection to another vector engine, or into another index (`siamesedb import`).

    \b
    Example:
      siamesedb export --index indexes/omniglot --to omniglot.parquet
      siamesedb export --index indexes/omniglot --to omniglot.npy   # + omniglot.json
    """
    metadata = open_db(index_dir).export_vectors(to)
    if as_json:
        emit_json({"file": str(to), **metadata})
    else:
        click.echo(f"exported {metadata['count']} items ({metadata['dimension']}-d, encoder "
                   f"{metadata['encoder']['fingerprint']}) to {to}")


@cli.command("import", context_settings=CONTEXT_SETTINGS)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@index_option()
@click.option("--encoder", default="default", show_default=True,
              help="Encoder of a new index (when --index does not exist yet); must match the file's fingerprint.")
@click.option("--force", is_flag=True, help="Import even if the file's encoder fingerprint differs from the index's.")
@click.option("--renumber", is_flag=True, help="Give the items new ids instead of keeping the file's.")
@backend_options
@json_option
def import_command(file: Path, index_dir: Path, encoder: str, force: bool, renumber: bool, backend: str,
                   milvus_uri: str | None, as_json: bool) -> None:
    """Import an export (FILE.parquet or FILE.npy + FILE.json) into an index, creating it if needed.

    Items the index already holds (same label and content hash) are skipped; the file's ids are kept.

    \b
    Example:
      siamesedb import omniglot.parquet --index indexes/omniglot-copy
    """
    from siamesedb.export import import_into

    db, result = import_into(index_dir, file, encoder=encoder, force=force, renumber=renumber, backend=backend,
                             milvus_uri=milvus_uri)
    if as_json:
        emit_json({"index": str(index_dir), **result, "total": len(db)})
    else:
        click.echo(f"{index_dir}: imported {result['added']} items, {result['already_indexed']} already indexed; "
                   f"{len(db)} items")


# ---------------------------------------------------------------------------------------------- reading


@cli.command(context_settings=CONTEXT_SETTINGS)
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
    results = db.search_vectors(vectors, k=k, nprobe=nprobe, ef_search=ef_search)
    if sheet is not None:
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


@cli.command(context_settings=CONTEXT_SETTINGS)
@images_argument
@index_option()
@click.option("--method", type=click.Choice(["prototype", "knn"]), default="prototype", show_default=True,
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
                                      ef_search=ef_search, top=None if as_json else max(1, top))
    if sheet is not None:
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


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option(required=False)
@click.option("--label", default=None, help="Claimed class (with --index).")
@encoder_option
@click.option("--threshold", type=float, default=None,
              help="Accept at or above this score (default: the index's calibration for the rule, else the "
                   "encoder's own threshold).")
@click.option("--rule", type=click.Choice(VERIFY_RULES), default=None,
              help="Scoring rule against the support set (default: the rule calibrated last, else prototype).")
@device_option
@json_option
def verify(images: tuple[Path, ...], index_dir: Path | None, label: str | None, encoder: str,
           threshold: float | None, rule: str | None, device: str, as_json: bool) -> None:
    """Verify IMAGE(s) against a claimed --label of an index, or IMAGE_A against IMAGE_B.

    With --index and --label, each IMAGE is scored against that class's support set and
    accepted when the score reaches the threshold: the index's calibrated one for the
    rule if there is one, else the encoder's own (so a one-reference-per-class index
    verifies without calibration). The answer names the threshold's source. With two
    images and no index, they are compared directly with the encoder's pair threshold.

    \b
    Example:
      siamesedb verify questioned.png --index indexes/signatures --label U31/genuine
      siamesedb verify a.png b.png --json
    """
    if index_dir is not None:
        if label is None:
            raise click.UsageError("with --index, give the claimed class with --label")
        db = open_db(index_dir, device)
        images, vectors = encode_each(db, images)
        db.check_domain(images)
        results = [db.verify_vector(v, label, threshold=threshold, rule=rule) for v in vectors]
    else:
        if len(images) != 2:
            raise click.UsageError("give IMAGE... --index DIR --label LABEL, or two images IMAGE_A IMAGE_B")
        from siamesedb.db import verify_pair

        results = [verify_pair(images[0], images[1], encoder=encoder, threshold=threshold, device=device)]
    documents = [{**result.to_dict(), "query": str(path)} for path, result in zip(images, results)]
    if as_json:
        emit_json(documents[0] if len(documents) == 1 else documents)
    else:
        for path, result in zip(images, results):
            verdict = "ACCEPTED" if result.accepted else "REJECTED"
            click.echo(f"{path} as {result.label}: {verdict} (score {result.score:.4f}, threshold "
                       f"{result.threshold:.4f} from {result.threshold_source})")
    if index_dir is not None:
        finish_batch()


@cli.command(context_settings=CONTEXT_SETTINGS)
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
        emit_json({**summary, "labels": db.backend.label_counts()})
        return
    if list_labels:
        for label, count in sorted(db.backend.label_counts().items()):
            click.echo(f"{count:>8}  {label}")
        return
    calibration = summary["calibration"]
    click.echo(f"index      {summary['path']}")
    click.echo(f"items      {summary['items']} in {summary['classes']} classes")
    defaults = ", ".join(f"{key} {value}" for key, value in summary.get("search_defaults", {}).items())
    kind = f"Milvus {summary['milvus']['index_type']}" if "milvus" in summary else f"FAISS {summary['factory']}"
    click.echo(f"vectors    {summary['dimension']}-d, {summary['metric']}, {kind}"
               + (f" ({defaults})" if defaults else ""))
    if "milvus" in summary:
        milvus = summary["milvus"]
        click.echo(f"backend    Milvus {'Lite ' if milvus['lite'] else ''}{milvus['uri']}, collection "
                   f"{milvus['collection']}, {milvus['index_type']}")
    enc = summary["encoder"]
    extras = "".join([f", {enc['members']} members" if enc["members"] > 1 else "",
                      ", whitened" if enc["whitening"] else "",
                      f", test-time shift {enc['test_time_shift']}" if enc["test_time_shift"] else ""])
    click.echo(f"encoder    {enc['backbone']} {enc['name']} (fingerprint {enc['fingerprint']}, input {enc['image_size']}"
               f"{extras})")
    for rule, cal in sorted((summary.get("calibrations") or {}).items()):
        latest = " (verify's default rule)" if calibration and calibration.get("rule") == rule else ""
        click.echo(f"threshold  {cal['threshold']:.4f} ({rule}, {cal['method']}, {cal['genuine_pairs']} genuine / "
                   f"{cal['impostor_pairs']} impostor pairs){latest}")
    carried = summary["encoder"].get("pair_threshold")
    if carried is not None:
        click.echo(f"threshold  {carried:.4f} (the encoder's own: used for any rule not calibrated here)")
    elif not calibration:
        click.echo("threshold  none: run `siamesedb calibrate`, or pass --threshold to verify")


# ---------------------------------------------------------------------------------------------- serving


@cli.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback makes the write endpoints need a token).")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="SIAMESEDB_TOKEN", default=None,
              help="Bearer token for POST /items and DELETE /items/ID (env SIAMESEDB_TOKEN; made up when needed).")
@click.option("--max-upload-mb", type=float, default=10.0, show_default=True, help="Largest accepted request body.")
@device_option
def serve(index_dir: Path, host: str, port: int, token: str | None, max_upload_mb: float, device: str) -> None:
    """Serve an index over HTTP: a JSON API and a web page at http://HOST:PORT/.

    POST an image to /search, /classify or /verify?label=L; GET /info, /labels,
    /items/ID; POST /items?label=L and DELETE /items/ID change the index. The
    OpenAPI schema is at /openapi.json, its interactive page at /docs.

    \b
    Example:
      siamesedb serve --index indexes/omniglot-demo --port 8000
      curl -s -H 'Content-Type: image/png' --data-binary @new.png 'http://127.0.0.1:8000/search?k=5'
    """
    from siamesedb.serve import serve as run_server

    open_db(index_dir, device).close()  # a missing or broken index fails here, as one line, before the server starts
    click.echo(f"serving {index_dir} on http://{host}:{port}/ (API schema: /docs; Ctrl-C stops)", err=True)
    run_server(index_dir, host=host, port=port, token=token, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
               device=device)


@cli.command(name="plot-map", context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
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


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings on the command line: one `warning: ...` line on stderr, not Python's file:line form."""
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning
    cli(prog_name="siamesedb")


if __name__ == "__main__":
    main()
