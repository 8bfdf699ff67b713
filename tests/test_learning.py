"""Training learns, fast and on synthetic data, for every loss (issue 29): a tiny net on small generated images of a
few well-separated classes. The untrained reference is the same run (same seed, so the same initial weights and the
same batches in the same order) with a learning rate of zero: only the optimiser's steps differ. A loop that forgets
`optimizer.step()`, zeroes the gradients after the backward pass, or steps on the wrong parameters leaves the loss
where the untrained run has it, and these fail; the real-data learning test (test_recipe.py) needs ../shared/data and
about a minute."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from siamesedb.training import TrainConfig, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes x 10 images, 16x16: a ring, a square, an X, a bar, each drawn with a small random shift."""
    root = tmp_path_factory.mktemp("learn")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"shape{c}").mkdir()
        for i in range(10):
            image = Image.new("L", (16, 16), 255)
            pen = ImageDraw.Draw(image)
            dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
            if c == 0:
                pen.ellipse((3 + dx, 3 + dy, 12 + dx, 12 + dy), outline=0, width=2)
            elif c == 1:
                pen.rectangle((3 + dx, 3 + dy, 12 + dx, 12 + dy), fill=0)
            elif c == 2:
                pen.line((2 + dx, 2 + dy, 13 + dx, 13 + dy), fill=0, width=2)
                pen.line((2 + dx, 13 + dy, 13 + dx, 2 + dy), fill=0, width=2)
            else:
                pen.rectangle((2 + dx, 6 + dy, 13 + dx, 9 + dy), fill=0)
            image.save(root / f"shape{c}" / f"{i}.png")
    return root


def config(loss: str, lr: float) -> TrainConfig:
    return TrainConfig(loss=loss, lr=lr, epochs=4, steps_per_epoch=20, batch_size=16, image_size=16, width=8,
                       embedding_dim=8, val_fraction=0.0, way=4, shot=2, queries=2, per_class=4, augment=False,
                       workers=0, device="cpu", precision="fp32", seed=0)


def losses(folder, out, loss: str, lr: float) -> list[float]:
    train(folder, out, config(loss, lr), progress=False)
    return [h["loss"] for h in json.loads((out / "history.json").read_text())]


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "bce", "proto"])
def test_each_loss_learns_a_separable_task(shapes, tmp_path, loss):
    untrained = losses(shapes, tmp_path / "frozen", loss, lr=0.0)
    trained = losses(shapes, tmp_path / "trained", loss, lr=1e-2)
    assert all(np.isfinite(untrained + trained))
    # Same batches, same start: the last epoch's loss must fall well below the frozen net's on those batches.
    assert trained[-1] < 0.6 * untrained[-1], (loss, trained, untrained)
    assert trained[-1] < trained[0], (loss, trained)  # and it keeps falling over the run
