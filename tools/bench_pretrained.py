"""Encoding speed of pretrained-size Hugging Face backbones on the CPU (issue 26), against the shipped default.

Real-size architectures built from their transformers configs with **random weights** (no hub is reachable here, so
no pretrained weights: speed only, never accuracy): DINOv2-small (Dinov2Config: hidden 384, 12 layers, 6 heads,
patch 14, image 224), ViT-B/16 (ViTConfig defaults: hidden 768, 12 layers, 12 heads, patch 16, image 224) and
ResNet-50 (ResNetConfig defaults: bottleneck, depths 3-4-6-3). Each in float32 and under bfloat16 autocast
(`torch.autocast("cpu", dtype=torch.bfloat16)`): a batch of --batch random images at 3 x 224 x 224 (the size their
image processors crop to), forward pass in inference mode, the model's `pooler_output` (DINOv2: the layer-normed CLS
token; ViT: its dense + tanh pooler; ResNet: the global average pool) flattened and L2-normalised as the embedding.
torch's own intra-op threads (torch.get_num_threads()).

Baseline, same run: the shipped default encoder (`Encoder.load("default")`, Conv-4, 28 x 28 grey input, five test-time
views) through `Encoder.encode_tensors` (the call build / add / query use, CPU lanes on) on --default-images of
Omniglot's 105 x 105 evaluation drawings, preprocessed once by the encoder (synthetic 105 x 105 strokes if Omniglot
is not in the cache); also with one view (test_time_shift 0). Preprocessing is outside every timing; one line times
it apart: DINOv2's image processor (BitImageProcessor: resize 256, crop 224, ImageNet mean/std) on --batch decoded
640 x 480 RGB photos.

If siamesedb has the `hf:` backbone (issue 26), also the encoder path: each model saved with save_pretrained into a
temporary folder (random weights, with an image processor), loaded by `Encoder.from_pretrained("hf:DIR")` (float32)
and again with `"precision": "bfloat16"`, its `encode_tensors` (CPU lanes, one part of 32 images per lane) timed on
the same images repeated once per CPU thread; its vectors are compared with the bare model's (skipped with a note
when the backbone is missing).

Measured in rounds (every setting once per round, one warm-up round, then --runs; median), so outside load falls on
all settings alike; one line per setting: params, images/s (median; the best run and the spread in brackets),
ratio to the default (five views) measured in this run, bf16 speed-up over the model's float32, and the cosine of
the bf16 embeddings to the float32 ones (random weights: a check of the arithmetic, not of pretrained features).
The machine may be shared: the load average is printed at the start, after each round and at the end.

Run:  flock /tmp/siamesedb-heavy.lock python tools/bench_pretrained.py [--runs 3] [--batch 32] [--default-images 1024]
          [--models dinov2-small vit-b16 resnet50] [--no-hf-encoder]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from siamesedb.encoder import Encoder, EncoderConfig, cpu_has_native_bf16
from siamesedb.errors import SiameseDBError


def build_model(name: str) -> torch.nn.Module:
    """A real-size transformers vision model from its config, random weights (seed 0), eval mode."""
    import transformers

    torch.manual_seed(0)
    if name == "dinov2-small":
        config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                           patch_size=14, image_size=224)
        model = transformers.Dinov2Model(config)
    elif name == "vit-b16":
        model = transformers.ViTModel(transformers.ViTConfig())
    elif name == "resnet50":
        model = transformers.ResNetModel(transformers.ResNetConfig())
    else:
        raise SystemExit(f"unknown model {name!r}: dinov2-small, vit-b16, resnet50")
    return model.eval()


def image_processor(name: str):
    """The processor the hub checkpoint of that architecture ships (crop 224, ImageNet mean/std)."""
    import transformers

    if name == "dinov2-small":
        return transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                              do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                              image_std=[0.229, 0.224, 0.225])
    if name == "vit-b16":
        return transformers.ViTImageProcessor(size={"height": 224, "width": 224})
    return transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)


def embed(model: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> np.ndarray:
    """(N, 3, 224, 224) -> (N, D) L2-normalised pooler_output, float32 numpy."""
    with torch.inference_mode():
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(pixel_values=batch).pooler_output
        else:
            out = model(pixel_values=batch).pooler_output
        return F.normalize(out.float().flatten(1), dim=1).numpy()


def default_tensors(encoder: Encoder, count: int) -> tuple[torch.Tensor, str]:
    """`count` Omniglot evaluation drawings (105 x 105 grey) preprocessed by the encoder, or synthetic strokes."""
    try:
        from siamesedb.data import scan_folder
        from siamesedb.datasets import omniglot

        images = scan_folder(omniglot("evaluation"))[:count]
        source = f"{len(images)} Omniglot evaluation drawings (105x105 grey)"
        pictures = [im.path for im in images]
    except (SiameseDBError, OSError) as error:  # no cached Omniglot: strokes on white, same size
        from PIL import Image, ImageDraw

        rng = np.random.default_rng(0)
        pictures = []
        for _ in range(count):
            image = Image.new("L", (105, 105), 255)
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                draw.line([tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(4)], fill=0, width=3)
            pictures.append(image)
        source = f"{count} synthetic 105x105 grey strokes ({type(error).__name__}: no cached Omniglot)"
    return torch.stack([encoder.preprocess(p) for p in pictures]), source


def hf_encoders(name: str, model: torch.nn.Module, scratch: Path) -> dict[str, Encoder] | str:
    """The model saved with its image processor, loaded by `Encoder.from_pretrained("hf:DIR")` (float32) and the same
    with `"precision": "bfloat16"`; or why not."""
    if not hasattr(Encoder, "from_pretrained"):
        return "no Encoder.from_pretrained (hf: backbone) in siamesedb yet"
    folder = scratch / name
    model.save_pretrained(folder)
    image_processor(name).save_pretrained(folder)
    try:
        fp32 = Encoder.from_pretrained(f"hf:{folder}")
        bf16 = Encoder(EncoderConfig.from_dict({**fp32.config.to_dict(), "precision": "bfloat16"}),
                       net=copy.deepcopy(fp32.net), device="cpu")
        return {"fp32": fp32, "bf16": bf16}
    except (SiameseDBError, OSError, ValueError, RuntimeError) as error:  # say why, keep the bare-model figures
        return f"Encoder(hf:DIR) not built ({type(error).__name__}: {str(error).splitlines()[0][:120]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="Images per forward pass of the HF models.")
    parser.add_argument("--default-images", type=int, default=1024, help="Images per run for the default encoder.")
    parser.add_argument("--models", nargs="+", default=["dinov2-small", "vit-b16", "resnet50"])
    parser.add_argument("--no-hf-encoder", action="store_true", help="Skip the Encoder(hf:DIR) lines.")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()  # the PIL-backend fallback notice
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars
    start_load = os.getloadavg()
    base = Encoder.load("default", device="cpu")
    one_view = Encoder(EncoderConfig.from_dict({**base.config.to_dict(), "test_time_shift": 0}),
                       net=copy.deepcopy(base.net), device="cpu")
    glyphs, glyph_source = default_tensors(base, args.default_images)
    torch.manual_seed(1)
    photos = torch.randn(args.batch, 3, 224, 224)
    lane_photos = torch.cat([photos] * max(1, torch.get_num_threads()))  # one part of 32 per CPU lane
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"native bf16 {cpu_has_native_bf16()}, {os.cpu_count()} cpus, {platform.machine()} "
          f"{platform.processor() or ''}, {time.strftime('%Y-%m-%d %H:%M')}, load average at start "
          f"{start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}")
    print(f"# default: {base.fingerprint} ({base.config.backbone}, input {tuple(glyphs.shape[1:])}, "
          f"{glyph_source}); HF models: batch {args.batch} x 3x224x224, random weights")

    # name -> (params, images per run, callable returning the vectors)
    settings: dict[str, tuple[int, int, Callable[[], np.ndarray]]] = {}
    base_params = sum(p.numel() for p in base.net.parameters())
    settings["default Conv-4, 5 views"] = (base_params, len(glyphs), lambda: base.encode_tensors(glyphs))
    settings["default Conv-4, 1 view"] = (base_params, len(glyphs), lambda: one_view.encode_tensors(glyphs))
    scratch = Path(tempfile.mkdtemp(prefix="bench-pretrained-"))
    notes = []
    for name in args.models:
        model = build_model(name)
        params = sum(p.numel() for p in model.parameters())
        settings[f"{name} fp32"] = (params, args.batch, lambda m=model: embed(m, photos, False))
        settings[f"{name} bf16"] = (params, args.batch, lambda m=model: embed(m, photos, True))
        if not args.no_hf_encoder:
            encoders = hf_encoders(name, model, scratch)
            if isinstance(encoders, str):
                notes.append(f"{name}: {encoders}")
            else:
                for precision, encoder in encoders.items():
                    settings[f"{name} Encoder(hf:DIR) {precision}"] = (
                        params, len(lane_photos), lambda e=encoder: e.encode_tensors(lane_photos)[: args.batch])
    for note in notes:
        print(f"# {note}")
    # The preprocessing a photo meets before the model: DINOv2's processor (resize 256, crop 224, normalise) on
    # 640 x 480 RGB photos already decoded (PIL), timed apart from the models (they take ready tensors).
    rng = np.random.default_rng(2)
    from PIL import Image

    pil_photos = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    processor = image_processor("dinov2-small")
    settings["image processor 640x480 -> 224"] = (
        0, args.batch, lambda: processor(images=pil_photos, return_tensors="pt")["pixel_values"].numpy())

    seconds: dict[str, list[float]] = {name: [] for name in settings}
    vectors: dict[str, np.ndarray] = {}
    for round_ in range(args.runs + 1):
        for name, (_, _, run) in settings.items():
            started = time.perf_counter()
            vectors[name] = run()
            if round_:
                seconds[name].append(time.perf_counter() - started)
        print(f"# round {round_} done ({'warm-up' if not round_ else 'timed'}), load {os.getloadavg()[0]:.2f}",
              flush=True)

    rate = {name: settings[name][1] / statistics.median(seconds[name]) for name in settings}
    base_rate = rate["default Conv-4, 5 views"]
    for name, (params, count, _) in settings.items():
        extra = ""
        if " Encoder(hf:DIR) " in name:
            model_name, precision = name.split(" Encoder(hf:DIR) ")
            bare = f"{model_name} {precision}"
            cosine = np.sum(vectors[name] * vectors[bare], axis=1) if vectors[name].shape == vectors[bare].shape \
                else np.array([np.nan])
            extra = f"  {rate[name] / rate[bare]:.2f}x the bare {precision} model, cosine to it min {cosine.min():.6f}"
        elif name.endswith(" bf16"):
            fp32 = name[: -len(" bf16")] + " fp32"
            cosine = np.sum(vectors[name] * vectors[fp32], axis=1)
            extra = f"  {rate[name] / rate[fp32]:.2f}x its fp32, cosine to fp32 min {cosine.min():.6f}"
        spread = f"{min(seconds[name]):.2f}-{max(seconds[name]):.2f} s/run, best {count / min(seconds[name]):.1f}/s"
        print(f"{name:<34} {params / 1e6:7.2f} M params {rate[name]:9.1f} images/s ({rate[name] / base_rate:.4f}x "
              f"default)  [{count} images/run, {spread}]{extra}", flush=True)
    end_load = os.getloadavg()
    print(f"# load average at end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")


if __name__ == "__main__":
    main()
