"""Choose an encoder's own verification threshold on look-alike impostors of held-out *background* classes.

The threshold an encoder carries is what `siamesedb verify` uses on an index nobody calibrated (one reference per
class cannot be calibrated at the equal-error point). Training's own pair threshold is the equal-error point of
random held-out pairs, mostly easy cross-alphabet impostors; users verify against look-alikes. So: take the
background classes the encoder's training held out for validation (the same seeded split as `siamesedb train`),
give each one random reference (one-shot), score its other images (genuine) and the images of the other held-out
classes of its own group (impostors: same alphabet), and keep the lowest threshold whose false-accept rate on those
impostors is at most --target-far. Never the evaluation alphabets: their figures are measured with the result
(`siamesedb eval oneshot-verify`, BENCHMARKS.md).

With --write DIR the encoder is saved to DIR with the threshold in its config.json ("pair_calibration"); the
fingerprint does not change (pair_calibration is a fact about the model, not part of it).

Run:  python tools/pair_threshold.py ENCODER BACKGROUND_FOLDER [--target-far 0.05] [--write DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime

import numpy as np

from siamesedb import scoring
from siamesedb.data import image_profile, scan_folder
from siamesedb.encoder import Encoder
from siamesedb.evaluation import encode_images, oneshot_verification_trials, roc_auc
from siamesedb.training import held_out_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder")
    parser.add_argument("background")
    parser.add_argument("--target-far", type=float, default=0.05)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="The training run's seed (it fixes the held-out split).")
    parser.add_argument("--trial-seeds", type=int, default=5, help="Reference draws pooled (seeds 0..N-1).")
    parser.add_argument("--write", default=None, metavar="DIR", help="Save the encoder with the threshold here.")
    args = parser.parse_args()
    encoder = Encoder.load(args.encoder)
    images = scan_folder(args.background)
    held_images = held_out_images(images, args.val_fraction, args.seed)
    held_names = {image.label for image in held_images}
    vectors, kept, _ = encode_images(held_images, encoder)
    labels = [image.label for image in kept]
    metric = getattr(encoder.config, "metric", "cosine")
    genuine, impostor = zip(*(oneshot_verification_trials(vectors, labels, 1, "group", seed, metric)
                              for seed in range(args.trial_seeds)))
    genuine, impostor = np.concatenate(genuine), np.concatenate(impostor)
    threshold = scoring.far_threshold(impostor, args.target_far)
    far, frr = float(np.mean(impostor >= threshold)), float(np.mean(genuine < threshold))
    print(f"# {args.encoder}: {len(held_names)} held-out background classes, one reference each, same-group "
          f"impostors, {args.trial_seeds} reference draws: {len(genuine)} genuine / {len(impostor)} impostor trials, "
          f"AUC {roc_auc(genuine, impostor):.4f}")
    print(f"threshold {threshold:.4f} for FAR <= {args.target_far:.0%}: FAR {far:.2%}, FRR {frr:.2%}")
    if args.write:
        calibration = {
            "threshold": threshold,
            "target_far": args.target_far,
            "far": far,
            "frr": frr,
            "rule": "prototype",
            "references": 1,
            "impostors": "other classes of the same group (alphabet)",
            "measured_on": f"{len(held_names)} background classes held out of training (val_fraction "
                           f"{args.val_fraction}, seed {args.seed}), {len(genuine)} genuine / {len(impostor)} "
                           "impostor trials",
            "chosen_by": "tools/pair_threshold.py",
            "date": datetime.date.today().isoformat(),
        }
        profile = image_profile([image.path for image in images], limit=64)
        config = dataclasses.replace(encoder.config, pair_calibration=calibration, data_profile=profile)
        Encoder(config, net=encoder.net).save(args.write)
        print(f"wrote {args.write} (fingerprint {encoder.fingerprint}, data profile {profile})")


if __name__ == "__main__":
    main()
