"""Choose an encoder's test-time shift on held-out *background* characters, never on the evaluation alphabets.

The background classes an encoder's training held out for validation (the same seeded split as `siamesedb train`:
--val-fraction of the classes) are scored with 20-way 1-shot episodes (unstructured: the held-out classes are too
few per alphabet for within-alphabet episodes) for each candidate shift; one printed line per shift. With
--write DIR, the encoder is saved to DIR with the best shift in its config.json ("test_time_shift") and its
`verify A B` pair threshold recomputed on the same held-out classes with those vectors (the one training stored was
for single-view vectors).

Run:  python tools/select_tta.py ENCODER_DIR BACKGROUND_FOLDER [--shifts 0 1 2 3 4] [--episodes 1000] [--write DIR]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from siamesedb.data import iter_batches, scan_folder
from siamesedb.encoder import Encoder
from siamesedb.evaluation import episode_accuracies
from siamesedb.training import held_out_images, pair_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder")
    parser.add_argument("background")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--way", type=int, default=20)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="The training run's seed (it fixes the held-out split).")
    parser.add_argument("--write", default=None, metavar="DIR", help="Save the encoder with the best shift here.")
    args = parser.parse_args()
    base = Encoder.load(args.encoder)
    images = scan_folder(args.background)
    # The held-out images are decoded once; each shift only re-encodes these tensors.
    held_images = held_out_images(images, args.val_fraction, args.seed)
    held_names = {image.label for image in held_images}
    kept, chunks = [], []
    for positions, batch, _ in iter_batches(held_images, base.config.preprocessing, batch_size=1024):
        kept.extend(held_images[i] for i in positions)
        chunks.append(batch)
    tensor = torch.cat(chunks)
    labels, paths = [image.label for image in kept], [str(image.path) for image in kept]
    print(f"# {args.encoder}: {len(held_names)} held-out background classes, {args.way}-way 1-shot, "
          f"{args.episodes} episodes", flush=True)
    scores = {}
    for shift in args.shifts:
        encoder = Encoder(dataclasses.replace(base.config, test_time_shift=shift), net=base.net)
        accuracies = episode_accuracies(encoder.encode_tensors(tensor), labels, paths, way=args.way, shot=1,
                                        episodes=args.episodes, seed=args.seed)
        ci = 1.96 * accuracies.std(ddof=1) / np.sqrt(len(accuracies))
        print(f"shift {shift}: held-out background {args.way}-way 1-shot {accuracies.mean():.2%} ± {ci:.2%}", flush=True)
        scores[shift] = accuracies.mean()
    if args.write:
        best = max(scores, key=lambda shift: (scores[shift], -shift))  # ties: the cheaper, smaller shift
        config = dataclasses.replace(base.config, test_time_shift=best, notes=dict(base.config.notes))
        chosen = Encoder(config, net=base.net)
        classes = sorted(held_names)
        codes = np.asarray([classes.index(label) for label in labels])
        config.notes.update(pair_threshold(chosen, tensor, codes, seed=args.seed))
        config.notes["test_time_shift_chosen_by"] = (
            f"tools/select_tta.py: {args.way}-way 1-shot on the {len(held_names)} held-out background classes, "
            + ", ".join(f"shift {k} {v:.2%}" for k, v in scores.items()))
        chosen._fingerprint = None
        chosen.save(args.write)
        print(f"saved {chosen.fingerprint} with test_time_shift {best}, pair threshold "
              f"{config.notes['pair_threshold']:.4f} (EER {config.notes['pair_eer']:.2%}) to {args.write}")


if __name__ == "__main__":
    main()
