"""The `siamesedb` command line: the click group, its entry point, and where each command family lives.

Every command's real work lives in the Python API; the commands parse options, call it, and print. Errors the
user can fix (SiameseDBError) become one line on stderr and exit status 1, in one place: `SiameseGroup.invoke`
(cli_common.py). The commands: cli_index.py (build, add, remove, reindex, calibrate, export, import), cli_read.py
(query, classify, verify, info, plot-map, serve), cli_train.py (train, eval, datasets).
"""

from __future__ import annotations

from typing import Any

import click

from siamesedb import __version__
from siamesedb.cli_common import (  # noqa: F401 - re-exported: the shared pieces used to live here
    CONTEXT_SETTINGS,
    ImageFailures,
    SiameseGroup,
    UsageLine,
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
from siamesedb.cli_index import INDEX_COMMANDS
from siamesedb.cli_read import READ_COMMANDS
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


for _command in (*INDEX_COMMANDS, *READ_COMMANDS, train, eval_group, datasets_group):
    cli.add_command(_command)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings on the command line: one `warning: ...` line on stderr, not Python's file:line form."""
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    """The `siamesedb` console script (pyproject.toml) and `python -m siamesedb`."""
    import warnings

    warnings.showwarning = _show_warning
    cli(prog_name="siamesedb")


if __name__ == "__main__":
    main()
