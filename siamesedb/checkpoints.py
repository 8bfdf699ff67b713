"""Training checkpoints without pickle: the encoder, the loss head and Adam's moments as safetensors, the run's
state (epoch, history, best score, schedule) as JSON; each file replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from siamesedb.encoder import Encoder


def save_checkpoint(folder: Path, encoder: Encoder, optimizer: torch.optim.Optimizer, loss_module: torch.nn.Module,
                    state: dict[str, Any]) -> None:
    """Weights, loss head and Adam moments as safetensors, the rest as JSON: no pickle anywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save(folder)
    tensors = {f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss_module.state_dict().items()}
    for i, param_state in enumerate(optimizer.state_dict()["state"].values()):
        for key, value in param_state.items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous().reshape(-1) if key == "step" else value.detach().cpu().contiguous()
    save_file(tensors, str(folder / "trainer.safetensors.tmp"))
    os.replace(folder / "trainer.safetensors.tmp", folder / "trainer.safetensors")
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=2))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def restore_checkpoint(folder: Path, encoder: Encoder, optimizer: torch.optim.Optimizer,
                       loss_module: torch.nn.Module) -> dict[str, Any]:
    """Load a `save_checkpoint` folder into `encoder`, `optimizer` and `loss_module`; returns the run's state."""
    saved = Encoder.load(folder, device=encoder.device)
    encoder.net.load_state_dict(saved.net.state_dict())
    tensors = load_file(str(folder / "trainer.safetensors"))
    loss_state = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
    if loss_state:
        loss_module.load_state_dict(loss_state)
    opt_state = optimizer.state_dict()
    for i, pid in enumerate(opt_state["param_groups"][0]["params"]):
        entry = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            name = f"adam.{i}.{key}"
            if name in tensors:
                entry[key] = tensors[name].reshape(()) if key == "step" else tensors[name].to(encoder.device)
        if entry:
            opt_state["state"][pid] = entry
    optimizer.load_state_dict(opt_state)
    return json.loads((folder / "state.json").read_text())
