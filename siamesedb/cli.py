"""The `siamesedb` command line: a thin click layer over db, training and evaluation.

Every command's real work lives in the Python API; this module parses options, calls it, and prints. Errors the
user can fix (SiameseDBError) become one line on stderr and exit status 1, in one place: `SiameseGroup.invoke`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from siamesedb import __version__
from siamesedb.errors import SiameseDBError
from siamesedb.query import VERIFY_RULES

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageLine(click.ClickException):
    """A usage error (missing option, unknown command...) as one line: `Error: ... (see `CMD --help`)`, exit 2."""

    exit_code = 2


def _usage_line(exc: click.UsageError) -> UsageLine:
    command = exc.ctx.command_path if exc.ctx is not None else "siamesedb"
    return UsageLine(f"{exc.format_message()} (see `{command} --help`)")


class SiameseGroup(click.Group):
    """A click group that turns named siamesedb errors into one clean line and exit status 1, and click's usage
    errors (three lines by default) into one line and exit status 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _usage_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _usage_line(exc) from None
        except SiameseDBError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


class ImageFailures(click.ClickException):
    """Some images of a batch could not be read: each was reported on its own line; the others were answered."""

    def show(self, file: Any = None) -> None:  # the per-image lines were printed already
        pass


# ---------------------------------------------------------------------------------------------- shared options


def index_option(required: bool = True) -> Callable:
    return click.option(
        "--index",
        "index_dir",
        required=required,
        type=click.Path(file_okay=False, path_type=Path),
        help="Index folder (e.g. indexes/omniglot).",
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Where to run the encoder (and search, for commands that search).",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
encoder_option = click.option(
    "--encoder",
    default="default",
    show_default=True,
    help="Encoder name ('default' = the shipped model) or a folder holding config.json + model.safetensors.",
)
def _set_lock_timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    # The API reads $SIAMESEDB_LOCK_TIMEOUT whenever no timeout is passed: setting it for this one process reaches
    # every write the command makes without threading the value through each call.
    if value is not None:
        import os

        from siamesedb.locking import TIMEOUT_ENV

        os.environ[TIMEOUT_ENV] = repr(float(value))


lock_timeout_option = click.option(
    "--lock-timeout",
    type=float,
    default=None,
    expose_value=False,
    callback=_set_lock_timeout,
    help="Seconds to wait while another process writes the index (default $SIAMESEDB_LOCK_TIMEOUT or 60; -1 = forever).",
)
images_argument = click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
sheet_option = click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
                            help="Also write a contact sheet PNG: each image beside its answers, labels and scores.")
nprobe_option = click.option("--nprobe", type=click.IntRange(min=1), default=None,
                             help="IVF indexes: inverted lists to visit for this query (more = slower, closer to exact).")
ef_search_option = click.option("--ef-search", type=click.IntRange(min=1), default=None,
                                 help="HNSW indexes: candidate list size for this query (more = slower, closer to exact).")


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2))


def encode_each(db: Any, images: tuple[Path, ...]) -> tuple[list[Path], Any]:
    """(readable images, their (n, D) vectors). An unreadable image is reported on stderr (one line each) and left
    out, so one bad file does not cost the others their answers; `finish_batch` then exits non-zero."""
    import numpy as np

    from siamesedb.errors import ImageLoadError

    try:
        return list(images), np.atleast_2d(db.encoder.encode(list(images)))
    except ImageLoadError:
        pass
    good, vectors = [], []
    for image in images:
        try:
            vectors.append(db.encoder.encode(image))
            good.append(image)
        except ImageLoadError as exc:
            click.echo(f"Error: {exc}", err=True)
    failed = len(images) - len(good)
    if not good:
        raise ImageFailures(f"none of the {failed} image(s) could be read")
    click.get_current_context().meta["failed_images"] = failed
    return good, np.stack(vectors)


def finish_batch() -> None:
    """Exit with status 1 after the answers when `encode_each` had to leave images out."""
    failed = click.get_current_context().meta.get("failed_images", 0)
    if failed:
        raise ImageFailures(f"{failed} image(s) could not be read")


def backend_options(command):
    """--backend and --milvus-uri: where a new index keeps its items (build, import)."""

    def check_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and ctx.params.get("backend", "faiss") != "milvus":
            raise click.UsageError("--milvus-uri needs --backend milvus")
        return value

    command = click.option(
        "--milvus-uri", default=None, metavar="URI", callback=check_uri,
        help="With --backend milvus: a Milvus server (http://host:19530; token from $SIAMESEDB_MILVUS_TOKEN) or a "
             "Milvus Lite file (*.db); default: a Milvus Lite file inside the index folder.")(command)
    return click.option(
        "--backend", type=click.Choice(["faiss", "milvus"]), default="faiss", show_default=True, is_eager=True,
        help="Where a new index keeps its items: embedded SQLite + FAISS, or Milvus (pip install "
             "'siamesedb[milvus]'). An existing index keeps the backend it was made with.")(command)


def open_db(index_dir: Path, device: str = "auto"):
    from siamesedb.db import SiameseDB

    return SiameseDB.open(index_dir, device=device)


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
    if use_ray and backend != "faiss":
        raise click.UsageError("--ray builds into an index's backend once it exists: create it with --backend first")
    if use_ray:
        if workers is not None:
            raise click.UsageError("--workers is for the in-process build; Ray sizes its own read tasks")
        from siamesedb.ray_build import build_with_ray

        db = build_with_ray(folder, path=index_dir, encoder=encoder, factory=factory, device=device,
                            batch_size=batch_size, address=ray_address, progress=not (quiet or as_json))
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


# ---------------------------------------------------------------------------------------------- training, evaluation


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the trained encoder (config.json + model.safetensors) and its logs go.")
@click.option("--loss", type=click.Choice(["contrastive", "triplet", "bce", "proto"]), default=None,
              help="Training objective (default: the recipe's, proto).")
@click.option("--time-budget", default=None, metavar="DURATION",
              help="Wall time for the whole run, e.g. 10m, 90s, 1h: epochs fitted after timing the first steps "
                   "(default 10m, unless --epochs or --steps-per-epoch fix the schedule).")
@click.option("--epochs", type=int, default=None,
              help="Passes over the training schedule (with --time-budget: the most epochs the budget may fit).")
@click.option("--steps-per-epoch", type=int, default=None, help="Optimiser steps per epoch.")
@click.option("--patience", type=click.IntRange(1), default=None,
              help="Stop after this many epochs without a better validation score (default 4 with a time budget).")
@click.option("--batch-size", type=int, default=None, help="Pairs / items per step.")
@click.option("--lr", type=float, default=None, help="Adam learning rate.")
@click.option("--margin", type=float, default=None, help="Margin of the contrastive / triplet loss.")
@click.option("--backbone", default=None,
              help="Backbone from the registry: conv4, conv4map, signet, resnet (default: the recipe's).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Input channels: 1 grey, 3 colour (default: 3 when the sampled images carry colour).")
@click.option("--invert/--no-invert", default=None,
              help="Invert grey levels, so dark ink on light paper becomes bright on zero (default: the recipe's).")
@click.option("--embedding-dim", type=int, default=None, help="Vector dimension.")
@click.option("--width", type=int, default=None, help="Backbone channel width.")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default=None,
              help="cosine: unit vectors, inner product (default); euclidean: raw vectors, L2 distance "
                   "(contrastive --margin in distance units; indexes search by L2, score = -distance).")
@click.option("--hidden", default=None, metavar="SIZES",
              help="mlp backbone: hidden layer sizes, e.g. 128,64,32 (the default; --embedding-dim 16 by default).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="mlp backbone: dropout after the hidden layers (default 0.1).")
@click.option("--image-size", type=int, default=None, help="Input height in pixels (and width, unless --image-width).")
@click.option("--image-width", type=int, default=None, help="Input width in pixels, for wide images (signatures).")
@click.option("--keep-aspect", is_flag=True, default=None, help="Fit images inside the input size, padding the rest.")
@click.option("--groups", default=None,
              help="Train only on these groups (first label component): 'U01-U30' or 'Latin,Greek'.")
@click.option("--way", type=int, default=None, help="Classes per prototypical episode (default: the recipe's, 60 for glyphs).")
@click.option("--shot", type=int, default=None, help="Support items per class in a prototypical episode (default: the recipe's, 5 when classes allow).")
@click.option("--rotate-classes", is_flag=True, default=None,
              help="Add 90/180/270-degree copies of each training class as new classes (characters).")
@click.option("--mirror-classes", is_flag=True, default=None,
              help="Add a left-right mirror copy of each training class as a new class (with rotations: 8 copies).")
@click.option("--augment/--no-augment", default=None, help="Random small affine distortions (default: on).")
@click.option("--flip/--no-flip", default=None, help="Random left-right flips (default: on for photos only).")
@click.option("--color-jitter", type=click.FloatRange(0, 1, max_open=True), default=None, metavar="X",
              help="Brightness and contrast jitter of up to +-X (default: 0.2 for photos, 0 otherwise).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="auto: bfloat16 autocast on CUDA and on CPUs with native bf16 (measured faster), else float32.")
@click.option("--augment-strength", type=click.FloatRange(0, 3), default=None, metavar="X",
              help="Scale the distortions' ranges (default 1: up to 10 degrees, 10% scale, 0.15 shear, 2 px).")
@click.option("--forgery-episodes/--no-forgery-episodes", default=None,
              help="Proto: an episode that draws X/genuine also draws X/forged as a class (default: off).")
@click.option("--within-group", "within_group", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
              help="Proto: this share of episodes draws all its classes from one group (alphabet) (default 0).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of the classes held out for per-epoch validation (default 0.1; 0: train on all).")
@click.option("--seed", type=int, default=None, help="Random seed (runs are deterministic on CPU).")
@click.option("--init", "init", default=None, metavar="NAME_OR_DIR",
              help="Start from this encoder's weights (same backbone and input size): fine-tune it.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@device_option
@quiet_option
def train(folder: Path, out_dir: Path, loss: str | None, time_budget: str | None, epochs: int | None,
          steps_per_epoch: int | None, patience: int | None, batch_size: int | None, lr: float | None,
          margin: float | None, backbone: str | None, channels: str | None, invert: bool | None,
          embedding_dim: int | None, width: int | None, image_size: int | None, image_width: int | None,
          keep_aspect: bool | None, groups: str | None, way: int | None, shot: int | None,
          rotate_classes: bool | None, mirror_classes: bool | None, augment: bool | None, flip: bool | None,
          color_jitter: float | None, precision: str | None,
          augment_strength: float | None, forgery_episodes: bool | None,
          within_group: float | None, val_fraction: float | None, seed: int | None, init: str | None,
          resume: bool, device: str, quiet: bool, metric: str | None = None, hidden: str | None = None,
          dropout: float | None = None) -> None:
    """Train a Siamese encoder on a labelled FOLDER (twin networks, shared weights).

    With no options it looks at a sample of the folder first (sizes, aspect, colour, background,
    classes, images per class, groups, forgery folders), chooses a recipe (input size, channels,
    inversion, backbone, loss, episode size, augmentation) and prints each choice with its reason,
    then fits the number of epochs to a time budget (default 10 minutes) after timing the first
    steps, keeps the best validation epoch, stops early when validation stops improving, and prints
    the held-out score with its 95% interval. Every choice can be overridden by its option; the
    choices are saved in train_config.json.

    Skilled forgeries: a class X/forged beside a class X/genuine holds forgeries of X.
    They never form genuine pairs and serve as hard impostors of X/genuine (pair losses); with
    --forgery-episodes, proto episodes that draw X/genuine also draw X/forged as a class.

    \b
    Example:
      siamesedb train ~/photos --out runs/photos                   # recipe chosen from the data, 10 minutes
      siamesedb train ~/omniglot/images_background --out runs/omniglot --loss proto --epochs 8
      siamesedb train ~/svc2004 --out runs/signatures --groups U01-U30 --loss contrastive \\
          --backbone signet --image-size 64 --image-width 128 --keep-aspect
      siamesedb train ~/mnist --out runs/mlp --backbone mlp --loss contrastive --margin 2 --metric euclidean
    """
    from siamesedb.recipe import DEFAULT_TIME_BUDGET, choose_recipe, inspect_folder, train_settings
    from siamesedb.training import TrainConfig, parse_duration, train as run_training

    overrides = {
        "loss": loss, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "lr": lr,
        "margin": margin, "backbone": backbone, "embedding_dim": embedding_dim, "width": width, "seed": seed,
        "device": device, "image_size": image_size, "image_width": image_width, "keep_aspect": keep_aspect,
        "groups": groups, "way": way, "shot": shot, "rotate_classes": rotate_classes,
        "mirror_classes": mirror_classes, "augment": augment, "augment_strength": augment_strength,
        "forgery_episodes": forgery_episodes, "init": init, "within_group": within_group,
        "val_fraction": val_fraction, "channels": int(channels) if channels else None, "invert": invert,
        "flip": flip, "color_jitter": color_jitter, "precision": precision, "patience": patience,
    }
    overrides.update(_mlp_and_metric_options(backbone, embedding_dim, metric, hidden, dropout))
    given = {key: value for key, value in overrides.items() if value is not None}
    started = time.perf_counter()  # a time budget counts from the inspection on
    say = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    profile = inspect_folder(folder, groups)
    recipe = choose_recipe(profile, given)
    say(f"looked at {profile.sampled} of {profile.images} images ({profile.classes} classes, {profile.groups} groups, "
        f"{profile.per_class_min}-{profile.per_class_median:g} images per class, median "
        f"{profile.median_width:g}x{profile.median_height:g} px): {recipe.domain}")
    for line in recipe.lines():
        say(line)
    settings = train_settings(recipe)
    if (epochs is not None or steps_per_epoch is not None) and time_budget is None:
        settings.pop("patience")  # a fixed schedule runs to its end, as before, unless --patience is given
        say("schedule fixed by --epochs / --steps-per-epoch: no time budget")
    else:
        settings["time_budget"] = parse_duration(time_budget) if time_budget else DEFAULT_TIME_BUDGET
        settings["epochs"] = recipe.max_epochs
        settings["steps_per_epoch"] = 100
    settings.update(given)
    settings["recipe"] = {"domain": recipe.domain, "reasons": recipe.reasons, "profile": profile.to_dict()}
    config = TrainConfig(**settings)
    encoder = run_training(folder, out_dir, config, progress=not quiet, resume=resume, log=say, started=started)
    click.echo(f"saved encoder {encoder.fingerprint} ({encoder.config.backbone}, {encoder.dimension}-d) to {out_dir}")


def _mlp_and_metric_options(backbone: str | None, embedding_dim: int | None, metric: str | None, hidden: str | None,
                            dropout: float | None) -> dict[str, Any]:
    """train's --metric / --hidden / --dropout as TrainConfig fields; the mlp backbone's output is 16-d unless
    --embedding-dim says otherwise (the reference MLP twin)."""
    sizes = None
    if hidden is not None:
        try:
            sizes = [int(part) for part in hidden.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{hidden!r}: give positive integers separated by commas, e.g. 128,64,32",
                                     param_hint="--hidden") from None
        if not sizes or min(sizes) < 1:
            raise click.BadParameter(f"{hidden!r}: give positive integers, e.g. 128,64,32", param_hint="--hidden")
    dim = 16 if backbone == "mlp" and embedding_dim is None else None
    return {"metric": metric, "hidden": sizes, "dropout": dropout, **({"embedding_dim": dim} if dim else {})}


@cli.group(cls=SiameseGroup, context_settings=CONTEXT_SETTINGS, name="eval")
def eval_group() -> None:
    """Measure accuracy on held-apart data (never the training classes).

    \b
    Example:
      siamesedb eval oneshot ~/omniglot/images_evaluation --encoder default --within-group
    """


@eval_group.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@encoder_option
@click.option("--way", default=20, show_default=True, help="Classes per episode.")
@click.option("--shot", default=1, show_default=True, help="Support images per class.")
@click.option("--queries", default=1, show_default=True, help="Query images per class per episode.")
@click.option("--episodes", default=1000, show_default=True, help="Episodes to average over.")
@click.option("--within-group", is_flag=True,
              help="Lake's protocol: all classes of an episode from one group (alphabet = first label component), "
                   "support all by one drawer, queries by another.")
@click.option("--seed", default=0, show_default=True, help="Episode sampling seed.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for oneshot.png (episode accuracies and the running mean).")
@device_option
@quiet_option
@json_option
def oneshot(folder: Path, encoder: str, way: int, shot: int, queries: int, episodes: int, within_group: bool,
            seed: int, plots: Path | None, device: str, quiet: bool, as_json: bool) -> None:
    """N-way K-shot classification accuracy (mean and 95% CI) over episodes of FOLDER.

    \b
    Example:
      siamesedb eval oneshot ~/omniglot/images_evaluation --within-group --way 20 --shot 1 --episodes 1000
    """
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import evaluate_oneshot

    result = evaluate_oneshot(folder, Encoder.load(encoder, device=device), way=way, shot=shot, queries=queries,
                              episodes=episodes, within_group=within_group, seed=seed,
                              progress=not (quiet or as_json), plots=plots)
    if as_json:
        emit_json(result.to_dict())
        return
    task = "within-group" if within_group else "unstructured"
    click.echo(f"{way}-way {shot}-shot ({task}, {episodes} episodes, seed {seed}): "
               f"accuracy {result.accuracy:.2%} ± {result.ci95:.2%} (95% CI)")
    for path in result.plots.values():
        click.echo(f"wrote {path}")


@eval_group.command(name="verify", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@encoder_option
@click.option("--references", default=5, show_default=True, help="Genuine references per test writer.")
@click.option("--test-groups", default="U31-U40", show_default=True, help="Unseen groups (writers) to verify.")
@click.option("--calibration-groups", default="U01-U30", show_default=True,
              help="Groups whose trials set the threshold (the training writers; never the test ones).")
@click.option("--rule", type=click.Choice(VERIFY_RULES), default="prototype", show_default=True,
              help="Score against the references' prototype, the best one, or the mean of the top 3.")
@click.option("--repeats", default=10, show_default=True, help="Random reference sets drawn per writer.")
@click.option("--seed", default=0, show_default=True, help="Reference sampling seed.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for roc.png and scores.png.")
@device_option
@quiet_option
@json_option
def eval_verify(folder: Path, encoder: str, references: int, test_groups: str, calibration_groups: str, rule: str,
                repeats: int, seed: int, plots: Path | None, device: str, quiet: bool, as_json: bool) -> None:
    """Skilled-forgery verification on unseen writers: AUC, EER, FAR and FRR.

    FOLDER holds <writer>/genuine and <writer>/forged classes. For each test writer,
    REFERENCES genuine signatures form the reference set; its other genuine ones and
    its skilled forgeries are verified against it. The threshold is the equal-error
    point of the same protocol on the calibration writers, never on the test answers.

    \b
    Example:
      siamesedb eval verify ~/svc2004 --encoder runs/signatures --references 5 --plots runs/plots
    """
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import evaluate_verification

    result = evaluate_verification(folder, Encoder.load(encoder, device=device), references=references,
                                   test_groups=test_groups, calibration_groups=calibration_groups, rule=rule,
                                   repeats=repeats, seed=seed, plots=plots, progress=not (quiet or as_json))
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"{len(result.test_groups)} unseen writers, {references} references, rule {rule}: "
               f"AUC {result.auc:.4f}, EER {result.eer:.2%}; at the calibrated threshold {result.threshold:.4f}: "
               f"FAR {result.far:.2%}, FRR {result.frr:.2%}, accuracy {result.accuracy:.2%}")
    for name, path in result.plots.items():
        click.echo(f"wrote {path}")


@eval_group.command(name="oneshot-verify", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@encoder_option
@click.option("--references", default=1, show_default=True, help="Reference images per class (1: one-shot).")
@click.option("--impostors", type=click.Choice(["group", "any"]), default="group", show_default=True,
              help="Impostor trials from the other classes of the same group (look-alikes: same alphabet), or any.")
@click.option("--threshold", type=float, default=None,
              help="Read FAR / FRR at this threshold (default: the encoder's own, verify's fallback).")
@click.option("--target-far", type=click.FloatRange(0, 1), default=None,
              help="Also report the lowest threshold meeting this FAR on these trials, and its FRR.")
@click.option("--groups", default=None, help="Only these groups (first label component): 'Latin,Greek' or 'U31-U40'.")
@click.option("--seed", default=0, show_default=True, help="Reference sampling seed.")
@device_option
@quiet_option
@json_option
def eval_oneshot_verify(folder: Path, encoder: str, references: int, impostors: str, threshold: float | None,
                        target_far: float | None, groups: str | None, seed: int, device: str, quiet: bool,
                        as_json: bool) -> None:
    """One-shot verification on unseen classes: AUC, EER, and FAR / FRR at a threshold.

    Each class of FOLDER gets REFERENCES random images of its own as its reference set;
    its other images are genuine trials, and the images of the other classes of its
    group (e.g. the other characters of one alphabet) are impostor trials. FAR and FRR
    are read at the encoder's own threshold: what `verify` uses on an uncalibrated index.

    \b
    Example:
      siamesedb eval oneshot-verify ~/omniglot/images_evaluation --references 1 --json
    """
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import evaluate_oneshot_verification

    result = evaluate_oneshot_verification(folder, Encoder.load(encoder, device=device), references=references,
                                           impostors=impostors, threshold=threshold, target_far=target_far,
                                           groups=groups, seed=seed, progress=not (quiet or as_json))
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"{result.classes} classes, {references} reference(s) each, impostors: {impostors}; "
               f"{result.genuine_trials} genuine / {result.impostor_trials} impostor trials: AUC {result.auc:.4f}, "
               f"EER {result.eer:.2%}; at threshold {result.threshold:.4f} ({result.threshold_source}): "
               f"FAR {result.far:.2%}, FRR {result.frr:.2%}")
    if result.far_threshold:
        at = result.far_threshold
        click.echo(f"lowest threshold with FAR <= {at['target_far']:.2%} on these trials: {at['threshold']:.4f} "
                   f"(FAR {at['far']:.2%}, FRR {at['frr']:.2%})")


@eval_group.command(name="pairs", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@encoder_option
@click.option("--test-groups", required=True, help="Unseen groups (classes of a flat folder) whose pairs are verified.")
@click.option("--calibration-groups", required=True,
              help="Groups whose pairs set the threshold at their equal-error point (the training classes).")
@click.option("--pairs", default=4000, show_default=True, help="Pairs drawn per side, half genuine, half impostor.")
@click.option("--seed", default=0, show_default=True, help="Pair sampling seed.")
@device_option
@quiet_option
@json_option
def eval_pairs(folder: Path, encoder: str, test_groups: str, calibration_groups: str, pairs: int, seed: int,
               device: str, quiet: bool, as_json: bool) -> None:
    """Two-image verification on unseen classes: accuracy at a calibrated threshold, EER, AUC.

    Pairs of images from the test groups (half the same class, half not) are scored by
    the encoder's metric (cosine, or minus the Euclidean distance) and accepted at the
    equal-error threshold of pairs from the calibration groups, never the test answers.

    \b
    Example:
      siamesedb eval pairs ~/fashion/test --encoder runs/mlp \\
          --calibration-groups T-shirt_top,Trouser,Pullover,Dress,Coat,Sandal \\
          --test-groups Shirt,Sneaker,Bag,Ankle_boot
    """
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import evaluate_pairs

    result = evaluate_pairs(folder, Encoder.load(encoder, device=device), test_groups=test_groups,
                            calibration_groups=calibration_groups, pairs=pairs, seed=seed,
                            progress=not (quiet or as_json))
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"{len(result.test_groups)} unseen classes, {pairs} pairs ({result.metric}): accuracy "
               f"{result.accuracy:.2%} at the calibrated threshold {result.threshold:.4f} (FAR {result.far:.2%}, "
               f"FRR {result.frr:.2%}); EER {result.eer:.2%}, AUC {result.auc:.4f}")


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


@cli.group(cls=SiameseGroup, context_settings=CONTEXT_SETTINGS, name="datasets")
def datasets_group() -> None:
    """Known public datasets: unpack their official archives into labelled folders.

    \b
    Example:
      siamesedb datasets fetch omniglot --to data --from ../shared/data
    """


@datasets_group.command(name="fetch", context_settings=CONTEXT_SETTINGS)
@click.argument("name", type=click.Choice(["omniglot", "svc2004", "fashion-mnist", "mnist"]))
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Destination folder (the dataset goes into TO/NAME/).")
@click.option("--from", "source", default=None,
              help="Folder or archive holding the official files, or an http(s) URL of a folder of them "
                   "(default: $SIAMESEDB_DATA or ../shared/data, else the official download).")
@quiet_option
@json_option
def datasets_fetch(name: str, to: Path, source: str | None, quiet: bool, as_json: bool) -> None:
    """Unpack a dataset into labelled folders (checksums verified); prints each split's root.

    Omniglot: images_background/ and images_evaluation/ (label Alphabet/characterNN).
    SVC2004: Uxx/genuine and Uxx/forged. Fashion-MNIST: train/ and test/ (label = class name);
    MNIST likewise (label = the digit). (Fashion-)MNIST files must match the official MD5s;
    every zip member its CRC-32.

    \b
    Example:
      siamesedb datasets fetch omniglot --to data --from ../shared/data
      siamesedb build data/omniglot/images_evaluation.d/images_evaluation --index indexes/omniglot
    """
    from siamesedb.datasets import fetch

    log = None if (quiet or as_json) else (lambda line: click.echo(line, err=True))
    roots = fetch(name, to, source=source, log=log, progress=log is not None)
    if as_json:
        emit_json({"dataset": name, "roots": {split: str(root) for split, root in roots.items()}})
        return
    for split, root in roots.items():
        click.echo(f"{name} {split}: {root}")


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings on the command line: one `warning: ...` line on stderr, not Python's file:line form."""
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning
    cli(prog_name="siamesedb")


if __name__ == "__main__":
    main()
