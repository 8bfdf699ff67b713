"""Pretrained Hugging Face vision models as backbones (`hf:HUB_ID_OR_DIR`): load one with its own image processor,
wrap it as a net mapping the processor's pixel values to the model's image embedding, rebuild that net offline from
the description an encoder's config.json keeps.

transformers is imported only here and only when an hf: backbone is used (`pip install siamesedb[pretrained]`).

The embedding of an image (`PretrainedNet.features`), by what the model offers, in this order:
- `image_features`: a dual image-text model (CLIPModel, SiglipModel): `get_image_features`, the projected embedding;
- `image_embeds`: a vision tower with a projection (CLIPVisionModelWithProjection): its `image_embeds`;
- `pooler_output`: the model's pooled output (DINOv2: the layer-normed CLS token; ViT: its pooler; ResNet / ConvNeXt:
  the globally pooled feature map, flattened);
- `cls`: a transformer without a pooler: the first token of `last_hidden_state`;
- `mean`: a conv net without a pooler: the mean of `last_hidden_state` over its spatial positions.
The encoder L2-normalises it. A fine-tuned encoder adds a linear `head` after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from siamesedb.errors import EncoderError

PREFIX = "hf:"
EXTRA = "pip install siamesedb[pretrained]"
POOLINGS = ("image_features", "image_embeds", "pooler_output", "cls", "mean")


def is_pretrained(backbone: str) -> bool:
    """Whether a backbone name names a Hugging Face model (`hf:HUB_ID_OR_DIR`)."""
    return isinstance(backbone, str) and backbone.startswith(PREFIX)


def source_of(backbone: str) -> str:
    """`hf:facebook/dinov2-small` -> `facebook/dinov2-small`; an empty source is an EncoderError."""
    source = backbone[len(PREFIX):] if is_pretrained(backbone) else backbone
    if not source.strip():
        raise EncoderError("hf: needs a Hugging Face hub id or a folder saved with save_pretrained, e.g. "
                           "hf:facebook/dinov2-small")
    return source


def transformers_module() -> Any:
    """The transformers package, or an EncoderError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise EncoderError(f"hf: backbones need Hugging Face transformers, which is not installed: {EXTRA}") from None
    transformers.logging.set_verbosity_error()  # e.g. the PIL-backend fallback notice, once per processor
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every load
    try:  # an unreachable hub: its retry notices would precede the one-line error
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    return transformers


class PretrainedNet(nn.Module):
    """A Hugging Face vision model as a backbone: (N, 3, H, W) pixel values -> (N, D) embedding (see the module
    docstring for which one), then the optional linear `head` (fine-tuning)."""

    def __init__(self, model: nn.Module, pooling: str, feature_dim: int, head_dim: int | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise EncoderError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        self.model = model
        self.pooling = pooling
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(feature_dim, head_dim) if head_dim else None
        if self.head is not None and head_dim == feature_dim:  # identity start: epoch 0 is the pretrained embedding
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(feature_dim))
                self.head.bias.zero_()

    @property
    def dimension(self) -> int:
        return self.head.out_features if self.head is not None else self.feature_dim

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, feature_dim): the backbone's embedding, before any head."""
        return _pool(self.model, self.pooling, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.features(pixel_values)
        return self.head(out) if self.head is not None else out


def _pool(model: nn.Module, pooling: str, pixel_values: torch.Tensor) -> torch.Tensor:
    if pooling == "image_features":
        out = model.get_image_features(pixel_values=pixel_values)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object
    else:
        outputs = model(pixel_values=pixel_values, return_dict=True)
        if pooling == "image_embeds":
            out = outputs.image_embeds
        elif pooling == "pooler_output":
            out = outputs.pooler_output
        else:
            hidden = outputs.last_hidden_state
            if pooling == "cls":
                out = hidden[:, 0]
            else:  # mean: (N, C, H, W) feature map or (N, T, C) tokens
                out = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)
    return out.flatten(1)


def _choose_pooling(model: nn.Module, pixel_values: torch.Tensor) -> str:
    """Which embedding the model offers (the module docstring's order), found with one forward pass."""
    if callable(getattr(model, "get_image_features", None)):
        return "image_features"
    with torch.inference_mode():
        outputs = model(pixel_values=pixel_values, return_dict=True)
    if getattr(outputs, "image_embeds", None) is not None:
        return "image_embeds"
    if getattr(outputs, "pooler_output", None) is not None:
        return "pooler_output"
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        raise EncoderError(f"{type(model).__name__} gives no image embedding (no pooler_output, image_embeds or "
                           "last_hidden_state)")
    return "mean" if hidden.dim() == 4 else "cls"


def weights_sha256(module: nn.Module) -> str:
    """sha256 (hex) of a module's state: every tensor's name, shape and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parameter_count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ------------------------------------------------------------------------------------------------ image processor

_PROCESSORS: dict[str, Any] = {}
_PROCESSORS_LOCK = threading.Lock()


def _processor_class(transformers: Any, name: str) -> Any:
    """The PIL-backend class of an image processor type: the same pixels on every machine, torchvision or not."""
    base = name.removesuffix("Fast").removesuffix("Pil")
    for candidate in (base + "Pil", base, name):
        cls = getattr(transformers, candidate, None)
        if cls is not None:
            return cls
    raise EncoderError(f"unknown image processor type {name!r} (this transformers has no such class)")


def processor_from_dict(spec: dict[str, Any]) -> Any:
    """The image processor an encoder's config describes (`image_processor_type` + its settings), cached."""
    key = json.dumps(spec, sort_keys=True)
    with _PROCESSORS_LOCK:
        if key not in _PROCESSORS:
            transformers = transformers_module()
            cls = _processor_class(transformers, str(spec.get("image_processor_type", "")))
            _PROCESSORS[key] = cls.from_dict(dict(spec))
        return _PROCESSORS[key]


def process(spec: dict[str, Any], image: Any) -> np.ndarray:
    """A PIL image -> (3, H, W) float32 pixel values by the model's own processor; grey and palette images become
    RGB first."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = processor_from_dict(spec)(images=[image], return_tensors="np")["pixel_values"][0]
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _processor_dict(processor: Any) -> dict[str, Any]:
    spec = json.loads(processor.to_json_string())
    spec.setdefault("image_processor_type", type(processor).__name__)
    return spec


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Loaded:
    """A model fresh from its source: the net, the processor's settings, the input size, the description to keep."""

    net: PretrainedNet
    processor: dict[str, Any]
    size: tuple[int, int]  # (H, W) of the processor's output
    spec: dict[str, Any]  # EncoderConfig.pretrained: source, model class and config, pooling, sha256, parameters


def _model_class(transformers: Any, config: Any) -> Any:
    """A vision tower with a projection keeps it (CLIPVisionModelWithProjection); otherwise AutoModel's base model
    (a ...ForImageClassification checkpoint loads without its classifier)."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and arch.endswith("WithProjection"):
            return cls
    return transformers.AutoModel


def _is_vision(model: nn.Module) -> bool:
    return callable(getattr(model, "get_image_features", None)) or getattr(model, "main_input_name", "") == "pixel_values"


def _offline_reason(source: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hub = ("the Hugging Face hub is not reachable (HF_HUB_OFFLINE is set)" if offline else
           "the Hugging Face hub is not reachable or has no such model")
    return f"hf:{source}: no such folder; {hub}, and the model is not in the local cache"


def load_source(source: str, head: int | bool | None = None) -> Loaded:
    """Load `source` (a hub id, downloaded into the Hugging Face cache on first use, or a folder saved with
    save_pretrained holding a model and its image processor); `head` as `Encoder.from_pretrained`'s. Every
    failure is a one-line EncoderError."""
    transformers = transformers_module()
    folder = Path(source).expanduser()
    local = folder.is_dir()
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):  # a path, not an org/name id
        raise EncoderError(f"hf:{source}: no such folder")
    if local and not (folder / "config.json").is_file():
        raise EncoderError(f"hf:{source}: the folder holds no model (no config.json; write one with save_pretrained)")
    where = str(folder.resolve()) if local else source
    try:
        config = transformers.AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        if local:
            raise EncoderError(f"hf:{source}: unreadable model config ({str(exc).splitlines()[0]})") from None
        raise EncoderError(_offline_reason(source)) from None
    try:
        model = _model_class(transformers, config).from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EncoderError(f"hf:{source}: the model does not load ({text})") from None
    if not _is_vision(model):
        raise EncoderError(f"hf:{source}: {type(model).__name__} is not a vision model (its input is "
                           f"{getattr(model, 'main_input_name', '?')}, not pixel values); give an image model such "
                           "as DINOv2, CLIP, ViT or ResNet")
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderError(f"hf:{source}: no image processor found beside the model ({type(exc).__name__}); save "
                           "one with its save_pretrained") from None
    model = model.float().eval()
    spec_processor = _processor_dict(processor)
    probe = process(spec_processor, _grey_probe())
    size = (int(probe.shape[1]), int(probe.shape[2]))
    batch = torch.from_numpy(probe)[None]
    model = _vision_tower(transformers, model, batch)
    pooling = _choose_pooling(model, batch)
    with torch.inference_mode():
        feature_dim = int(_pool(model, pooling, batch).shape[1])
    head_dim = feature_dim if head is True else (int(head) if head else None)
    if head_dim is not None and head_dim < 1:
        raise EncoderError(f"the head's output size must be positive, got {head}")
    spec = {"source": where, "model_class": type(model).__name__, "model_config": json.loads(model.config.to_json_string(use_diff=False)),
            "pooling": pooling, "feature_dim": feature_dim, "head_dim": int(head_dim) if head_dim else None,
            "sha256": weights_sha256(model), "parameters": parameter_count(model)}
    net = PretrainedNet(model, pooling, feature_dim, head_dim)
    return Loaded(net, spec_processor, size, spec)


def _vision_tower(transformers: Any, model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """A dual image-text model's vision tower with its projection (CLIPModel -> CLIPVisionModelWithProjection, its
    weights) when there is such a class and it gives the same embedding: the text tower is not kept."""
    if not callable(getattr(model, "get_image_features", None)):
        return model
    cls = getattr(transformers, type(model).__name__.removesuffix("Model") + "VisionModelWithProjection", None)
    if cls is None:
        return model
    try:
        vision_config = copy.deepcopy(model.config.vision_config)
        vision_config.projection_dim = model.config.projection_dim
        tower = cls(vision_config).float().eval()
        state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
        tower.load_state_dict(state, strict=True)
        with torch.inference_mode():
            ours, theirs = _pool(tower, "image_embeds", batch), _pool(model, "image_features", batch)
    except Exception:  # any failure: keep the whole model, which is known to work
        return model
    if ours.shape != theirs.shape or torch.nn.functional.cosine_similarity(ours, theirs).min() < 0.99999:
        return model
    return tower


def _grey_probe() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 48), (128, 128, 128))


def _no_init(transformers: Any) -> Any:
    """transformers' context that skips weight initialisation (buffers are still made), or a no-op one."""
    import contextlib
    import importlib

    for holder in ("transformers.initialization", "transformers.modeling_utils"):  # 5.x, 4.x
        try:
            context = getattr(importlib.import_module(holder), "no_init_weights", None)
        except ImportError:
            context = None
        if context is not None:
            return context()
    return contextlib.nullcontext()


def net_from_spec(spec: dict[str, Any]) -> PretrainedNet:
    """The net an encoder's config describes, with fresh weights of the right shapes (its model.safetensors then
    fills them): built from the saved model config, no network."""
    transformers = transformers_module()
    try:
        cls = getattr(transformers, spec["model_class"])
        config = cls.config_class.from_dict(dict(spec["model_config"]))
        with _no_init(transformers):  # model.safetensors overwrites every weight: skip the random init (2.5x faster)
            model = cls(config)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EncoderError(f"cannot rebuild the hf: model {spec.get('model_class')!r} with this transformers "
                           f"({type(exc).__name__}: {exc})") from None
    return PretrainedNet(model.float().eval(), spec["pooling"], spec["feature_dim"], spec.get("head_dim"))
