"""The `siamesedb` commands that make, change and move an index: build, add, remove, reindex, calibrate, export and
import (registered on the `siamesedb` group in cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from siamesedb.cli_common import (
    CONTEXT_SETTINGS,
    backend_options,
    device_option,
    emit_json,
    encoder_option,
    images_argument,
    index_option,
    json_option,
    lock_timeout_option,
    new_index_keywords,
    open_db,
    quiet_option,
)
from siamesedb.errors import FolderError
from siamesedb.rules import DEFAULT_RULE, VERIFY_RULES


@click.command(context_settings=CONTEXT_SETTINGS)
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
              help="With --ray: join this Ray cluster ('auto', HOST:PORT of its head, 'ray://host:10001'); default: start a local Ray.")
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
    try:
        db = _build(folder, index_dir, encoder, factory, device, batch_size, workers, backend, milvus_uri, use_ray,
                    ray_address, quiet or as_json)
    except FolderError as exc:  # none of the folder's images could be read: say why for each, then the one line
        for path, reason in getattr(exc, "skipped", []):
            click.echo(f"warning: skipped {path}: {reason}", err=True)
        raise
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


def _build(folder: Path, index_dir: Path, encoder: str, factory: str, device: str, batch_size: int,
           workers: int | None, backend: str, milvus_uri: str | None, use_ray: bool, ray_address: str | None,
           quiet: bool):
    from siamesedb.db import SiameseDB

    if ray_address is not None and not use_ray:
        raise click.UsageError("--ray-address needs --ray")
    if use_ray:
        if workers is not None:
            raise click.UsageError("--workers is for the in-process build; Ray sizes its own read tasks")
        from siamesedb.ray_build import build_with_ray

        return build_with_ray(folder, path=index_dir, encoder=encoder, factory=factory, device=device,
                              batch_size=batch_size, address=ray_address, progress=not quiet, quiet=quiet,
                              **new_index_keywords(backend, milvus_uri))
    return SiameseDB.build(folder, path=index_dir, encoder=encoder, factory=factory, device=device,
                           batch_size=batch_size, workers=workers, progress=not quiet,
                           **new_index_keywords(backend, milvus_uri))


@click.command(context_settings=CONTEXT_SETTINGS)
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


@click.command(context_settings=CONTEXT_SETTINGS)
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


@click.command(context_settings=CONTEXT_SETTINGS)
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
                   "search_defaults": db.search_defaults})
    else:
        click.echo(f"{index_dir}: rebuilt as {chosen} over {len(db)} items")


@click.command(context_settings=CONTEXT_SETTINGS)
@index_option()
@click.option("--target-far", type=click.FloatRange(0, 1), default=None,
              help="Lowest threshold whose false-accept rate is at most this, instead of the equal-error point "
                   "(needs impostor pairs only: works on a one-reference-per-class index).")
@lock_timeout_option
@click.option("--rule", type=click.Choice(VERIFY_RULES), default=DEFAULT_RULE, show_default=True,
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


@click.command("export", context_settings=CONTEXT_SETTINGS)
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


@click.command("import", context_settings=CONTEXT_SETTINGS)
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
    from siamesedb.db import SiameseDB

    db, result = SiameseDB.import_into(index_dir, file, encoder=encoder, force=force, renumber=renumber,
                                       **new_index_keywords(backend, milvus_uri))
    if as_json:
        emit_json({"index": str(index_dir), **result, "total": len(db)})
    else:
        click.echo(f"{index_dir}: imported {result['added']} items, {result['already_indexed']} already indexed; "
                   f"{len(db)} items")


INDEX_COMMANDS = (build, add, remove, reindex, calibrate, export_command, import_command)
