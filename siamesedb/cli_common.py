"""What every `siamesedb` command shares: the error-to-one-line group, option decorators, JSON output, and the
per-image error handling of batch commands (cli_index.py, cli_read.py and cli_train.py build their commands from
these; cli.py gathers them under the one group). Named errors become one line in one place: `SiameseGroup.invoke`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from siamesedb.backends import BACKEND_NAMES, DEFAULT_BACKEND
from siamesedb.errors import SiameseDBError

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


def writable_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A click callback for an output file (--sheet, --out): its folder must exist (nothing creates it), checked
    before any work is done; otherwise an InvalidInputError naming the folder (one line, by SiameseGroup.invoke)."""
    if value is not None:
        from siamesedb.plots import check_out_file

        check_out_file(value)
    return value


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
                            callback=writable_file,
                            help="Also write a contact sheet PNG: each image beside its answers, labels and scores.")
nprobe_option = click.option("--nprobe", type=click.IntRange(min=1), default=None,
                             help="IVF indexes: inverted lists to visit for this query (more = slower, closer to exact).")
ef_search_option = click.option("--ef-search", type=click.IntRange(min=1), default=None,
                                 help="HNSW indexes: candidate list size for this query (more = slower, closer to exact).")


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2))


def encode_each(db: Any, images: tuple[Path, ...]) -> tuple[list[Path], Any]:
    """(readable images, their (n, D) vectors). An unreadable image is reported on stderr (one line each) and left
    out, so one bad file does not cost the others their answers; `finish_batch` then exits non-zero. When none can
    be read the answer is empty ((0, D) vectors): each command still prints its document (`[]` with --json)."""
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
            report_image_error(image, exc)
    return good, np.stack(vectors) if vectors else np.empty((0, db.dimension), dtype=np.float32)


def report_image_error(image: Any, exc: Exception) -> None:
    """One image of a batch could not be read: its one line on stderr now; the command exits 1 after its answers."""
    click.echo(f"Error: {exc}", err=True)
    meta = click.get_current_context().meta
    meta["failed_images"] = meta.get("failed_images", 0) + 1
    meta.setdefault("image_errors", {})[str(image)] = str(exc)


def image_error(image: Any) -> str | None:
    """The message `report_image_error` gave for `image`, if it failed."""
    return click.get_current_context().meta.get("image_errors", {}).get(str(image))


def finish_batch() -> None:
    """Exit with status 1 after the answers when `encode_each` had to leave images out."""
    failed = click.get_current_context().meta.get("failed_images", 0)
    if failed:
        raise ImageFailures(f"{failed} image(s) could not be read")


def backend_options(command):
    """--backend and --milvus-uri: where a new index keeps its items (build, import)."""

    def check_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and ctx.params.get("backend", DEFAULT_BACKEND) != "milvus":
            raise click.UsageError("--milvus-uri needs --backend milvus")
        return value

    command = click.option(
        "--milvus-uri", default=None, metavar="URI", callback=check_uri,
        help="With --backend milvus: a Milvus server (http://host:19530; token from $SIAMESEDB_MILVUS_TOKEN) or a "
             "Milvus Lite file (*.db); default: a Milvus Lite file inside the index folder.")(command)
    return click.option(
        "--backend", type=click.Choice(BACKEND_NAMES), default=DEFAULT_BACKEND, show_default=True, is_eager=True,
        help="Where a new index keeps its items: embedded SQLite + FAISS, or Milvus (pip install "
             "'siamesedb[milvus]'). An existing index keeps the backend it was made with.")(command)


def new_index_keywords(backend: str, milvus_uri: str | None) -> dict[str, Any]:
    """--backend / --milvus-uri as the keywords SiameseDB.create (and build, import_into) takes for a new index:
    the backend's registry name and its one options mapping."""
    return {"backend": backend, "backend_options": {"uri": milvus_uri} if milvus_uri is not None else None}


def open_db(index_dir: Path, device: str = "auto"):
    from siamesedb.db import SiameseDB

    return SiameseDB.open(index_dir, device=device)
