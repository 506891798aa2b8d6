"""What evaluate.py's bootstrap costs: the intervals of a two-model comparison at several resample counts.

    python benchmarks/bootstrap_cost.py                                  # the quick start's test split size
    python benchmarks/bootstrap_cost.py --images 3000 --patients 1000 --resamples 2000 5000

Random predictions of --images images in --patients patients and --num_classes classes; for each resample
count, the time of what evaluate.py computes for two models: both models' metrics (compute_metrics) and the
paired differences (paired_accuracy_difference, paired_metric_differences), resampling patients. Prints one
line per count.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import classification_metrics as cm  # noqa: E402


def comparison_seconds(y, probs, groups, k: int, resamples: int) -> float:
    start = time.perf_counter()
    for prob in probs:
        cm.compute_metrics(y, prob, k, resamples, 0, groups)
    cm.paired_accuracy_difference(y, probs[0], probs[1], resamples, 0, groups)
    cm.paired_metric_differences(y, probs[0], probs[1], k, resamples, 0, groups)
    return time.perf_counter() - start


def main(args):
    rng = np.random.default_rng(args.seed)
    groups = np.sort(np.arange(args.images) % args.patients)          # patients of equal size, +-1 image
    y = rng.integers(0, args.num_classes, args.images)
    probs = [rng.dirichlet(np.ones(args.num_classes), args.images) for _ in range(2)]
    units = len(np.unique(groups))
    for resamples in args.resamples:
        seconds = comparison_seconds(y, probs, groups, args.num_classes, resamples)
        print(f"{resamples} resamples of {units} patients ({args.images} images, {args.num_classes} classes): "
              f"{seconds:.2f} s for two models and their paired differences")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=318, help="test images")
    p.add_argument("--patients", type=int, default=106, help="patients the images belong to")
    p.add_argument("--num_classes", type=int, default=3, help="classes")
    p.add_argument("--resamples", type=int, nargs="+", default=[1000, 2000], help="bootstrap resample counts to time")
    p.add_argument("--seed", type=int, default=0, help="seed of the random predictions")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
