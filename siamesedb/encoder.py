"""Encoder: preprocessing config + weights, images in, float32 vectors out (L2-normalised for cosine encoders, the
default; raw for Euclidean ones, `EncoderConfig.metric`); save / load as safetensors; the device it runs on.

The nets themselves live in `siamesedb.backbones` (registry, Ensemble, Whitened); their names stay importable here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from siamesedb import devices
from siamesedb.backbones import (  # noqa: F401  (register_backbone: re-exported from its old home)
    BACKBONES,
    Ensemble,
    Whitened,
    create_backbone,
    get_backbone,
    register_backbone,
)
from siamesedb.errors import EncoderError, InvalidInputError
from siamesedb.images import Preprocessing, load_image

DEFAULT_ENCODER = "default"
METRICS = ("cosine", "euclidean")  # an encoder's vectors compare by cosine (unit length) or Euclidean distance
MODELS_DIR = Path(__file__).resolve().parent / "models"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_LANE_PART = 32  # images per task of a CPU lane: small enough to balance, large enough to dwarf hand-off


def shifted_views(batch: torch.Tensor, shift: int) -> torch.Tensor:
    """(n, C, H, W) -> (5n, C, H, W): the batch, then copies moved `shift` pixels right, left, down and up, the
    uncovered border filled by replicating the edge (not wrapped around)."""
    height, width = batch.shape[-2:]
    s = shift
    padded = F.pad(batch, (s, s, s, s), mode="replicate")
    return torch.cat([
        batch,
        padded[..., s : s + height, 0:width],  # content moved right
        padded[..., s : s + height, 2 * s : 2 * s + width],  # left
        padded[..., 0:height, s : s + width],  # down
        padded[..., 2 * s : 2 * s + height, s : s + width],  # up
    ])


PRECISIONS = ("float32", "bfloat16")  # EncoderConfig.precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 avx512_bf16 or amx_bf16, from /proc/cpuinfo). Without
    them torch still computes bfloat16 encoders' vectors the same way, only emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# EncoderConfig keys that describe the model without changing what it computes: not part of the fingerprint.
UNFINGERPRINTED = ("pair_calibration", "data_profile")


class EncoderThreshold(float):
    """An encoder's verify threshold: a float, with `source` naming where it was measured ("encoder" for held-out
    classes; "encoder (training pairs)" when no class could be held out, a caveat `verify` shows)."""

    source: str

    def __new__(cls, value: float, source: str = "encoder") -> EncoderThreshold:
        made = super().__new__(cls, float(value))
        made.source = source
        return made


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an encoder besides its weights; saved as config.json beside them."""

    backbone: str = "conv4"
    embedding_dim: int = 64
    width: int = 64
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    name: str = ""
    notes: dict[str, Any] = field(default_factory=dict)  # provenance: training command, data, pair threshold...
    # Test-time views: > 0 embeds each image also shifted by this many pixels right, left, down and up (edges
    # replicated) and returns the normalised mean of the five embeddings: 5x the encoding work, in exchange for
    # vectors that shake off the small misplacements training's affine augmentation taught the net to ignore.
    test_time_shift: int = 0
    # > 1: the net holds this many copies of the backbone, trained apart (tools/ensemble.py): vectors are
    # members * embedding_dim long and their cosine is the mean of the members' cosines.
    members: int = 1
    # A fitted within-class whitening map after the backbone (or ensemble), see `Whitened`.
    whitening: bool = False
    # How vectors compare: "cosine" (L2-normalised output, inner product) or "euclidean" (raw output, L2 distance).
    metric: str = "cosine"
    # mlp backbone only: hidden layer sizes (None: 128, 64, 32) and dropout (None: 0.1).
    hidden: tuple[int, ...] | None = None
    dropout: float | None = None
    # CPU encoding precision: "bfloat16" runs the net under torch's bf16 autocast (the CPU's bf16 dot-product units:
    # avx512_bf16 / AMX), vectors then normalised in float32. Changes vectors beyond float rounding (cosine to the
    # float32 vectors >= 0.9999, BENCHMARKS.md "bf16 encoding"), so it is part of the fingerprint when set. Opt-in:
    # 1.29x the default's images/s here (avx512_bf16) at unchanged accuracy, but emulated ~9x slower on AVX2-only
    # CPUs, so the shipped default stays float32.
    precision: str = "float32"
    # Facts *about* the model, not the model: left out of the fingerprint (see UNFINGERPRINTED), so measuring them
    # again never makes an index refuse the encoder that built it.
    # pair_calibration: the `verify` threshold this encoder carries ({"threshold", "target_far", "far", "frr",
    # "impostors", "measured_on"...}); data_profile: what its training images looked like (domain.image_profile),
    # for the out-of-domain warning.
    pair_calibration: dict[str, Any] = field(default_factory=dict)
    data_profile: dict[str, Any] = field(default_factory=dict)
    # hf: backbones only (siamesedb.pretrained): source (hub id or folder), model class and config, pooling, the
    # feature and head sizes, the sha256 and parameter count of the weights it was built from.
    pretrained: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise EncoderError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.hidden is not None:
            self.hidden = tuple(int(h) for h in self.hidden)
            if not self.hidden or min(self.hidden) < 1:
                raise EncoderError(f"hidden layer sizes must be positive integers, got {self.hidden!r}")
        if self.dropout is not None and not 0.0 <= float(self.dropout) < 1.0:
            raise EncoderError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        options = set(self.backbone_options)
        if options:  # only backbones whose factory takes these options (the mlp) accept them
            takers = [name for name, entry in BACKBONES.items() if options <= entry.options]
            if not options <= get_backbone(self.backbone).options:
                raise EncoderError(f"hidden sizes and dropout apply to the {' / '.join(takers)} backbone, "
                                   f"not {self.backbone!r}")
        if self.precision not in PRECISIONS:
            raise EncoderError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if int(self.test_time_shift) != self.test_time_shift or self.test_time_shift < 0:
            raise EncoderError(f"test_time_shift must be a whole number of pixels >= 0, got {self.test_time_shift!r}")
        self.test_time_shift = int(self.test_time_shift)
        if int(self.members) != self.members or self.members < 1:
            raise EncoderError(f"members must be a whole number >= 1, got {self.members!r}")
        self.members, self.whitening = int(self.members), bool(self.whitening)

    @property
    def dimension(self) -> int:
        """Length of the vectors: embedding_dim per ensemble member."""
        return int(self.embedding_dim) * self.members

    @property
    def backbone_options(self) -> dict[str, Any]:
        """The backbone's own keyword options this config sets (`create_backbone(..., **options)`)."""
        return {key: value for key, value in (("hidden", self.hidden), ("dropout", self.dropout),
                                              ("pretrained", self.pretrained or None)) if value is not None}

    def to_dict(self) -> dict[str, Any]:
        d = {
            "backbone": self.backbone,
            "embedding_dim": self.embedding_dim,
            "width": self.width,
            "preprocessing": self.preprocessing.to_dict(),
            "name": self.name,
            "notes": self.notes,
        }
        if self.test_time_shift:  # only when set: encoders saved before the field keep their fingerprints
            d["test_time_shift"] = self.test_time_shift
        if self.members > 1:  # likewise: only when set
            d["members"] = self.members
        if self.whitening:
            d["whitening"] = True
        if self.metric != "cosine":  # only when not the default: cosine encoders keep their fingerprints
            d["metric"] = self.metric
        if self.hidden is not None:
            d["hidden"] = list(self.hidden)
        if self.dropout is not None:
            d["dropout"] = float(self.dropout)
        if self.precision != "float32":  # only when set: float32 encoders keep their fingerprints
            d["precision"] = self.precision
        if self.pair_calibration:
            d["pair_calibration"] = self.pair_calibration
        if self.data_profile:
            d["data_profile"] = self.data_profile
        if self.pretrained:  # only when set: other encoders keep their fingerprints
            d["pretrained"] = self.pretrained
        return d

    @property
    def pair_threshold(self) -> EncoderThreshold | None:
        """The threshold `verify` uses when nothing else is calibrated: the measured pair calibration, else the
        equal-error pair threshold training stored in its notes, else None. A float that also says where it was
        measured (`.source`, what `verify` shows as threshold_source)."""
        value = self.pair_calibration.get("threshold", self.notes.get("pair_threshold"))
        if value is None:
            return None
        measured = self.pair_calibration.get("source") if "threshold" in self.pair_calibration else None
        return EncoderThreshold(value, "encoder" if measured in (None, "held-out classes") else f"encoder ({measured})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        return cls(
            backbone=d["backbone"],
            embedding_dim=int(d["embedding_dim"]),
            width=int(d.get("width", 64)),
            preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})),
            name=d.get("name", ""),
            notes=dict(d.get("notes", {})),
            test_time_shift=d.get("test_time_shift", 0),
            members=d.get("members", 1),
            whitening=d.get("whitening", False),
            metric=d.get("metric", "cosine"),
            hidden=d.get("hidden"),
            dropout=d.get("dropout"),
            precision=d.get("precision", "float32"),
            pair_calibration=dict(d.get("pair_calibration", {})),
            data_profile=dict(d.get("data_profile", {})),
            pretrained=dict(d.get("pretrained", {})),
        )


def build_net(config: EncoderConfig) -> nn.Module:
    """The untrained network a config describes: backbone, or an ensemble of them, then whitening if set."""

    def backbone() -> nn.Module:
        return create_backbone(config.backbone, channels=config.preprocessing.channels,
                               embedding_dim=config.embedding_dim, image_size=config.preprocessing.size,
                               width=config.width, **config.backbone_options)

    net = backbone() if config.members == 1 else Ensemble([backbone() for _ in range(config.members)])
    return Whitened(net, config.dimension) if config.whitening else net


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device `siamesedb.devices.resolve_device` picks: "auto" | "cpu" | "cuda" | "cuda:N" (or a
    torch.device); CUDA asked for without one, or an unknown device, raises DeviceError (an EncoderError)."""
    return torch.device(devices.resolve_device(device))


class Encoder:
    """A backbone plus its preprocessing: `encode(images)` -> float32 vectors (L2-normalised unless Euclidean)."""

    def __init__(self, config: EncoderConfig, net: nn.Module | None = None, device: str | torch.device = "cpu"):
        get_backbone(config.backbone)  # an unknown name fails here, with the known ones listed
        self.config = config
        self.device = resolve_device(device)
        if net is None:
            net = build_net(config)
        self.net = net.to(self.device)
        self._fingerprint: str | None = None
        self._lanes: tuple[int, ThreadPoolExecutor | None] | None = None  # (torch threads, pool) for CPU encoding
        self.cpu_lanes = True  # False: torch's own intra-op threads instead (tools/bench_build.py compares both)
        self.channels_last = True  # False: encode on the CPU in torch's default layout (tools/bench_layout.py)
        self._nhwc: tuple[tuple[Any, ...], nn.Module] | None = None  # (the weights' state, their channels-last copy)
        self._nhwc_lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return self.config.dimension

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the canonical config and every weight: equal iff the same model."""
        if self._fingerprint is None:
            model = {k: v for k, v in self.config.to_dict().items() if k not in UNFINGERPRINTED}
            digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
            for name, tensor in sorted(self.net.state_dict().items()):
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    @property
    def parameters(self) -> int:
        """How many numbers the net holds (its size: 4 bytes each in model.safetensors)."""
        return int(sum(p.numel() for p in self.net.parameters()))

    @classmethod
    def from_pretrained(cls, source: str, head: int | bool | None = None, device: str | torch.device = "cpu",
                        name: str = "") -> Encoder:
        """An encoder on a Hugging Face vision model (`hf:HUB_ID_OR_DIR` or the bare id / folder): its own image
        processor, its image embedding (siamesedb.pretrained), L2-normalised; `head`: a linear head after it for
        fine-tuning (True: at the model's own dimension, identity-initialised; a number: that output size). Saved
        self-contained: weights, processor settings, source and sha256."""
        from siamesedb.pretrained import PREFIX, load_source, source_of

        source = source_of(str(source))
        loaded = load_source(source, head=head)
        config = EncoderConfig(backbone=PREFIX + source, embedding_dim=loaded.net.dimension, width=0,
                               preprocessing=Preprocessing(size=loaded.size, channels=3, invert=False,
                                                           processor=loaded.processor),
                               name=name, pretrained=loaded.spec)
        return cls(config, net=loaded.net, device=device)

    @property
    def normalizes(self) -> bool:
        """Whether vectors are L2-normalised: cosine encoders yes, Euclidean ones keep the net's raw output."""
        return self.config.metric == "cosine"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), L2-normalised for cosine encoders; keeps gradients (training)."""
        out = self.net(batch.to(self.device)).float()
        return F.normalize(out, dim=1) if self.normalizes else out

    def _inference_net(self) -> nn.Module:
        """The net inference runs: on the CPU a channels-last (NHWC) copy of a convolutional net of this package
        (oneDNN convolves NHWC directly; NCHW costs a reorder around every layer: 1.1-2.2x, tools/bench_layout.py),
        made again whenever a weight or buffer changes (their version counters move: a training step,
        load_state_dict). Vectors agree with the net's own to float rounding. HF backbones and GPUs: the net."""
        if self.device.type != "cpu" or not self.channels_last or self.config.pretrained:
            return self.net
        tensors = [*self.net.parameters(), *self.net.buffers()]
        state = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self._nhwc
        if cached is not None and cached[0] == state:
            return cached[1]
        if not any(isinstance(m, nn.Conv2d) for m in self.net.modules()):
            self._nhwc = (state, self.net)  # nothing to lay out: an MLP
            return self.net
        with self._nhwc_lock:  # concurrent batches of a server: one copy
            if self._nhwc is None or self._nhwc[0] != state:
                net = copy.deepcopy(self.net).eval().to(memory_format=torch.channels_last)
                for tensor in net.parameters():
                    tensor.requires_grad_(False)
                self._nhwc = (state, net)
            return self._nhwc[1]

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, D) L2-normalised on the CPU, in inference mode (thread-local: entered here)."""
        net = self._inference_net()
        with torch.inference_mode():
            chunk = chunk.to(self.device, non_blocking=True)
            shift = self.config.test_time_shift
            if shift:
                chunk = shifted_views(chunk, shift)  # (5n, C, H, W): the image, then four shifted copies
            if net is not self.net:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = net(chunk)
            elif self.config.precision == "bfloat16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = net(chunk)
            else:
                out = net(chunk)
            out = F.normalize(out.float(), dim=1) if self.normalizes else out.float()
            if shift:
                out = out.view(5, -1, out.shape[1]).mean(dim=0)  # (5, n, D) -> (n, D)
                out = F.normalize(out, dim=1) if self.normalizes else out
            return out.cpu()

    def _cpu_lanes(self) -> ThreadPoolExecutor | None:
        """A pool of one Python thread per CPU thread, each running torch single-threaded, or None (1 thread).

        The small nets here parallelise poorly inside one convolution (a barrier per layer, which a preempted thread
        stalls), but almost perfectly across images: lanes take parts of the batch in turn (3.5x torch's intra-op
        threads on the shared 2-core machine, tools/bench_build.py, BENCHMARKS.md). torch releases the GIL inside
        every op, and each sample's result is the same computation either way (tests/test_encoder.py checks the
        vectors against the one-thread path).
        """
        threads = torch.get_num_threads()
        if self.device.type != "cpu" or threads < 2 or not self.cpu_lanes:
            return None
        if self._lanes is None or self._lanes[0] != threads:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="encode", initializer=torch.set_num_threads,
                                      initargs=(1,))
            # With the OpenMP backend the thread count is per thread; elsewhere it may be global: then undo it here
            # and keep the plain path.
            pool.submit(lambda: None).result()
            if torch.get_num_threads() != threads or pool.submit(torch.get_num_threads).result() != 1:
                torch.set_num_threads(threads)
                pool.shutdown()
                self._lanes = (threads, None)
            else:
                self._lanes = (threads, pool)
        return self._lanes[1]

    def encode_tensors(self, batch: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Preprocessed (N, C, H, W) -> (N, D) float32 numpy, in inference mode.

        On a multi-core CPU the batch is cut into small parts that single-threaded lanes take in turn (see
        `_cpu_lanes`): a lane held up by another process delays one small part, not half the batch.
        """
        return self.encode_tensors_async(batch, batch_size)()

    def encode_tensors_async(self, batch: torch.Tensor, batch_size: int = 256) -> Callable[[], np.ndarray]:
        """Start encoding `batch` on the CPU lanes and return a function that waits for the (N, D) result, so the
        caller can do other work (a build commits the previous batch) meanwhile. Without lanes: computed here."""
        self.net.eval()
        lanes = self._cpu_lanes()
        if lanes is None:
            done = [self._forward(batch[start : start + batch_size]) for start in range(0, len(batch), batch_size)]
            return lambda: self._gather(done)
        futures = [lanes.submit(self._forward, batch[start : start + _LANE_PART])
                   for start in range(0, len(batch), _LANE_PART)]
        return lambda: self._gather([future.result() for future in futures])

    def _gather(self, outputs: list[torch.Tensor]) -> np.ndarray:
        if not outputs:
            return np.empty((0, self.dimension), dtype=np.float32)
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)

    def preprocess(self, image: Any) -> torch.Tensor:
        prep = self.config.preprocessing
        return prep.to_tensor(load_image(image, prep.draft_size))  # a large JPEG decodes at reduced scale

    def encode(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """One image (path, PIL image or array) -> (D,); a list or tuple of them -> (N, D). float32,
        L2-normalised for cosine encoders."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        vectors = np.empty((len(items), self.dimension), dtype=np.float32)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            vectors[start : start + len(chunk)] = self.encode_tensors(torch.stack([self.preprocess(x) for x in chunk]))
        return vectors[0] if single else vectors

    def save(self, folder: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors into `folder` (each via a temporary file and a rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp_weights), metadata={"fingerprint": self.fingerprint})
        os.replace(tmp_weights, folder / WEIGHTS_FILE)
        tmp_config = folder / (CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_config, folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, name_or_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Encoder:
        """'default' (the shipped model) or a folder holding config.json + model.safetensors. Never unpickles."""
        folder = Path(name_or_dir)
        if not folder.is_dir() and isinstance(name_or_dir, str) and (MODELS_DIR / name_or_dir).is_dir():
            folder = MODELS_DIR / name_or_dir
        if not folder.is_dir():
            if str(name_or_dir) == DEFAULT_ENCODER:
                raise EncoderError(f"the default encoder is not installed ({MODELS_DIR / DEFAULT_ENCODER} missing)")
            known = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
            raise EncoderError(f"{name_or_dir}: no such encoder folder (known names: {', '.join(known) or 'none'})")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        try:
            config = EncoderConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise EncoderError(f"{config_path}: missing") from None
        except (OSError, ValueError, KeyError, TypeError, InvalidInputError) as exc:
            raise EncoderError(f"{config_path}: unreadable encoder config ({exc})") from None
        encoder = cls(config, device="cpu")
        try:
            state = load_file(str(weights_path))
        except FileNotFoundError:
            raise EncoderError(f"{weights_path}: missing") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise EncoderError(f"{weights_path}: unreadable weights ({str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
        try:
            encoder.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EncoderError(f"{weights_path}: weights do not fit the {config.backbone} config ({str(exc).splitlines()[0]})") from None
        encoder.device = resolve_device(device)
        encoder.net.to(encoder.device)
        encoder.net.eval()
        if config.precision == "bfloat16" and encoder.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(f"{folder}: a bfloat16 encoder on a CPU without avx512_bf16 / amx_bf16 runs emulated, "
                          "several times slower than float32 (about 9x with AVX2 only, BENCHMARKS.md)", stacklevel=2)
        return encoder


def ensemble_of(encoders: list[Encoder], name: str = "") -> Encoder:
    """One Encoder holding several trained ones of the same backbone and input (see `Ensemble`)."""
    if len(encoders) < 2:
        raise EncoderError("an ensemble needs at least two encoders")
    first = encoders[0].config
    shape = (first.backbone, first.width, first.embedding_dim, first.preprocessing.to_dict(), first.test_time_shift)
    for other in encoders:
        cfg = other.config
        if cfg.metric != "cosine":
            raise EncoderError(f"{cfg.name or other.fingerprint}: ensembles average cosines; this encoder is {cfg.metric}")
        if cfg.members > 1 or cfg.whitening:
            raise EncoderError(f"{cfg.name or other.fingerprint}: ensembles and whitened encoders cannot be members")
        theirs = (cfg.backbone, cfg.width, cfg.embedding_dim, cfg.preprocessing.to_dict(), cfg.test_time_shift)
        if theirs != shape:
            raise EncoderError(f"{cfg.name or other.fingerprint}: its (backbone, width, dim, preprocessing, shift) "
                               f"{theirs} differ from the first member's {shape}")
    config = EncoderConfig.from_dict({**first.to_dict(), "members": len(encoders), "name": name or first.name,
                                      "notes": {"members": [e.fingerprint for e in encoders]}})
    net = Ensemble([copy.deepcopy(e.net).cpu() for e in encoders])
    return Encoder(config, net=net, device=encoders[0].device)
