"""Fine-tuning a pretrained-size Hugging Face backbone on the CPU (issue 26): float32 against bfloat16 autocast, and
what streaming the unfrozen path's pixels costs.

A real-size DINOv2-small (Dinov2Config: hidden 384, 12 layers, 6 heads, patch 14, image 224) with **random weights**
(no hub is reachable here: speed and float agreement only, never the quality of pretrained features), saved with
save_pretrained and a BitImageProcessor (resize 256, crop 224, ImageNet mean/std) into a temporary folder.

Part A, timed in interleaved rounds (one warm-up round, then --runs; median), on random 3 x 224 x 224 tensors:
- feature cache: the frozen backbone's forward pass in inference mode, --batch images (what the frozen path pays once
  per image), fp32 vs bf16 autocast; the cosine of the bf16 features to the fp32 ones;
- head step: one Adam step of the D x D head on --head-batch cached features, fp32 vs bf16 autocast;
- unfrozen step: one Adam step with the last --unfreeze blocks and the head trainable on --batch images (forward
  through the whole model, backward through the unfrozen part), fp32 vs bf16 autocast;
- decode: the image processor on --batch decoded 640 x 480 RGB photos (what the unfrozen path now pays per step to
  read its batch from disk instead of holding every image's pixels in memory).
Part B, the same tiny task both ways: `train_pretrained` (frozen backbone, head trained on cached features,
contrastive, --epochs x --steps) on --classes Omniglot background characters (20 drawings each; synthetic colour
blobs if Omniglot is not cached), --precision fp32 and bf16; the held-out accuracy of each, and the cosine between
the two trained encoders' vectors of the images of the classes a 30% class split holds out.

Run:  flock /tmp/siamesedb-heavy.lock nice python tools/bench_pretrained_train.py [--runs 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from siamesedb.encoder import Encoder, cpu_has_native_bf16  # noqa: E402
from siamesedb.pretrained_train import _features, train_pretrained, trainable_names  # noqa: E402
from siamesedb.training import TrainConfig  # noqa: E402


def dinov2_small(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                       image_size=224)
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                   do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def part_a(source: Path, args: argparse.Namespace) -> None:
    from PIL import Image

    from siamesedb.pretrained import process

    encoder = Encoder.from_pretrained(str(source), head=True)
    net = encoder.net
    device = torch.device("cpu")
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cached = torch.randn(args.head_batch, net.feature_dim, generator=torch.Generator().manual_seed(2))
    names = trainable_names(net.model, args.unfreeze)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    processor = encoder.config.preprocessing.processor
    fp32_features = _features(net, pixels, device, bf16=False)
    bf16_features = _features(net, pixels, device, bf16=True)
    cosine = F.cosine_similarity(fp32_features, bf16_features).min().item()

    def step(bf16: bool, unfrozen: bool) -> None:
        for name, param in net.model.named_parameters():
            param.requires_grad_(unfrozen and name in names)
        params = list(net.head.parameters()) + [p for p in net.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(pixels) if unfrozen else net.head(cached)
        out = F.normalize(out.float(), dim=1)
        loss = (out[0::2] * out[1::2]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    settings = {
        "feature cache fp32": lambda: _features(net, pixels, device, bf16=False),
        "feature cache bf16": lambda: _features(net, pixels, device, bf16=True),
        "head step fp32": lambda: [step(False, False) for _ in range(20)],
        "head step bf16": lambda: [step(True, False) for _ in range(20)],
        f"unfrozen ({args.unfreeze} blocks) step fp32": lambda: step(False, True),
        f"unfrozen ({args.unfreeze} blocks) step bf16": lambda: step(True, True),
        "decode (image processor)": lambda: [process(processor, p) for p in photos],
    }
    per = {name: args.head_batch * 20 if name.startswith("head") else args.batch for name in settings}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for round_ in range(args.runs + 1):
        for name, fn in settings.items():
            clock = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - clock)
        print(f"  round {round_} done ({load()})", flush=True)
    print(f"\nA. DINOv2-small, random weights; batch {args.batch} (head: {args.head_batch} cached features, 20 steps "
          f"a run); median of {args.runs} runs (best in brackets)")
    print("| setting | s per call | ms per image (head: per step) | bf16 speed-up |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med, best = statistics.median(values), min(values)
        unit = med * 1000 / (20 if name.startswith("head") else per[name])
        ratio = ""
        if name.endswith("bf16"):
            ratio = f"{statistics.median(times[name[:-4] + 'fp32']) / med:.2f}x"
        print(f"| {name} | {med:.3f} ({best:.3f}) | {unit:.2f} | {ratio} |")
    print(f"cosine of bf16 to fp32 features (min over the batch): {cosine:.6f}")


def omniglot_subset(root: Path, classes: int) -> str:
    from PIL import Image

    try:
        from siamesedb.data import scan_folder
        from siamesedb.datasets import omniglot

        images = scan_folder(omniglot("background"))
        labels = sorted({im.label for im in images})[:classes]
        for im in images:
            if im.label in labels:
                target = root / im.label.replace("/", "_")
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(im.path, target / im.path.name)
        return f"{classes} Omniglot background characters x 20 drawings (105 x 105 grey, made RGB)"
    except Exception as error:  # noqa: BLE001 - no cached Omniglot: coloured blobs instead
        rng = np.random.default_rng(0)
        for c in range(classes):
            base = rng.integers(0, 255, 3)
            (root / f"c{c}").mkdir(parents=True)
            for i in range(20):
                pix = np.clip(base + rng.integers(-40, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pix).save(root / f"c{c}" / f"{i}.png")
        return f"{classes} synthetic colour classes x 20 ({type(error).__name__}: no cached Omniglot)"


def part_b(source: Path, scratch: Path, args: argparse.Namespace) -> None:
    folder = scratch / "task"
    what = omniglot_subset(folder, args.classes)
    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(backbone=f"hf:{source}", loss="contrastive", epochs=args.epochs,
                             steps_per_epoch=args.steps, batch_size=64, val_fraction=0.3, workers=1, lr=1e-3,
                             precision=precision, final_episodes=300, val_episodes=100)
        lines: list[tuple[float, str]] = []
        clock = time.perf_counter()
        encoder = train_pretrained(folder, scratch / precision, config,
                                   log=lambda line: lines.append((time.perf_counter() - clock, line)))
        seconds = time.perf_counter() - clock
        cached = next((t for t, line in lines if line.startswith("cached")), float("nan"))
        epochs = [t for t, line in lines if line.startswith(("epoch", "cached"))]
        train_s = epochs[-1] - cached if len(epochs) > 1 else float("nan")
        results[precision] = (encoder, seconds, encoder.config.notes, (cached, train_s))
        print(f"  {precision}: {seconds:.0f} s; load + decode + feature cache {cached:.0f} s, head epochs "
              f"{train_s:.1f} s ({load()})", flush=True)
    from siamesedb.data import scan_folder
    from siamesedb.validation import held_out_images

    held = held_out_images(scan_folder(folder), 0.3, 0)
    vectors = {p: results[p][0].encode([im.path for im in held]) for p in results}
    cos = (vectors["fp32"] * vectors["bf16"]).sum(axis=1)
    print(f"\nB. the same task, {what}; frozen backbone, head trained {args.epochs} epochs x {args.steps} steps "
          "(contrastive, batch 64, 30% of the classes held out)")
    print("| precision | run s | decode + feature cache s | head epochs s | held-out accuracy (way, 95% CI) | "
          "best epoch | notes precision |")
    print("|---|---|---|---|---|---|---|")
    for precision, (encoder, seconds, notes, (cached, train_s)) in results.items():
        h = notes.get("held_out", {})
        print(f"| {precision} | {seconds:.0f} | {cached:.0f} | {train_s:.1f} | {h.get('accuracy', float('nan')):.2%} "
              f"({h.get('way')}-way, "
              f"± {h.get('ci95', float('nan')):.2%}) | {notes.get('best_epoch')} | {notes.get('precision')} |")
    print(f"cosine of the bf16-trained encoder's vectors to the fp32-trained one's on {len(held)} images: "
          f"min {cos.min():.6f}, mean {cos.mean():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--head-batch", type=int, default=128)
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    args = parser.parse_args()
    import platform

    import transformers

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} torch threads; {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        source = dinov2_small(scratch / "dinov2-small")
        if not args.skip_a:
            part_a(source, args)
        if not args.skip_b:
            part_b(source, scratch, args)
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
