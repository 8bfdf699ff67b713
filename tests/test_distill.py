"""siamesedb.distill: the distillation loss against a plain loop, and a few real steps that close the gap between a
one-view student and its five-view teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from siamesedb.distill import DistillConfig, distill, distillation_loss, mean_cosine, student_of, teacher_targets

from helpers import OMNIGLOT_BACKGROUND, needs  # tests/helpers.py


def slow_loss(student: torch.Tensor, teacher: torch.Tensor, relational: float) -> float:
    n = len(student)
    s, t = student.double().tolist(), teacher.double().tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    pointwise = sum(1.0 - dot(s[i], t[i]) for i in range(n)) / n
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    rel = sum((dot(s[i], s[j]) - dot(t[i], t[j])) ** 2 for i, j in pairs) / len(pairs)
    return pointwise + relational * rel


@pytest.mark.parametrize("relational", [0.0, 1.0, 3.0])
def test_distillation_loss_is_the_cosine_gap_plus_the_relational_gap(relational):
    gen = torch.Generator().manual_seed(1)
    student = F.normalize(torch.randn(7, 5, generator=gen), dim=1)
    teacher = F.normalize(torch.randn(7, 5, generator=gen), dim=1)
    loss, parts = distillation_loss(student, teacher, relational)
    assert float(loss) == pytest.approx(slow_loss(student, teacher, relational), rel=1e-5, abs=1e-6)
    assert parts["cosine"] == pytest.approx(slow_loss(student, teacher, 0.0), rel=1e-5)
    same, same_parts = distillation_loss(teacher, teacher, relational)  # a perfect student costs nothing
    assert float(same) == pytest.approx(0.0, abs=1e-6) and same_parts["relational"] == pytest.approx(0.0, abs=1e-6)


def test_the_loss_has_gradients_towards_the_teacher():
    gen = torch.Generator().manual_seed(2)
    teacher = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    raw = torch.randn(6, 4, generator=gen, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=0.05)
    first = None
    for _ in range(300):
        loss, _ = distillation_loss(F.normalize(raw, dim=1), teacher, 1.0)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.1 * first


@needs(OMNIGLOT_BACKGROUND)
def test_a_few_steps_on_real_characters_bring_the_one_view_student_closer_to_the_five_view_teacher():
    from siamesedb import datasets
    from siamesedb.data import load_batch, scan_folder
    from siamesedb.encoder import MODELS_DIR, Encoder

    teacher = Encoder.load("default-5view" if (MODELS_DIR / "default-5view").is_dir() else "default")
    assert teacher.config.test_time_shift > 0
    root = datasets.omniglot("background", source=OMNIGLOT_BACKGROUND)
    images = [im for im in scan_folder(root / "Latin") if int(im.path.stem.split("_")[1]) <= 4][:26 * 4]
    tensor, kept, skipped = load_batch([im.path for im in images], teacher.config.preprocessing)
    assert not skipped and len(kept) >= 80
    names = sorted({im.label for im in images})
    labels = np.asarray([names.index(images[i].label) for i in kept])
    targets = teacher_targets(teacher, tensor)
    student = student_of(teacher)
    assert student.config.test_time_shift == 0 and student.fingerprint != teacher.fingerprint
    before = mean_cosine(student, tensor, targets)
    config = DistillConfig(steps=25, warmup=5, relational=3.0, lr=3e-4, way=10, queries=3, within_group=0.0, proto=0.0,
                           augment_fraction=0.0, eval_every=1000)
    trained, history = distill(teacher, tensor, targets, labels, config=config, student=student)
    after = mean_cosine(trained, tensor, targets)
    assert after > before + 0.002, (before, after)
    assert Encoder.load("default-5view" if (MODELS_DIR / "default-5view").is_dir() else "default").fingerprint == \
        teacher.fingerprint  # the teacher's own weights are untouched


def test_the_one_view_student_ships_by_name_beside_its_teacher():
    from siamesedb.encoder import MODELS_DIR, Encoder

    if not (MODELS_DIR / "default-1view").is_dir():
        pytest.skip("default-1view is not installed")
    student = Encoder.load("default-1view")
    teacher = Encoder.load(student.config.notes["distilled_from"]["encoder"])
    assert student.config.test_time_shift == 0 and teacher.config.test_time_shift > 0
    assert student.config.notes["distilled_from"]["fingerprint"] == teacher.fingerprint
    assert student.config.pair_threshold is not None and student.dimension == teacher.dimension
    gen = torch.Generator().manual_seed(0)
    strokes = (torch.rand(16, 1, 28, 28, generator=gen) > 0.85).float()  # sparse ink, inverted like the glyphs
    cosine = (torch.from_numpy(student.encode_tensors(strokes)) * torch.from_numpy(teacher.encode_tensors(strokes))).sum(1)
    assert float(cosine.mean()) > 0.9
