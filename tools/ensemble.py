"""Combine trained encoders into one (an ensemble) and/or fit a within-class whitening map; save the result.

    python tools/ensemble.py --out runs/sig-ens runs/sig-proto runs/sig-proto-s1 runs/sig-proto-s2 \\
        --whiten $SIG --groups U01-U30

Members must share backbone, width, dimension and preprocessing (train them with different --seed). The whitening
is fitted on the vectors the (combined) encoder gives the images of FOLDER restricted to --groups: use training or
calibration groups only, never the ones you will test on. Skilled-forgery classes (X/forged) are left out of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from siamesedb.data import FORGED, scan_folder, select_groups  # noqa: E402
from siamesedb.encoder import Encoder, ensemble_of  # noqa: E402
from siamesedb.evaluation import encode_images  # noqa: E402
from siamesedb.training import whitened_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="encoder folders (or names); one member = whitening only")
    parser.add_argument("--out", required=True, type=Path, help="folder for the combined encoder")
    parser.add_argument("--whiten", type=Path, default=None, metavar="FOLDER", help="labelled folder to fit on")
    parser.add_argument("--groups", default=None, help="groups of FOLDER to fit on, e.g. U01-U30 (default: all)")
    parser.add_argument("--ridge", type=float, default=0.03, help="whitening ridge, a share of the mean variance")
    args = parser.parse_args()

    encoders = [Encoder.load(m) for m in args.members]
    encoder = encoders[0] if len(encoders) == 1 else ensemble_of(encoders, name=args.out.name)
    if args.whiten is None and len(encoders) == 1:
        parser.error("nothing to do: give two or more members, or --whiten")
    if args.whiten is not None:
        # The map acts on each view's vector inside the net, so it is fitted on single-view vectors.
        # Only the chosen groups' genuine classes are read and encoded: other groups may be test data.
        chosen = [im for im in select_groups(scan_folder(args.whiten), args.groups) if not im.label.endswith(f"/{FORGED}")]
        shift, encoder.config.test_time_shift = encoder.config.test_time_shift, 0
        vectors, images, _ = encode_images(chosen, encoder)
        encoder.config.test_time_shift = shift
        labels = [im.label for im in images]
        encoder = whitened_encoder(encoder, vectors, labels, args.ridge,
                                   notes={"folder": str(args.whiten), "groups": args.groups, "classes": len(set(labels))})
        print(f"whitening fitted on {len(images)} images of {len(set(labels))} classes (ridge {args.ridge})")
    encoder.config.name = args.out.name
    encoder._fingerprint = None
    encoder.save(args.out)
    print(f"saved {encoder.config.members}-member encoder {encoder.fingerprint} ({encoder.dimension}-d) to {args.out}")


if __name__ == "__main__":
    main()
