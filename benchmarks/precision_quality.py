"""Does bf16 mixed precision keep the quality of fp32? Same data, same seeds, each precision end to end.

    python benchmarks/precision_quality.py                            # CPU, 64 px, about 10 min on a bf16 CPU
    python benchmarks/precision_quality.py --device cuda --ssl_epochs 30

For each precision (fp32, bf16): pretrain SimCLR, fine-tune from that checkpoint with all train labels,
and score the test split, every phase in that precision. Then the fp32 classifier is scored again in
bf16, which isolates what bf16 inference alone changes (prediction agreement, largest probability
difference). Prints a table and, on its last line, key=value pairs: the quality differences and the
bf16/fp32 speed ratio of each phase. On a CPU without native bf16 the bf16 runs are emulated (slow);
the quality comparison still holds, the timings do not.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import fine_tune  # noqa: E402
import train_ssl  # noqa: E402
import utils  # noqa: E402
from classification_metrics import compute_metrics  # noqa: E402
import scoring  # noqa: E402
import synthetic  # noqa: E402

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def timed(fn, *a) -> float:
    start = time.perf_counter()
    fn(*a)
    return time.perf_counter() - start


def pretrain(args, label_file: str, out: str, precision: str) -> float:
    argv = ["--data_dir", args.data_dir, "--label_file", label_file, "--output_dir", out,
            "--image_size", str(args.image_size), "--batch_size", str(args.ssl_batch_size),
            "--num_epochs", str(args.ssl_epochs), "--warmup_epochs", "1", "--lr", "1e-3",
            "--temperature", "0.2", "--crop_min_scale", "0.3", "--eval_every", str(args.ssl_epochs),
            "--device", args.device, "--precision", precision, "--seed", "0", "--overwrite"]   # a rerun's folders
    return timed(train_ssl.main, train_ssl.get_args_parser().parse_args(argv))


def finetune(args, label_file: str, ssl_path: str, out: str, precision: str) -> float:
    argv = ["--data_dir", args.data_dir, "--label_file", label_file, "--output_dir", out,
            "--ssl_checkpoint", ssl_path, "--output_name", "model.pth", "--image_size", str(args.image_size),
            "--num_epochs", str(args.ft_epochs), "--device", args.device, "--precision", precision, "--seed", "0",
            "--overwrite"]
    return timed(fine_tune.main, fine_tune.get_args_parser().parse_args(argv))


def score(args, label_file: str, checkpoint: str, precision: str) -> tuple:
    """(Evaluated, metrics dict, seconds) on the test split."""
    eval_args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, "--data_dir", args.data_dir, "--label_file", label_file,
         "--device", args.device, "--bootstrap", "0"])
    start = time.perf_counter()
    (ev,) = scoring.evaluate_checkpoint(checkpoint, precision, eval_args, utils.resolve_device(args.device),
                                         DTYPES[precision])
    seconds = time.perf_counter() - start
    metrics = compute_metrics(ev.y_true, ev.prob, len(ev.class_names), resamples=0, seed=0)
    return ev, {m: float(metrics[m]["value"]) for m in ("accuracy", "roc_auc_macro")}, seconds


def ssl_summary(out: str) -> dict:
    import pandas as pd

    history = pd.read_csv(os.path.join(out, "ssl_history.csv"))
    return {"ssl_loss": float(history["loss"].iloc[-1]), "knn": float(history["knn_accuracy"].dropna().iloc[-1])}


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    label_file = os.path.join(args.data_dir, "labels.csv")
    if not os.path.isfile(label_file):
        synthetic.generate_dataset(args.data_dir, args.num_images, 3, args.image_size, 42, 0)
    device = utils.resolve_device(args.device)
    _, auto_why = utils.resolve_precision("auto", None, device)
    rows, evs = {}, {}
    for precision in PRECISIONS:
        out = os.path.join(args.output_dir, precision)
        row = {"pretrain_s": pretrain(args, label_file, out, precision)}
        row.update(ssl_summary(out))
        row["finetune_s"] = finetune(args, label_file, os.path.join(out, "best_ssl_model.pth"), out, precision)
        evs[precision], metrics, row["eval_s"] = score(args, label_file, os.path.join(out, "model.pth"), precision)
        rows[precision] = {**row, **metrics}
    fp32_in_bf16, _, _ = score(args, label_file, os.path.join(args.output_dir, "fp32", "model.pth"), "bf16")
    ref = evs["fp32"].prob
    agreement = float((fp32_in_bf16.prob.argmax(1) == ref.argmax(1)).mean())
    max_prob_diff = float(np.abs(fp32_in_bf16.prob - ref).max())

    print(f"\ndevice {device} ({auto_why}), torch {torch.__version__}, {args.image_size} px, "
          f"{args.ssl_epochs} SSL epochs, {args.ft_epochs} fine-tuning epochs, test images {len(ref)}")
    print("| precision | final SSL loss | kNN val acc | test acc | test AUC | pretrain s | fine-tune s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in rows.items():
        print(f"| {p} | {r['ssl_loss']:.4f} | {r['knn']:.3f} | {r['accuracy']:.3f} | {r['roc_auc_macro']:.3f} | "
              f"{r['pretrain_s']:.1f} | {r['finetune_s']:.1f} | {r['eval_s']:.1f} |")
    print(f"fp32 classifier scored in bf16: prediction agreement {agreement:.3f}, "
          f"largest probability difference {max_prob_diff:.4f}")
    f, b = rows["fp32"], rows["bf16"]
    pairs = {"ssl_loss_diff": b["ssl_loss"] - f["ssl_loss"], "knn_diff": b["knn"] - f["knn"],
             "test_acc_diff": b["accuracy"] - f["accuracy"], "test_auc_diff": b["roc_auc_macro"] - f["roc_auc_macro"],
             "eval_agreement": agreement, "eval_max_prob_diff": max_prob_diff,
             "speed_bf16_over_fp32_pretrain": f["pretrain_s"] / b["pretrain_s"],
             "speed_bf16_over_fp32_finetune": f["finetune_s"] / b["finetune_s"]}
    print(" ".join(f"{k}={v:.4f}" for k, v in pairs.items()))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--data_dir", default="./data/precision_quality", help="dataset folder (generated if empty)")
    p.add_argument("--output_dir", default="./runs/precision_quality", help="checkpoints of both precisions")
    p.add_argument("--num_images", type=int, default=500, help="synthetic labelled images")
    p.add_argument("--image_size", type=int, default=64, help="resolution of every phase")
    p.add_argument("--ssl_epochs", type=int, default=10, help="pretraining epochs")
    p.add_argument("--ssl_batch_size", type=int, default=128, help="pretraining batch (images)")
    p.add_argument("--ft_epochs", type=int, default=15, help="fine-tuning epochs (all train labels)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
