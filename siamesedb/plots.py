"""Every figure siamesedb draws: contact sheets of answers, a 2-D map of an index's vectors, episode accuracies,
the training loss curve, verification ROC curves and score histograms.

matplotlib (Agg backend, no display needed), imported only when a figure is drawn; every function writes its PNG(s)
and returns the path(s).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.errors import ImageLoadError, InvalidInputError
from siamesedb.scoring import roc_points, score_matrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Tile:
    """One picture of a contact sheet: an image source (path, PIL image or array; None = nothing to show) and text."""

    image: Any
    caption: str
    colour: str | None = None  # frame colour, None for no frame


def _thumbnail(source: Any, size: int = 128) -> np.ndarray | None:
    """(H, W) or (H, W, 3) uint8 array of `source` fitted into size x size, or None when it cannot be read."""
    from siamesedb.data import load_image

    if source is None or (isinstance(source, (str, os.PathLike)) and not str(source)):
        return None
    try:
        image = load_image(source)
    except ImageLoadError:
        return None
    image.thumbnail((size, size))
    return np.asarray(image)


def check_out_file(out: str | os.PathLike) -> Path:
    """A PNG the user named on the command line (--sheet, plot-map --out) goes into a folder that exists: nothing
    creates the folders of a mistyped path (as `export --to`). InvalidInputError naming the folder otherwise."""
    out = Path(out)
    if not out.parent.is_dir():
        raise InvalidInputError(f"{out.parent}: folder not found")
    if out.is_dir():
        raise InvalidInputError(f"{out}: is a folder, not a file")
    return out


def _save(fig: Any, out: str | os.PathLike) -> Path:
    """Lay out, write (creating the folder: the Python API's callers name it on purpose; the command line checks
    the files a user names with `check_out_file` first) and close a figure; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _short(text: str, width: int = 22) -> str:
    """Long labels (Alphabet/characterNN) are cut from the left: the end tells classes apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def contact_sheet(rows: Sequence[tuple[Tile, Sequence[Tile]]], out: str | os.PathLike, title: str = "") -> Path:
    """One row per query: the query's tile, then its answer tiles (neighbours or classes), captions beneath."""
    if not rows:
        raise InvalidInputError("a contact sheet needs at least one row")
    plt = _pyplot()
    columns = 1 + max(len(answers) for _, answers in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 2.0 * len(rows) + (0.4 if title else 0)),
                             dpi=100, squeeze=False)
    for r, (query_tile, answers) in enumerate(rows):
        for c, tile in enumerate([query_tile, *answers, *[None] * (columns - 1 - len(answers))]):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if tile is None:
                ax.set_axis_off()
                continue
            pixels = _thumbnail(tile.image)
            if pixels is None:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, color="grey")
            else:
                ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xlabel(tile.caption, fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(tile.colour is not None)
                if tile.colour is not None:
                    spine.set_color(tile.colour)
                    spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _query_tile(source: Any, name: str) -> Tile:
    return Tile(source, f"query\n{_short(Path(name).name if name else 'image')}", colour="tab:blue")


def search_sheet(queries: Sequence[Any], results: Sequence[Sequence[Any]], out: str | os.PathLike) -> Path:
    """`siamesedb query --sheet`: each query beside its top-k hits (image, label, score)."""
    rows = []
    for source, hits in zip(queries, results):
        answers = [Tile(hit.path, f"{_short(hit.label)}\n{hit.score:.3f}") for hit in hits]
        rows.append((_query_tile(source, str(source)), answers))
    score = "cosine similarity" if getattr(results, "metric", "cosine") == "cosine" else "minus the Euclidean distance"
    return contact_sheet(rows, out, title=f"query → most similar items ({score})")


def classify_sheet(db: Any, queries: Sequence[Any], predictions: Sequence[Any], out: str | os.PathLike,
                   top: int = 5) -> Path:
    """`siamesedb classify --sheet`: each query beside its `top` ranked classes, each shown by the class's item most
    similar to the query; the predicted class is framed in green."""
    vectors = np.atleast_2d(db.encoder.encode(list(queries)))
    rows = []
    for source, vector, prediction in zip(queries, vectors, predictions):
        answers = []
        for rank, (label, score) in enumerate(prediction.ranking[:top]):
            ids, support = db.vectors(label=label)
            nearest = np.argmax(score_matrix(vector[None, :], support, db.metric)[0]) if len(ids) else 0
            best = db.item(int(ids[int(nearest)])) if len(ids) else None
            answers.append(Tile(best.path if best else None, f"{_short(label)}\n{score:.3f}",
                                colour="tab:green" if rank == 0 else None))
        rows.append((_query_tile(source, str(source)), answers))
    return contact_sheet(rows, out, title="query → ranked classes (each shown by its nearest item; score of the class)")


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> ((N, 2) coordinates on the first two principal axes, (2,) fraction of variance each explains)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2)), np.zeros(2)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    components = np.zeros((2, vectors.shape[1]))
    components[: min(2, len(axes))] = axes[:2]
    variance = singular**2
    explained = np.zeros(2)
    explained[: min(2, len(variance))] = variance[:2] / max(float(variance.sum()), 1e-12)
    return centred @ components.T, explained


def choose_classes(labels: Sequence[str], classes: Sequence[str] | None = None, max_classes: int = 20) -> list[str]:
    """The classes a map draws: `classes` as given (each must exist), else the `max_classes` largest (ties: by name)."""
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    if classes:
        unknown = sorted(set(classes) - set(names.tolist()))
        if unknown:
            from siamesedb.errors import UnknownLabelError

            raise UnknownLabelError(f"no class {unknown[0]!r} in the index")
        return list(dict.fromkeys(classes))
    if max_classes < 1:
        raise InvalidInputError(f"max_classes must be at least 1, got {max_classes}")
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
    return sorted(str(names[i]) for i in order[:max_classes])


def embedding_map(vectors: np.ndarray, labels: Sequence[str], out: str | os.PathLike, classes: Sequence[str] | None = None,
                  max_classes: int = 20, title: str = "") -> Path:
    """A 2-D PCA projection of an index's vectors, one colour per class, class prototypes as crosses.

    With more than `max_classes` classes (and no explicit `classes`), the largest ones are drawn (ties: by name):
    hundreds of colours on one plot tell nothing apart. The projection is computed on the drawn classes only.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels, dtype=object)
    if len(vectors) == 0:
        raise InvalidInputError("the index holds no vectors to plot")
    names = np.unique(labels)
    chosen = choose_classes(labels, classes, max_classes)
    keep = np.isin(labels, np.asarray(chosen, dtype=object))
    points, explained = pca_2d(vectors[keep])
    kept_labels = labels[keep]
    plt = _pyplot()
    colours = plt.get_cmap("tab20" if len(chosen) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=100)
    for i, name in enumerate(chosen):
        mine = points[kept_labels == name]
        colour = colours(i % colours.N)
        ax.scatter(mine[:, 0], mine[:, 1], s=22, color=colour, alpha=0.8, label=_short(str(name), 36))
        centre = mine.mean(axis=0)
        ax.scatter([centre[0]], [centre[1]], marker="X", s=90, color=colour, edgecolors="black", linewidths=0.6)
    ax.set_xlabel(f"principal axis 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"principal axis 2 ({explained[1]:.0%} of variance)")
    shown = f"{len(chosen)} of {len(names)} classes" if len(chosen) < len(names) else f"{len(names)} classes"
    ax.set_title(title or f"embedding map: {int(keep.sum())} vectors, {shown} (× = class mean)", fontsize=10)
    if len(chosen) <= 30:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.2)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def index_map(db: Any, out: str | os.PathLike, classes: Sequence[str] | None = None, max_classes: int = 20) -> Path:
    """`siamesedb plot-map`: the embedding map of every vector an index holds."""
    ids, vectors = db.vectors()
    return embedding_map(vectors, db.labels_of(ids), out, classes=classes, max_classes=max_classes,
                         title="")


def oneshot_accuracy(accuracies: np.ndarray, way: int, shot: int, out: str | os.PathLike) -> Path:
    """`eval oneshot --plots`: the spread of per-episode accuracies, and the running mean with its 95% interval."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if len(accuracies) == 0:
        raise InvalidInputError("no episodes to plot")
    plt = _pyplot()
    n = np.arange(1, len(accuracies) + 1)
    running = np.cumsum(accuracies) / n
    # Running standard error from running sums (ddof=1); undefined for the first episode.
    squares = np.cumsum(accuracies**2)
    variance = np.where(n > 1, (squares - n * running**2) / np.maximum(n - 1, 1), np.nan)
    half = 1.96 * np.sqrt(np.clip(variance, 0, None) / n)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    left.hist(accuracies, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    left.axvline(running[-1], color="black", linestyle="--", label=f"mean {running[-1]:.1%}")
    left.set_xlabel("episode accuracy")
    left.set_ylabel("episodes")
    left.legend(fontsize=8)
    right.plot(n, running, color="tab:blue")
    right.fill_between(n, running - half, running + half, color="tab:blue", alpha=0.25, label="95% interval")
    right.set_xlabel("episodes")
    right.set_ylabel("mean accuracy so far")
    right.set_ylim(0, 1)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{way}-way {shot}-shot: {running[-1]:.2%} ± {half[-1]:.2%} over {len(accuracies)} episodes",
                 fontsize=10)
    return _save(fig, out)


def loss_curve(history: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    """`siamesedb train`'s loss_curve.png: training loss per epoch, and the held-out validation accuracy beside it."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=100)
    left.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss", color="tab:blue")
    if any(h.get("val_accuracy") is not None for h in history):
        right = left.twinx()
        right.plot(epochs, [h.get("val_accuracy") for h in history], "s-", color="tab:red", label="validation")
        right.set_ylabel(f"held-out {history[-1].get('val_way', 20)}-way 1-shot accuracy", color="tab:red")
        right.set_ylim(0, 1.02)  # an accuracy: a flat line at 1.0 must not be stretched into a band around it
    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    left.set_title("siamesedb train")
    return _save(fig, out)


def verification_plots(genuine: np.ndarray, forged: np.ndarray, threshold: float, title: str,
                       folder: str | os.PathLike) -> dict[str, str]:
    """`eval verification --plots`: roc.png (false accepts vs true accepts) and scores.png (genuine vs forged
    histograms) in `folder`; returns {"roc": path, "scores": path}."""
    from siamesedb.trials import rates_at, roc_auc

    folder = Path(folder)
    plt = _pyplot()
    _, far, frr = roc_points(genuine, forged)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(far, 1 - frr, color="tab:blue", label=f"AUC {roc_auc(genuine, forged):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    false_accepts, false_rejects = rates_at(genuine, forged, threshold)
    ax.plot(false_accepts, 1 - false_rejects, "o", color="tab:red", label=f"calibrated threshold {threshold:.3f}")
    ax.set_xlabel("false accept rate (skilled forgeries accepted)")
    ax.set_ylabel("true accept rate (genuine accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    roc = _save(fig, folder / "roc.png")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(min(genuine.min(), forged.min()), max(genuine.max(), forged.max()), 40)
    ax.hist(genuine, bins=bins, alpha=0.6, color="tab:green", label=f"genuine ({len(genuine)})")
    ax.hist(forged, bins=bins, alpha=0.6, color="tab:red", label=f"skilled forgeries ({len(forged)})")
    ax.axvline(threshold, color="black", linestyle="--", label="calibrated threshold")
    ax.set_xlabel("similarity to the reference set")
    ax.set_ylabel("trials")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    scores = _save(fig, folder / "scores.png")
    return {"roc": str(roc), "scores": str(scores)}


__all__ = ["Tile", "contact_sheet", "search_sheet", "classify_sheet", "pca_2d", "choose_classes", "embedding_map", "index_map",
           "oneshot_accuracy", "loss_curve", "verification_plots"]
