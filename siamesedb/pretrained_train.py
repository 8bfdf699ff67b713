"""`siamesedb train --backbone hf:HUB_ID_OR_DIR`: an encoder on a pretrained Hugging Face vision model.

`--epochs 0` keeps the model's own image embedding as it is (nothing is trained). Otherwise the Siamese losses
(the recipe table, `losses.LOSS_RECIPES`) train a linear head on the embedding, identity-initialised, so epoch 0 is
the pretrained embedding: on the frozen backbone (default) whose features are computed once per image and cached,
so an epoch costs only the head; with `unfreeze` N also the model's last N blocks (and what follows them: final
norm, pooler, projection) at a tenth of the learning rate, every step then running the whole model. The model stays
in eval mode (no dropout, batch-norm statistics kept). Validation on the held-out classes picks the best epoch
(epoch 0 included); the time budget is fitted after timing steps, as for the other backbones.

- Precision (`config.precision`, `training.use_bf16`; auto: bf16 on CPUs with native bf16, measured faster there by
  tools/bench_pretrained_train.py): the feature cache and every `unfreeze` step run under bfloat16 autocast, the
  losses in float32; the head on cached features stays float32 (milliseconds a step; bf16 not measured faster);
  validation and the saved encoder compute in float32 (`notes["precision"]` records the training's).
- Memory: the folder is decoded once, batch by batch. Frozen: only each image's features (D floats) are kept;
  unfrozen: only the paths, each step decoding its batch again. Either way the held-out classes' pixels are kept
  (the final score and thresholds run the saved encoder on them).
- Augmentation (flip, colour jitter, affine) applies with `unfreeze` only, on each step's freshly decoded pixels;
  the frozen path trains on one cached view per image (several augmented views would cost a feature pass each).
- `config.metric` "euclidean": the head's raw output, the losses on distances, the encoder searched by L2.
- `config.init`: start from a saved hf: encoder built on the same pretrained weights (its head, any tuned blocks);
  `resume`: continue from `out/checkpoint` (the trainable weights, Adam's moments, the run's state; no pickle).

The encoder is saved self-contained (weights, image-processor settings, source, sha256) with the held-out score and
the verify threshold measured on the held-out classes, as a trained encoder's are (`training._finish`).
"""

from __future__ import annotations

import contextlib
import json
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

from siamesedb.augmentation import augment, photometric
from siamesedb.batches import BATCH_KINDS
from siamesedb.data import iter_batches, load_batch, scan_folder, select_groups
from siamesedb.encoder import Encoder, resolve_device
from siamesedb.episodes import run_episodes
from siamesedb.errors import InvalidInputError
from siamesedb.losses import LOSS_RECIPES
from siamesedb.pretrained import PretrainedNet, is_pretrained, source_of
from siamesedb.schedule import fit_schedule, time_steps
from siamesedb.training import CHECKPOINT_DIR, TrainConfig, _Classes, _finish, _split_for_training, use_bf16

BACKBONE_LR_SCALE = 0.1  # unfrozen pretrained blocks learn at this fraction of the head's learning rate
FEATURE_BATCH = 32  # images per forward pass of the feature cache (and of the folder's decoding)


def train_pretrained(folder: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
                     log: Callable[[str], None] | None = None, started: float | None = None,
                     head_dim: int | None = None, progress: bool = False, resume: bool = False) -> Encoder:
    """The encoder of `config.backbone` (hf:...) for `folder`, written to `out_dir`: `config.epochs` 0 the
    pretrained embedding as it is, else a head trained on it (and `config.unfreeze` last blocks); `head_dim`: the
    head's output size (None: the model's own embedding size, the head then starting as the identity); `resume`:
    continue from the checkpoint in `out_dir` when there is one."""
    log = log or (lambda line: None)
    if not is_pretrained(config.backbone):
        raise InvalidInputError(f"{config.backbone!r} is not an hf: backbone")
    trains = config.epochs > 0
    if not trains and (config.unfreeze or head_dim or config.init or resume or config.metric != "cosine"):
        raise InvalidInputError("--epochs 0 trains nothing: --unfreeze, --embedding-dim, --init, --resume and "
                                "--metric euclidean need epochs or a time budget")
    if config.rotate_classes or config.mirror_classes:
        raise InvalidInputError("--rotate-classes / --mirror-classes are not available for hf: backbones")
    run_started = started if started is not None else time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    encoder = Encoder.from_pretrained(source_of(config.backbone), head=(head_dim or True) if trains else None,
                                      device=device)
    encoder.config.metric = config.metric
    spec = encoder.config.pretrained
    if config.init:
        spec["init"] = load_init(encoder, config.init)
        log(f"starting from the head{' and tuned blocks' if spec['init']['unfreeze'] else ''} of {config.init}")
    bf16 = trains and use_bf16(config.precision, device, config.backbone)
    what = ("nothing is trained (--epochs 0)" if not trains else
            "a linear head is trained on the frozen backbone's cached features (no image augmentation)"
            if not config.unfreeze else
            f"a linear head and the last {config.unfreeze} blocks are trained ({_augmentation_text(config)})")
    log(f"backbone {config.backbone}: {spec['model_class']}, {spec['parameters']:,} parameters, its {spec['pooling']} "
        f"embedding ({spec['feature_dim']}-d) after its own image processor "
        f"({encoder.config.preprocessing.size[0]}x{encoder.config.preprocessing.size[1]} px); {what}"
        + ("; bfloat16 autocast for the backbone (--precision fp32 turns it off)" if bf16 else ""))
    data, pool = _load(folder, config, encoder, log, bf16, features=trains and not config.unfreeze)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": None, "best_val": None}
    if trains:
        config = replace(config, embedding_dim=encoder.dimension)
        _fine_tune(encoder, data, pool, config, state, log, run_started, progress, bf16, out / CHECKPOINT_DIR, resume)
        spec["trained"] = "head" if not config.unfreeze else f"head + last {config.unfreeze} blocks"
        encoder._fingerprint = None
    _finish(encoder, folder, out, config, _for_finish(data, pool), state, bf16, log)
    log(f"took {(time.perf_counter() - run_started):.1f} s")
    return encoder


def _augmentation_text(config: TrainConfig) -> str:
    parts = [name for name, on in (("flips", config.flip), (f"colour jitter {config.color_jitter:g}", config.color_jitter),
                                   (f"affine strength {config.augment_strength:g}", config.augment and config.augment_strength))
             if on]
    return "augmentation: " + ", ".join(parts) if parts else "no image augmentation"


def load_init(encoder: Encoder, source: str) -> dict[str, Any]:
    """Copy a saved hf: encoder's weights (head, and any blocks it tuned) into `encoder`: it must sit on the same
    pretrained weights (sha256), with the same head size and metric. Returns what `spec["init"]` records."""
    start = Encoder.load(source, device=encoder.device)
    theirs, ours = start.config.pretrained, encoder.config.pretrained
    if not is_pretrained(start.config.backbone) or not theirs:
        raise InvalidInputError(f"--init {source}: a {start.config.backbone} encoder cannot seed an hf: run")
    if theirs.get("sha256") != ours["sha256"] or theirs.get("model_class") != ours["model_class"]:
        raise InvalidInputError(f"--init {source}: built on other pretrained weights ({theirs.get('model_class')} "
                                f"sha256 {str(theirs.get('sha256'))[:12]}) than {encoder.config.backbone} "
                                f"({ours['model_class']} sha256 {ours['sha256'][:12]})")
    if theirs.get("head_dim") != ours["head_dim"] or start.config.metric != encoder.config.metric:
        raise InvalidInputError(f"--init {source}: its head ({theirs.get('head_dim') or 'none: --epochs 0'}, "
                                f"{start.config.metric}) differs from this run's ({ours['head_dim']}, "
                                f"{encoder.config.metric})")
    encoder.net.load_state_dict(start.net.state_dict())
    tuned = str(theirs.get("trained", ""))
    return {"from": str(source), "fingerprint": start.fingerprint,
            "unfreeze": int(tuned.split("last ")[1].split()[0]) if "last " in tuned else 0}


# ------------------------------------------------------------------------------------------------ data


class _Pool:
    """What a step reads for training item i: cached features (frozen) or the decoded pixels of its path."""

    def __init__(self, features: torch.Tensor | None, val_features: torch.Tensor | None, paths: list[Path],
                 preprocessing: Any):
        self.features, self.val_features = features, val_features  # (N_train, D), (N_val, D) or None
        self.paths, self.preprocessing = paths, preprocessing

    def pixels(self, index: np.ndarray) -> torch.Tensor:
        """(n, 3, H, W) pixel values of training items `index`, decoded from their files now."""
        return load_batch([self.paths[i] for i in index], self.preprocessing)[0]


def _load(folder: str | os.PathLike, config: TrainConfig, encoder: Encoder, log: Callable[[str], None], bf16: bool,
          features: bool) -> tuple[_Classes, _Pool]:
    """Decode the folder once, batch by batch (`FEATURE_BATCH` images' pixels in memory at a time): the readable
    images, and with `features` each one's backbone features. The split is `training._split_for_training`'s, on
    positions; the held-out images are decoded again and kept as pixels (`_Classes.x_val`); `x_train` holds the
    training items' positions into the pool."""
    images = select_groups(scan_folder(Path(folder)), config.groups)
    prep = encoder.config.preprocessing
    kept: list[int] = []
    parts: list[torch.Tensor] = []
    skipped = 0
    for positions, tensor, bad in iter_batches(images, prep, batch_size=FEATURE_BATCH, workers=config.workers):
        kept.extend(positions)
        skipped += len(bad)
        if features and len(positions):
            parts.append(_features(encoder.net, tensor, encoder.device, bf16).cpu())
    if skipped:
        log(f"skipped {skipped} unreadable files")
    readable = [images[i] for i in kept]
    names, labels = np.unique(np.asarray([im.label for im in readable], dtype=object).astype(str), return_inverse=True)
    data = _split_for_training(folder, torch.arange(len(readable)), labels.astype(np.int64), [str(n) for n in names],
                               config, log)
    val_positions, train_positions = data.x_val.numpy(), data.x_train.numpy()
    x_val = load_batch([readable[i].path for i in val_positions], prep)[0] if len(val_positions) else \
        torch.empty((0, 3, *prep.size))
    cached = cached_val = None
    if features:
        every = torch.cat(parts) if parts else torch.empty((0, encoder.net.feature_dim))
        cached = every[torch.from_numpy(train_positions)].to(encoder.device)
        cached_val = every[torch.from_numpy(val_positions)].to(encoder.device)
        log(f"cached the frozen backbone's features of {len(every)} images: an epoch trains the head only")
    data = replace(data, x_train=torch.from_numpy(train_positions), x_val=x_val)
    return data, _Pool(cached, cached_val, [readable[i].path for i in train_positions], prep)


def _for_finish(data: _Classes, pool: _Pool) -> _Classes:
    """The split as `training._finish` reads it: the held-out pixels, and the training ones only where it needs them
    (no held-out images of two classes: the verify threshold then comes from training pairs), decoded now."""
    if len(np.unique(data.y_val)) >= 2:
        return replace(data, x_train=torch.empty((0, *data.x_val.shape[1:])), originals=0)
    return replace(data, x_train=pool.pixels(np.arange(len(pool.paths))), originals=len(pool.paths))


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _features(net: PretrainedNet, pixels: torch.Tensor, device: torch.device, bf16: bool = False,
              batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(N, 3, H, W) -> (N, feature_dim) float32: the backbone's embedding (bfloat16 autocast if `bf16`)."""
    with torch.inference_mode(), _autocast(device, bf16):
        parts = [net.features(pixels[i : i + batch_size].to(device)).float() for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts) if parts else torch.empty((0, net.feature_dim), device=device)


def augment_pixels(pixels: torch.Tensor, generator: torch.Generator, config: TrainConfig,
                   processor: dict[str, Any]) -> torch.Tensor:
    """A training batch of processor pixel values (N, 3, H, W) augmented as `config` says: flips, colour jitter
    (applied in [0, 1] pixel space: the processor's mean/std undone, then redone), affine (edges replicated)."""
    if config.color_jitter:
        mean, std = _normalisation(processor, pixels)
        pixels = photometric(pixels * std + mean, generator, config.flip, config.color_jitter)
        pixels = (pixels - mean) / std
    elif config.flip:
        pixels = photometric(pixels, generator, True, 0.0)
    if config.augment and config.augment_strength:
        pixels = augment(pixels, generator, strength=config.augment_strength, background_zero=False)
    return pixels


def _normalisation(processor: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1): pixel values = ([0, 1] pixels - mean) / std under this processor."""
    mean, std = [0.0] * 3, [1.0] * 3
    if processor.get("do_normalize", True) and processor.get("image_mean") is not None:
        mean, std = processor["image_mean"], processor["image_std"]
    mean = [mean] * 3 if np.ndim(mean) == 0 else list(mean)
    std = [std] * 3 if np.ndim(std) == 0 else list(std)
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1))


# ------------------------------------------------------------------------------------------------ blocks


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


# ------------------------------------------------------------------------------------------------ checkpoints

_STATE, _TENSORS = "state.json", "trainer.safetensors"


def save_checkpoint(folder: Path, net: PretrainedNet, best: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    loss_module: nn.Module, state: dict[str, Any], key: dict[str, Any]) -> None:
    """The trainable weights (now and best), Adam's moments, the loss head as safetensors, the run's state and
    `key` (what a resume must match) as JSON; each file replaced atomically. The frozen backbone is not written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"now.{n}": p.detach().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}
    tensors.update({f"best.{n}": t.detach().cpu().contiguous() for n, t in best.items()})
    tensors.update({f"loss.{n}": t.detach().cpu().contiguous() for n, t in loss_module.state_dict().items()})
    for pid, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            tensors[f"adam.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous() \
                if name == "step" else value.detach().cpu().contiguous()
    save_file(tensors, str(folder / (_TENSORS + ".tmp")))
    os.replace(folder / (_TENSORS + ".tmp"), folder / _TENSORS)
    (folder / (_STATE + ".tmp")).write_text(json.dumps({**state, "pretrained": key}, indent=2))
    os.replace(folder / (_STATE + ".tmp"), folder / _STATE)


def restore_checkpoint(folder: Path, net: PretrainedNet, optimizer: torch.optim.Optimizer, loss_module: nn.Module,
                       key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a `save_checkpoint` folder into the net's trainable weights, the optimiser and the loss head: (the run's
    state, the best weights). A checkpoint of another run (other backbone, weights, head, blocks) is refused."""
    from safetensors.torch import load_file

    state = json.loads((folder / _STATE).read_text())
    saved = state.pop("pretrained", None)
    if saved != key:
        theirs = "a run of a non-hf: backbone" if saved is None else json.dumps(saved, sort_keys=True)
        raise InvalidInputError(f"--resume: {folder} holds {theirs}, not this run ({json.dumps(key, sort_keys=True)})")
    tensors = load_file(str(folder / _TENSORS))
    device = next(net.parameters()).device
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.requires_grad:
                param.copy_(tensors[f"now.{name}"])
    loss_state = {n[5:]: t for n, t in tensors.items() if n.startswith("loss.")}
    if loss_state:
        loss_module.load_state_dict(loss_state)
    opt = optimizer.state_dict()
    for pid in [p for group in opt["param_groups"] for p in group["params"]]:
        entry = {name: tensors[f"adam.{pid}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq")
                 if f"adam.{pid}.{name}" in tensors}
        if entry:
            opt["state"][pid] = {n: (t.reshape(()) if n == "step" else t.to(device)) for n, t in entry.items()}
    optimizer.load_state_dict(opt)
    best = {n[5:]: t.to(device) for n, t in tensors.items() if n.startswith("best.")}
    return state, best


# ------------------------------------------------------------------------------------------------ the loop


def _fine_tune(encoder: Encoder, data: _Classes, pool: _Pool, config: TrainConfig, state: dict[str, Any],
               log: Callable[[str], None], run_started: float, progress: bool, bf16: bool, checkpoint: Path,
               resume: bool) -> None:
    """Train `encoder.net`'s head (and unfrozen blocks) in place; leaves the best epoch's weights in it."""
    from tqdm import tqdm

    net, device = encoder.net, encoder.device
    assert isinstance(net, PretrainedNet) and net.head is not None
    names = trainable_names(net.model, config.unfreeze)
    for name, param in net.model.named_parameters():
        param.requires_grad_(name in names)
    net.eval()  # no dropout, batch-norm statistics untouched, frozen or not
    cached = pool.features is not None
    cosine = config.metric == "cosine"
    processor = encoder.config.preprocessing.processor or {}
    recipe = LOSS_RECIPES[config.loss]
    loss_module = recipe.build(config, config.effective_margin).to(device)
    backbone_params = [p for p in net.model.parameters() if p.requires_grad]
    groups = [{"params": list(net.head.parameters()) + list(loss_module.parameters()), "scale": 1.0}]
    if backbone_params:
        groups.append({"params": backbone_params, "scale": BACKBONE_LR_SCALE})
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    key = {"backbone_sha256": encoder.config.pretrained["sha256"], "head_dim": net.dimension,
           "unfreeze": config.unfreeze, "metric": config.metric, "loss": config.loss,
           "init": (encoder.config.pretrained.get("init") or {}).get("fingerprint")}

    def make_batches(epoch_seed: int) -> Callable[[], Any]:
        return BATCH_KINDS[recipe.batch](data.y_train, epoch_seed, config, data.forgeries, data.group_of_class)

    def train_step(draw: Callable[[], Any], generator: torch.Generator, lr: float) -> tuple[float, int]:
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        batch = draw()
        if cached:  # the head on cached features in float32: milliseconds a step, bf16 not measured faster
            out = net.head(pool.features[torch.from_numpy(batch.indices).to(device)])
        else:
            pixels = augment_pixels(pool.pixels(batch.indices).to(device), generator, config, processor)
            with _autocast(device, bf16):
                out = net(pixels)
        out = out.float()
        loss = recipe.score(loss_module, F.normalize(out, dim=1) if cosine else out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), len(batch.indices)

    def validate() -> float | None:
        if not data.has_val or data.val_way < 2:
            return None
        if cached:
            with torch.inference_mode():
                out = net.head(pool.val_features).float()
                vectors = (F.normalize(out, dim=1) if cosine else out).cpu().numpy()
        else:
            vectors = encoder.encode_tensors(data.x_val)
        keep = ~np.isin(data.y_val, list(data.forgeries))
        labels = data.y_val[keep]
        return run_episodes(vectors[keep], labels, min(data.val_way, len(np.unique(labels))), 1, 1,
                            config.val_episodes, np.random.default_rng(config.seed), config.metric).pooled

    def trainable_state() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    clock = time.perf_counter()
    if resume and (checkpoint / _STATE).exists():
        saved, best = restore_checkpoint(checkpoint, net, optimizer, loss_module, key)
        state.update(saved)
        log(f"resumed from epoch {state['epoch']} of {checkpoint}")
        validate()  # timed, for the budget's reserve
    else:
        state["best_val"], state["best_epoch"], best = validate(), 0, trainable_state()
        if state["best_val"] is not None:
            log(f"epoch 0 ({'the --init encoder' if config.init else 'the pretrained embedding'}): held-out "
                f"{data.val_way}-way 1-shot {state['best_val']:.2%}")
    val_seconds = time.perf_counter() - clock
    epochs, steps = config.epochs, config.steps_per_epoch
    deadline = None
    if config.time_budget is not None:
        if "schedule" in state:
            epochs, steps = state["schedule"]
        else:
            step_seconds = time_steps(net, optimizer, loss_module, make_batches, train_step, config.lr)
            net.eval()  # time_steps leaves the net in train mode: batch-norm statistics would move
            left = config.time_budget - (time.perf_counter() - run_started) - 3 * val_seconds - 2.0
            epochs, steps = fit_schedule(left, step_seconds, val_seconds, steps, epochs)
            log(f"time budget {config.time_budget / 60:.1f} min: {step_seconds:.4f} s a step -> {epochs} epochs x "
                f"{steps} steps")
            state["schedule"] = [epochs, steps]
        deadline = run_started + config.time_budget - 3 * val_seconds - 2.0
    total = epochs * steps
    for epoch in range(state["epoch"], epochs):
        if state.get("stopped"):
            break
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
        if not state.get("stopped") and config.patience and data.has_val \
                and epoch + 1 - state["best_epoch"] >= config.patience:
            state["stopped"] = f"early stop: no better validation for {config.patience} epochs"
        save_checkpoint(checkpoint, net, best, optimizer, loss_module, state, key)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name in best:
                param.copy_(best[name])
    for param in net.parameters():
        param.requires_grad_(True)
    if state["best_epoch"] != state["epoch"]:
        log(f"kept the best epoch, {state['best_epoch']} of {state['epoch']}"
            + (" (the pretrained embedding)" if state["best_epoch"] == 0 and not config.init else ""))
