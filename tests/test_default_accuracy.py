"""Guard the shipped default's accuracy on real data: a swap of the default, a change of preprocessing or of the
encoding precision (bf16) must not silently cost one-shot accuracy.

Fixed subset: 20-way 1-shot within alphabet (Lake's drawer protocol) on five evaluation alphabets of Omniglot
(Atlantean, Aurek-Besh, Avesta, Ge_ez, Keble: 26 characters x 20 drawers each, 2,600 images), 400 episodes,
seed 0, prototype ranking. Measured 2026-12-01 with the default `8bbd3064e906683e` (five views, float32):
90.17%; the floor sits 3 points under it (the 95% interval of 400 episodes is about +-1.5 points).
"""

from __future__ import annotations

import numpy as np

from helpers import OMNIGLOT_EVALUATION, needs  # tests/helpers.py

ALPHABETS = ("Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Keble")
EPISODES, SEED = 400, 0
MEASURED = 0.9017  # 90.17% over the 400 episodes (2026-12-01, 2-core CPU, float32, 6 s)
FLOOR = MEASURED - 0.03


def subset_accuracy(encoder) -> float:
    """Mean 20-way 1-shot within-alphabet accuracy of `encoder` on the fixed subset."""
    from siamesedb import datasets
    from siamesedb.data import scan_folder
    from siamesedb.evaluation import encode_images, episode_accuracies

    root = datasets.omniglot("evaluation", source=OMNIGLOT_EVALUATION)
    # scan_folder(root / alphabet) labels images by character only: put the alphabet back in front (the group).
    scanned = [(alphabet, im) for alphabet in ALPHABETS for im in scan_folder(root / alphabet)]
    images = [im for _, im in scanned]
    labels = [f"{alphabet}/{im.label}" for alphabet, im in scanned]
    vectors, kept, skipped = encode_images(images, encoder)
    assert skipped == 0 and len(kept) == len(images) == 2600
    accuracies = episode_accuracies(vectors, labels, [str(im.path) for im in kept], way=20, shot=1, queries=1,
                                    episodes=EPISODES, within_group=True, seed=SEED)
    return float(np.mean(accuracies))


@needs(OMNIGLOT_EVALUATION)
def test_default_scores_its_measured_accuracy_on_real_omniglot():
    from siamesedb.encoder import Encoder

    encoder = Encoder.load("default")
    accuracy = subset_accuracy(encoder)
    assert accuracy >= FLOOR, f"default {encoder.fingerprint}: {accuracy:.2%} < floor {FLOOR:.2%} (measured {MEASURED:.2%})"
