"""The photo branch of the automatic recipe (siamesedb.recipe.choose_recipe): what a photo profile drives.

The choices were measured with tools/photo_sweep.py (BENCHMARKS.md "Photos: the no-flag recipe measured"): grey
Fashion-MNIST (28 px) and the colour shapes of tools/make_colour_shapes.py (48 px RGB), scored on unseen classes.
Profiles are built by hand here, so each test pins one rule of the photo branch without reading any images.
"""

from __future__ import annotations

import pytest

from siamesedb.recipe import FolderProfile, choose_recipe, train_settings
from siamesedb.training import TrainConfig


def photo_profile(side: float = 28, colour: bool = False, classes: int = 40, per_class: int = 20,
                  aspect: float = 1.0) -> FolderProfile:
    """A folder of filled photos (few plain-background or pure black/white pixels): grey or colour, `side` px."""
    return FolderProfile(
        images=classes * per_class, classes=classes, groups=classes, per_class_min=per_class,
        per_class_median=float(per_class), forgery_classes=0, sampled=min(200, classes * per_class),
        median_height=float(side), median_width=float(side) * aspect, median_aspect=aspect,
        colour_share=1.0 if colour else 0.0, light_background_share=0.0, background_share=0.4, binary_share=0.3,
    )


def test_a_hand_made_photo_profile_is_a_photo():
    for colour in (False, True):
        assert choose_recipe(photo_profile(colour=colour)).domain == "photo"


@pytest.mark.parametrize("side", [24, 28, 48])
def test_small_photos_keep_their_native_size(side):
    # Fashion-MNIST: 28 px native beat 40 px at 600 steps (69.6% / 64.9% vs 63.1%, 4-way 1-shot on unseen classes)
    s = choose_recipe(photo_profile(side=side)).settings
    assert s["image_size"] == side and s["image_width"] is None and s["keep_aspect"] is False


def test_large_photos_are_shrunk_to_64():
    assert choose_recipe(photo_profile(side=112, aspect=92 / 112)).settings["image_size"] == 64


def test_grey_photos_get_one_channel_no_inversion_flips_and_jitter():
    s = choose_recipe(photo_profile(colour=False)).settings
    assert (s["channels"], s["invert"], s["backbone"], s["width"]) == (1, False, "resnet", 16)
    assert s["flip"] is True and s["color_jitter"] == pytest.approx(0.2)
    assert s["augment"] is True and s["augment_strength"] == pytest.approx(1.0)
    assert s["loss"] == "proto"


def test_colour_photos_get_three_channels_and_the_same_recipe_otherwise():
    grey, colour = (choose_recipe(photo_profile(side=48, colour=c)).settings for c in (False, True))
    assert colour["channels"] == 3 and grey["channels"] == 1
    assert {k: v for k, v in colour.items() if k != "channels"} == {k: v for k, v in grey.items() if k != "channels"}


def test_photo_episodes_are_at_most_20_way_and_fit_the_smallest_class():
    s = choose_recipe(photo_profile(classes=80, per_class=20)).settings
    assert s["way"] == 20 and (s["shot"], s["queries"]) == (5, 5)
    few = choose_recipe(photo_profile(classes=40, per_class=4)).settings
    assert few["shot"] + few["queries"] <= 4 and few["shot"] >= 1


def test_photo_settings_are_train_config_fields():
    config = TrainConfig(**train_settings(choose_recipe(photo_profile(side=48, colour=True))))
    assert (config.backbone, config.image_size, config.channels, config.invert, config.flip) == \
        ("resnet", 48, 3, False, True)
