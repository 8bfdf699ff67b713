"""The `siamesedb train`, `eval` and `datasets` commands: training encoders, measuring them on held-apart data, and
unpacking the public datasets (registered on the `siamesedb` group in cli.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from siamesedb.cli_common import (CONTEXT_SETTINGS, SiameseGroup, device_option, emit_json, encoder_option,
                                  json_option, quiet_option)
from siamesedb.rules import DEFAULT_RULE, VERIFY_RULES
from siamesedb.scoring import METRICS


@click.command(context_settings=CONTEXT_SETTINGS)
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
              help="Backbone: a name in siamesedb/backbones.py's registry, e.g. conv4, conv4map, resnet, signet, mlp "
                   "(default: the recipe's); an unknown name lists them all. hf:HUB_ID_OR_DIR: a pretrained Hugging "
                   "Face vision model (pip install siamesedb[pretrained]); with --epochs 0 its own embedding, untrained.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Input channels: 1 grey, 3 colour (default: 3 when the sampled images carry colour).")
@click.option("--invert/--no-invert", default=None,
              help="Invert grey levels, so dark ink on light paper becomes bright on zero (default: the recipe's).")
@click.option("--embedding-dim", type=int, default=None, help="Vector dimension.")
@click.option("--width", type=int, default=None, help="Backbone channel width.")
@click.option("--metric", type=click.Choice(METRICS), default=None,
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
@click.option("--hold-out-groups/--no-hold-out-groups", default=None,
              help="Validation holds out whole groups (alphabets) and scores within each (default: on for folders "
                   "of 40+ classes in 3+ groups of several classes).")
@click.option("--seed", type=int, default=None, help="Random seed (runs are deterministic on CPU).")
@click.option("--init", "init", default=None, metavar="NAME_OR_DIR",
              help="Start from this encoder's weights (same backbone and input size): fine-tune it.")
@click.option("--unfreeze", type=click.IntRange(0), default=None, metavar="N",
              help="hf: backbones: also fine-tune the model's last N blocks (default 0: only a linear head, trained "
                   "on the frozen model's features, computed once per image).")
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
          within_group: float | None, val_fraction: float | None, hold_out_groups: bool | None, seed: int | None,
          init: str | None,
          unfreeze: int | None, resume: bool, device: str, quiet: bool, metric: str | None = None, hidden: str | None = None,
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
      siamesedb train ~/photos --out runs/dino --backbone hf:facebook/dinov2-small --epochs 0
      siamesedb train ~/photos --out runs/dino-ft --backbone hf:facebook/dinov2-small --time-budget 20m --unfreeze 2
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
        "unfreeze": unfreeze, "hold_out_groups": hold_out_groups,
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
    pretrained = bool(backbone) and backbone.startswith("hf:")
    for key, line in zip(recipe.reasons, recipe.lines()):
        if not (pretrained and (key in _PRETRAINED_OWN or (key in _PRETRAINED_AUGMENT and not unfreeze))):
            say(line)
    if pretrained:
        say("  input, preprocessing and embedding = the model's own  (its image processor"
            + ("; augmentation on each step's pixels)" if unfreeze else "; no image augmentation: features cached once)"))
    settings = train_settings(recipe)
    if (epochs is not None or steps_per_epoch is not None) and time_budget is None:
        settings.pop("patience")  # a fixed schedule runs to its end, as before, unless --patience is given
        say("schedule fixed by --epochs / --steps-per-epoch: no time budget")
        if settings.get("members", 1) > 1:  # the hand recipe: one member per run, joined by tools/ensemble.py
            settings["members"] = 1
            say("  members = 1  (a fixed schedule trains one member; join seeds with tools/ensemble.py)")
    else:
        settings["time_budget"] = parse_duration(time_budget) if time_budget else DEFAULT_TIME_BUDGET
        settings["epochs"] = recipe.max_epochs
        settings["steps_per_epoch"] = 100
    settings.update(given)
    if val_fraction is not None:
        settings["validation"] = "classes"  # the flag asks for held-out classes, however few (a warning says so)
    settings["recipe"] = {"domain": recipe.domain, "reasons": recipe.reasons, "profile": profile.to_dict()}
    config = TrainConfig(**settings)
    if config.backbone.startswith("hf:"):  # a pretrained Hugging Face model (siamesedb.pretrained_train)
        from siamesedb.pretrained_train import train_pretrained

        encoder = train_pretrained(folder, out_dir, config, log=say, started=started, head_dim=embedding_dim,
                                   progress=not quiet, resume=resume)
    elif config.members > 1 and not resume:  # several short members in the budget (siamesedb.members)
        from siamesedb.members import train_members

        encoder = train_members(folder, out_dir, config, progress=not quiet, log=say, started=started)
    else:
        encoder = run_training(folder, out_dir, config, progress=not quiet, resume=resume, log=say, started=started)
    click.echo(f"saved encoder {encoder.fingerprint} ({encoder.config.backbone}, {encoder.dimension}-d) to {out_dir}")


# Recipe choices an hf: backbone makes itself (its image processor, its embedding), and the augmentation it uses only
# with --unfreeze (the frozen path caches each image's features once).
_PRETRAINED_OWN = frozenset({"image_size", "image_width", "keep_aspect", "width", "embedding_dim", "channels", "invert"})
_PRETRAINED_AUGMENT = frozenset({"augment", "augment_strength", "flip", "color_jitter"})


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
    dim = None
    if backbone is not None and embedding_dim is None:  # a backbone with a dimension of its own (the MLP twin: 16)
        from siamesedb.backbones import get_backbone

        dim = get_backbone(backbone).embedding_dim
    return {"metric": metric, "hidden": sizes, "dropout": dropout, **({"embedding_dim": dim} if dim else {})}


@click.group(cls=SiameseGroup, context_settings=CONTEXT_SETTINGS, name="eval")
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
@click.option("--rule", type=click.Choice(VERIFY_RULES), default=DEFAULT_RULE, show_default=True,
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
    for path in result.plots.values():
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


@click.group(cls=SiameseGroup, context_settings=CONTEXT_SETTINGS, name="datasets")
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
