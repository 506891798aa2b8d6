"""Where does a fine-tuning run lose what the frozen SSL features know? Heads and augmentation on
frozen features, in seconds instead of a fine-tuning run per question.

    python benchmarks/frozen_head_ablation.py --ssl_checkpoint runs/label_efficiency/ssl/best_ssl_model.pth \\
        --data_dir ./data/label_efficiency --seeds 0 1 2 3 4 5 6 7 8 9

For every seed it takes the labelled subset fine_tune.py draws (--label_fraction), encodes it with the
frozen encoder (eval mode), trains a head full batch with AdamW (lr 1e-3, as fine-tuning does) and scores
it on the test split:
  - on the clean images: the classifier's MLP head (fine_tune.py's), the same after standardising the
    features, a linear head, and sklearn's logistic regression (evaluate.py's linear probe);
  - a linear head on --copies augmented copies of each labelled image, with fine_tune.py's augmentation
    at each --rotations value (and --rotation_fill): what training the head on augmented images does to
    these features.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import augmentations  # noqa: E402
import checkpoints  # noqa: E402
import data_loader  # noqa: E402
import data_splits  # noqa: E402
import fine_tune  # noqa: E402
import image_io  # noqa: E402
import label_tables  # noqa: E402
import model_ssl  # noqa: E402
import probes  # noqa: E402
import scoring  # noqa: E402
import utils  # noqa: E402


@torch.no_grad()
def encode(encoder, images: torch.Tensor, prepare, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([encoder(prepare(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def make_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    if kind == "mlp":
        return model_ssl.ClassificationHead(dim, num_classes)
    if kind == "standardised mlp":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False), model_ssl.ClassificationHead(dim, num_classes))
    return nn.Linear(dim, num_classes)


def fit_and_score(kind, x, y, test_x, test_y, num_classes, steps, seed) -> float:
    """Full-batch AdamW on (x, y), then test accuracy; eval mode at test (no dropout, running stats)."""
    torch.manual_seed(seed)
    head = make_head(kind, x.shape[1], num_classes)
    fine_tune.fit_head(head, x, y, steps, lr=1e-3, weight_decay=1e-4)
    head.eval()
    with torch.no_grad():
        return float((head(test_x).argmax(1) == test_y).float().mean())


def main(args):
    ckpt = checkpoints.SSLCheckpoint.load(args.ssl_checkpoint, "--ssl_checkpoint")
    encoder = scoring.ssl_encoder(ckpt, args.ssl_checkpoint).eval()
    label_file = args.label_file or os.path.join(args.data_dir, "labels.csv")
    table = label_tables.read_label_table(label_file, args.data_dir, seed=ckpt.split_seed)
    train, test = table.indices("train"), table.indices("test")
    store = data_loader.ImageStore(args.data_dir, [table.filenames[i] for i in np.r_[train, test]],
                                   ckpt.image_size, channels=ckpt.channels)
    images = store.batch(torch.arange(len(store)))        # the RAM cache, or a prepared folder's rows
    features = encode(encoder, images, image_io.normalize)
    train_x, test_x = features[: len(train)], features[len(train):]
    test_y = torch.as_tensor(table.labels[test])
    k = table.num_classes
    rows = {}
    for seed in args.seeds:
        subset = data_splits.stratified_subset(table.labels, train, args.label_fraction, seed)
        pos = np.searchsorted(train, subset)
        x, y = train_x[pos], torch.as_tensor(table.labels[subset])
        for kind in ("mlp", "standardised mlp", "linear"):
            rows.setdefault(f"{kind} head, clean images", []).append(
                fit_and_score(kind, x, y, test_x, test_y, k, args.steps, seed))
        prob = probes.fit_linear_probe(x.numpy(), y.numpy(), test_x.numpy(), k, seed, []).prob   # C=1: no val here
        rows.setdefault("logistic regression (evaluate.py's probe), clean images", []).append(
            float((prob.argmax(1) == test_y.numpy()).mean()))
        for rotation in args.rotations:
            config = dataclasses.replace(augmentations.SUPERVISED_AUGMENT, rotation=rotation,
                                         rotation_fill=args.rotation_fill)
            augment = augmentations.BatchAugment(config, ckpt.image_size)
            generator = torch.Generator().manual_seed(seed)
            copies = torch.cat([encode(encoder, images[pos], lambda b: augment(b, generator=generator))
                                for _ in range(args.copies)])
            name = f"linear head, {args.copies} augmented copies, rotation +-{rotation:g} ({args.rotation_fill} fill)"
            rows.setdefault(name, []).append(
                fit_and_score("linear", copies, y.repeat(args.copies), test_x, test_y, k, args.steps, seed))
    lines = [f"Frozen features of {args.ssl_checkpoint}, {len(subset)} labelled images, {args.steps} full-batch "
             f"steps, test accuracy over {len(args.seeds)} seeds:", "", "| head and training images | accuracy |",
             "|---|---|"]
    lines += [f"| {name} | {np.mean(v):.3f} ± {np.std(v):.3f} |" for name, v in rows.items()]
    print("\n".join(lines))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--ssl_checkpoint", required=True, help="a best_ssl_model.pth")
    p.add_argument("--data_dir", default="./data/label_efficiency", help="dataset folder with a split column")
    p.add_argument("--label_file", default=None, help="default: DATA_DIR/labels.csv")
    p.add_argument("--label_fraction", type=float, default=0.1, help="labelled share of the train split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subsets and head initialisations")
    p.add_argument("--steps", type=int, default=300, help="full-batch head steps (fine_tune --head_prefit_steps)")
    p.add_argument("--copies", type=int, default=10, help="augmented copies of each labelled image")
    p.add_argument("--rotations", type=float, nargs="+", default=[10.0, 0.0],
                   help="fine_tune.py --rotation values to try (10: the original recipe's)")
    p.add_argument("--rotation_fill", default="zeros", choices=augmentations.ROTATION_FILLS,
                   help="fine_tune.py --rotation_fill of the augmented copies")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
