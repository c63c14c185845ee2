#!/usr/bin/env python
"""Write the simulated study ("toyworld") in the Natural Scenes Dataset release layout.

    python data_recipes/toyworld.py --out data/toyworld --seed 0

Then convert it exactly as the real release is converted, and its image-less pretraining corpus
(BOLD runs of 4 more, corpus-only subjects in BIDS, `--corpus-subjects 0` for none) exactly as
any BIDS corpus is:

    python data_recipes/nsd.py --nsd-root data/toyworld --out data/shards/toyworld
    python data_recipes/fmri_corpus.py --root data/toyworld/corpus_bids --dataset toycorpus \
        --out data/shards/toycorpus --roi background --window 4

The default size (4 subjects, 5 sessions of 750 trials, 100 shared test images, 64 x 64 images;
corpus 4 subjects x 4 runs x 750 frames) takes a few minutes on 2 CPU cores. See docs/data.md
for what is simulated and how, and what it costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write the NSD-layout tree to (replaced)")
    p.add_argument("--seed", type=int, default=0, help="everything is deterministic given the seed")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects (subj01..)")
    p.add_argument("--sessions", type=int, default=5, help="750-trial sessions in the design")
    p.add_argument("--incomplete", type=int, nargs="*", default=[3], metavar="SUBJ",
                   help="subjects (1-based) that miss the last session, like NSD subj03/04/06/08")
    p.add_argument("--shared-images", type=int, default=100,
                   help="test images seen by every subject (NSD: the shared 1000)")
    p.add_argument("--reps", type=int, default=3, help="presentations per image (1-3)")
    p.add_argument("--image-size", type=int, default=64, help="stimulus size in pixels (multiple of 32)")
    p.add_argument("--voxel-size", type=float, nargs="+", default=[3.6, 4.2], metavar="MM",
                   help="functional voxel size in mm, or a range drawn from per subject (larger = fewer voxels)")
    p.add_argument("--ncsnr", type=float, default=0.35,
                   help="median noise-ceiling SNR of the ROI voxels (NSD nsdgeneral: roughly 0.2-0.5)")
    p.add_argument("--novel-fraction", type=float, default=0.5,
                   help="share of test images with shape x colour combinations absent from training")
    p.add_argument("--betas-format", choices=["nii.gz", "hdf5", "both"], default="nii.gz",
                   help="which variant(s) of the release's betas files to write")
    p.add_argument("--corpus-subjects", type=int, default=4,
                   help="corpus-only subjects (sub-c01..) of the image-less pretraining corpus; 0: no corpus")
    p.add_argument("--corpus-runs", type=int, default=4, help="corpus runs per subject (the same movie for all)")
    p.add_argument("--corpus-frames", type=int, default=750, help="frames per corpus run")
    p.add_argument("--corpus-tr", type=float, default=0.8, help="corpus repetition time in seconds")
    p.add_argument("--corpus-tsnr", type=float, default=70.0, help="median temporal SNR of corpus ROI voxels")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mindsemantix.simulate.corpus import CorpusConfig
    from mindsemantix.simulate.study import StudyConfig, build_study

    lo, hi = (args.voxel_size * 2)[:2] if len(args.voxel_size) == 1 else args.voxel_size[:2]
    config = StudyConfig(
        seed=args.seed, subjects=args.subjects, sessions=args.sessions, incomplete=tuple(args.incomplete),
        shared_images=args.shared_images, reps=args.reps, image_size=args.image_size,
        voxel_size=(lo, hi), ncsnr=args.ncsnr, novel_fraction=args.novel_fraction,
        betas_format=args.betas_format,
        corpus=CorpusConfig(subjects=args.corpus_subjects, runs=args.corpus_runs, frames=args.corpus_frames,
                            tr=args.corpus_tr, tsnr=args.corpus_tsnr),
    )
    try:
        summary = build_study(args.out, config, progress=not args.quiet)
    except ValueError as e:
        sys.exit(f"toyworld: {e}")
    print(f"wrote {args.out} in {summary['seconds']} s: {summary['n_images']} images, "
          f"{summary['images_per_subject']} per subject")
    for name, info in summary["subjects"].items():
        print(f"  {name}: {info['n_voxels']} voxels ({info['voxel_size_mm']} mm grid {info['grid']}), "
              f"{info['sessions']} sessions, ncsnr median {info['ncsnr_median']}, "
              f"noise ceiling (3 trials) median {info['noise_ceiling_3trials_median_pct']}%")
    if "corpus" in summary:
        corpus = summary["corpus"]
        print(f"corpus {args.out / corpus['bids']}: {len(corpus['subjects'])} subjects x "
              f"{corpus['runs_per_subject']} runs x {corpus['frames_per_run']} frames (TR {corpus['tr']} s), "
              f"{corpus['n_scenes']} scenes")
        for label, info in corpus["subjects"].items():
            print(f"  sub-{label}: {info['n_voxels']} voxels ({info['voxel_size_mm']} mm), "
                  f"tSNR median {info['tsnr_measured_median']}, "
                  f"stimulus-driven variance {info['stimulus_variance_share_median']:.0%}")
    return summary


if __name__ == "__main__":
    main()
