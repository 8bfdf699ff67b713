"""`siamesedb train --backbone hf:HUB_ID_OR_DIR`: an encoder on a pretrained Hugging Face vision model.

`--epochs 0` keeps the model's own image embedding as it is (nothing is trained). Otherwise the Siamese losses
(the recipe table, `losses.LOSS_RECIPES`) train a linear head on the embedding, identity-initialised, so epoch 0 is
the pretrained embedding: on the frozen backbone (default) whose features are computed once per image and cached,
so an epoch costs only the head; with `unfreeze` N also the model's last N blocks (and what follows them: final
norm, pooler, projection) at a tenth of the learning rate, every step then running the whole model. The model stays
in eval mode (no dropout, batch-norm statistics kept); no image augmentation. Validation on the held-out classes
picks the best epoch (epoch 0 included); the time budget is fitted after timing steps, as for the other backbones.

Either way the encoder is saved self-contained (weights, image-processor settings, source, sha256) with the
held-out score and the verify threshold measured on the held-out classes, as a trained encoder's are
(`training._finish`). Not yet: `--resume`, bf16 autocast (fp32 only), Euclidean heads.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from siamesedb.batches import BATCH_KINDS
from siamesedb.encoder import Encoder, resolve_device
from siamesedb.episodes import run_episodes
from siamesedb.errors import InvalidInputError
from siamesedb.losses import LOSS_RECIPES
from siamesedb.pretrained import PretrainedNet, is_pretrained, source_of
from siamesedb.schedule import fit_schedule, time_steps
from siamesedb.training import TrainConfig, _Classes, _finish, _load_folder, _split_for_training

BACKBONE_LR_SCALE = 0.1  # unfrozen pretrained blocks learn at this fraction of the head's learning rate


def train_pretrained(folder: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
                     log: Callable[[str], None] | None = None, started: float | None = None,
                     head_dim: int | None = None, progress: bool = False) -> Encoder:
    """The encoder of `config.backbone` (hf:...) for `folder`, written to `out_dir`: `config.epochs` 0 the
    pretrained embedding as it is, else a head trained on it (and `config.unfreeze` last blocks); `head_dim`: the
    head's output size (None: the model's own embedding size, the head then starting as the identity)."""
    log = log or (lambda line: None)
    if not is_pretrained(config.backbone):
        raise InvalidInputError(f"{config.backbone!r} is not an hf: backbone")
    if config.metric != "cosine":
        raise InvalidInputError(f"{config.backbone}: pretrained backbones train cosine encoders, not {config.metric}")
    if config.init:
        raise InvalidInputError("--init does not apply to hf: backbones: the pretrained model is the start")
    if config.epochs == 0 and (config.unfreeze or head_dim):
        raise InvalidInputError("--epochs 0 trains nothing: --unfreeze and --embedding-dim need epochs or a time budget")
    run_started = started if started is not None else time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    trains = config.epochs > 0
    encoder = Encoder.from_pretrained(source_of(config.backbone), head=(head_dim or True) if trains else None,
                                      device=resolve_device(config.device))
    spec = encoder.config.pretrained
    what = ("nothing is trained (--epochs 0)" if not trains else
            "a linear head is trained on the frozen backbone's cached features" if not config.unfreeze else
            f"a linear head and the last {config.unfreeze} blocks are trained")
    log(f"backbone {config.backbone}: {spec['model_class']}, {spec['parameters']:,} parameters, its {spec['pooling']} "
        f"embedding ({spec['feature_dim']}-d) after its own image processor "
        f"({encoder.config.preprocessing.size[0]}x{encoder.config.preprocessing.size[1]} px); {what}")
    images, labels, names = _load_folder(Path(folder), config, log, encoder.config.preprocessing, batch_size=256)
    data = _split_for_training(folder, images, labels, names, config, log)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": None, "best_val": None}
    if trains:
        config = replace(config, embedding_dim=encoder.dimension)
        _fine_tune(encoder, data, config, state, log, run_started, progress)
        spec["trained"] = "head" if not config.unfreeze else f"head + last {config.unfreeze} blocks"
        encoder._fingerprint = None
    _finish(encoder, folder, out, config, data, state, False, log)
    log(f"took {(time.perf_counter() - run_started):.1f} s")
    return encoder


def block_list(model: nn.Module) -> tuple[str, int]:
    """(name, length) of the model's repeated blocks: its longest nn.ModuleList, inside the vision tower of a dual
    model (DINOv2 / ViT `encoder.layer`, CLIP `vision_model.encoder.layers`, ResNet / ConvNeXt `encoder.stages`)."""
    lists = [(name, len(module)) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    vision = [(name, n) for name, n in lists if name.startswith("vision_model.")]
    candidates = vision or lists
    if not candidates:
        raise InvalidInputError(f"{type(model).__name__}: no list of blocks found to unfreeze")
    return max(candidates, key=lambda item: item[1])


def trainable_names(model: nn.Module, unfreeze: int) -> set[str]:
    """Names of the model's parameters that `unfreeze` last blocks train: those blocks' and every parameter after
    them (final norm, pooler, projection); none for 0."""
    if unfreeze <= 0:
        return set()
    path, count = block_list(model)
    if unfreeze > count:
        raise InvalidInputError(f"--unfreeze {unfreeze}: {type(model).__name__} has {count} blocks ({path})")
    names = [name for name, _ in model.named_parameters()]
    first = f"{path}.{count - unfreeze}."
    start = next(i for i, name in enumerate(names) if name.startswith(first))
    return set(names[start:])


def _features(net: PretrainedNet, pixels: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        parts = [net.features(pixels[i : i + batch_size].to(device)).float() for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts) if parts else torch.empty((0, net.feature_dim), device=device)


def _fine_tune(encoder: Encoder, data: _Classes, config: TrainConfig, state: dict[str, Any],
               log: Callable[[str], None], run_started: float, progress: bool) -> None:
    """Train `encoder.net`'s head (and unfrozen blocks) in place; leaves the best epoch's weights in it."""
    from tqdm import tqdm

    net, device = encoder.net, encoder.device
    assert isinstance(net, PretrainedNet) and net.head is not None
    names = trainable_names(net.model, config.unfreeze)
    for name, param in net.model.named_parameters():
        param.requires_grad_(name in names)
    net.eval()  # no dropout, batch-norm statistics untouched, frozen or not
    cached = not names
    if cached:
        f_train, f_val = _features(net, data.x_train, device), _features(net, data.x_val, device)
        log(f"cached the frozen backbone's features of {len(f_train) + len(f_val)} images: an epoch trains the head only")
    recipe = LOSS_RECIPES[config.loss]
    loss_module = recipe.build(config, config.effective_margin).to(device)
    backbone_params = [p for p in net.model.parameters() if p.requires_grad]
    groups = [{"params": list(net.head.parameters()) + list(loss_module.parameters()), "scale": 1.0}]
    if backbone_params:
        groups.append({"params": backbone_params, "scale": BACKBONE_LR_SCALE})
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)

    def make_batches(epoch_seed: int) -> Callable[[], Any]:
        return BATCH_KINDS[recipe.batch](data.y_train, epoch_seed, config, data.forgeries, data.group_of_class)

    def train_step(draw: Callable[[], Any], generator: torch.Generator, lr: float) -> tuple[float, int]:
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        batch = draw()
        index = torch.from_numpy(batch.indices)
        out = net.head(f_train[index.to(device)]) if cached else net(data.x_train[index].to(device))
        loss = recipe.score(loss_module, F.normalize(out.float(), dim=1), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), len(index)

    def validate() -> float | None:
        if not data.has_val:
            return None
        if cached:
            with torch.inference_mode():
                vectors = F.normalize(net.head(f_val).float(), dim=1).cpu().numpy()
        else:
            vectors = encoder.encode_tensors(data.x_val)
        keep = ~np.isin(data.y_val, list(data.forgeries))
        labels = data.y_val[keep]
        return run_episodes(vectors[keep], labels, min(data.val_way, len(np.unique(labels))), 1, 1,
                            config.val_episodes, np.random.default_rng(config.seed), "cosine").pooled

    def trainable_state() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    clock = time.perf_counter()
    state["best_val"], state["best_epoch"], best = validate(), 0, trainable_state()
    val_seconds = time.perf_counter() - clock
    if state["best_val"] is not None:
        log(f"epoch 0 (the pretrained embedding): held-out {data.val_way}-way 1-shot {state['best_val']:.2%}")
    epochs, steps = config.epochs, config.steps_per_epoch
    deadline = None
    if config.time_budget is not None:
        step_seconds = time_steps(net, optimizer, loss_module, make_batches, train_step, config.lr)
        left = config.time_budget - (time.perf_counter() - run_started) - 3 * val_seconds - 2.0
        epochs, steps = fit_schedule(left, step_seconds, val_seconds, steps, epochs)
        deadline = run_started + config.time_budget - 3 * val_seconds - 2.0
        log(f"time budget {config.time_budget / 60:.1f} min: {step_seconds:.4f} s a step -> {epochs} epochs x {steps} steps")
    total = epochs * steps
    for epoch in range(epochs):
        epoch_seed = config.seed * 100_003 + epoch
        draw, generator = make_batches(epoch_seed), torch.Generator().manual_seed(epoch_seed)
        losses, started = [], time.perf_counter()
        for step in tqdm(range(steps), disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", unit="step"):
            if deadline is not None and losses and time.perf_counter() > deadline:
                state["stopped"] = f"time budget reached after {step} steps of epoch {epoch + 1}"
                break
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / total))
            losses.append(train_step(draw, generator, lr)[0])
        val = validate()
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val,
                                 "val_way": data.val_way, "steps": len(losses),
                                 "seconds": round(time.perf_counter() - started, 2)})
        state["epoch"] = epoch + 1
        if val is None or state["best_val"] is None or val > state["best_val"]:
            state["best_val"], state["best_epoch"], best = val, epoch + 1, trainable_state()
        log(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}" + (f", held-out {val:.2%}" if val is not None else ""))
        if state.get("stopped") or (config.patience and data.has_val
                                    and epoch + 1 - state["best_epoch"] >= config.patience):
            state.setdefault("stopped", f"early stop: no better validation for {config.patience} epochs")
            break
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name in best:
                param.copy_(best[name])
    for param in net.parameters():
        param.requires_grad_(True)
    if state["best_epoch"] != state["epoch"]:
        log(f"kept the best epoch, {state['best_epoch']} of {state['epoch']}"
            + (" (the pretrained embedding)" if state["best_epoch"] == 0 else ""))
