"""Guard the shipped encoders' accuracy on real data: a swap of the default, a change of preprocessing, of the
test-time views or of the encoding precision (bf16) must not silently cost one-shot accuracy.

Protocol: BENCHMARKS.md's "One-shot accuracy on the evaluation alphabets", exactly (`siamesedb eval oneshot EVAL
[--within-group] --way 20 --shot 1 --episodes 1000`, seed 0): all 20 evaluation alphabets of Omniglot (659
characters x 20 drawers, 13,180 images), 20-way 1-shot, one query per class, 1,000 episodes, prototype ranking;
within alphabet (Lake's drawer protocol: 20 characters of one alphabet, support and queries each by one drawer) and
unstructured (20 characters from any alphabets). Each encoder is encoded once for both tasks.

Measured 2026-12-03 (2-core CPU, float32), the same figures BENCHMARKS.md publishes: the default `8bbd3064e906683e`
(five views) 87.50% +- 0.65% within alphabet, 95.91% +- 0.29% unstructured; `default-1view` `5ea5fd707b0facc4`
86.42% +- 0.67% / 95.56% +- 0.30% (+- the 95% interval over the 1,000 episodes). Each floor is its figure minus
one interval. The default with its five views turned off (test_time_shift 0: 85.29% / 95.03%) fails both of its
floors, and `default-1view` in the default's place fails both too. About 40 s of encoding for the default and
10 s for the student on 2 quiet cores, plus the archive's unpacking the first time.
"""

from __future__ import annotations

import pytest

from helpers import OMNIGLOT_EVALUATION, needs  # tests/helpers.py

pytestmark = needs(OMNIGLOT_EVALUATION)

WAY, SHOT, EPISODES, SEED = 20, 1, 1000, 0
IMAGES = 13_180  # 659 characters x 20 drawers
# (encoder, task) -> (measured accuracy, its 95% half-interval), 2026-12-03; the floor is one interval under.
MEASURED = {
    ("default", "within alphabet"): (0.87500, 0.00655),
    ("default", "unstructured"): (0.95910, 0.00286),
    ("default-1view", "within alphabet"): (0.86425, 0.00673),
    ("default-1view", "unstructured"): (0.95555, 0.00298),
}


@pytest.fixture(scope="module")
def evaluation_images():
    """Every image of Omniglot's evaluation set, labelled `Alphabet/characterNN` (the alphabet is the group)."""
    from siamesedb import datasets
    from siamesedb.data import scan_folder

    images = scan_folder(datasets.omniglot("evaluation", source=OMNIGLOT_EVALUATION))
    assert len(images) == IMAGES
    return images


@pytest.fixture(scope="module")
def encoded(evaluation_images):
    """name -> (encoder, vectors, kept images), each shipped encoder encoded once for the module."""
    from siamesedb.encoder import Encoder
    from siamesedb.evaluation import encode_images

    cache = {}

    def encode(name: str):
        if name not in cache:
            encoder = Encoder.load(name)
            vectors, kept, skipped = encode_images(evaluation_images, encoder)
            assert skipped == 0 and len(kept) == IMAGES
            cache[name] = encoder, vectors, kept
        return cache[name]

    return encode


@pytest.mark.parametrize(("name", "task"), list(MEASURED), ids=[f"{n}-{t.split()[0]}" for n, t in MEASURED])
def test_shipped_encoder_keeps_its_measured_one_shot_accuracy_on_real_omniglot(encoded, name, task):
    from siamesedb.episodes import mean_ci95
    from siamesedb.evaluation import episode_accuracies

    encoder, vectors, kept = encoded(name)
    accuracies = episode_accuracies(vectors, [im.label for im in kept], [str(im.path) for im in kept], way=WAY,
                                    shot=SHOT, queries=1, episodes=EPISODES, within_group=task == "within alphabet",
                                    seed=SEED, metric=encoder.config.metric)
    accuracy, ci95 = mean_ci95(accuracies)
    measured, interval = MEASURED[name, task]
    floor = measured - interval
    assert accuracy >= floor, (f"{name} {encoder.fingerprint}, 20-way 1-shot {task}: {accuracy:.2%} +- {ci95:.2%} < "
                               f"floor {floor:.2%} (measured {measured:.2%} +- {interval:.2%})")
