"""Label efficiency: SSL-initialised fine-tuning vs the same recipe from scratch, at several label
fractions and seeds, all scored on the same held-out test split.

    python benchmarks/label_efficiency.py --seeds 0 1 2 3 4                # the quick start's data and recipe, CPU
    python benchmarks/label_efficiency.py --recipe spec --output_dir ./runs/label_efficiency_spec   # scripts' defaults
    python benchmarks/label_efficiency.py --device cuda --ssl_epochs 200   # longer pretraining (GPU)
    python benchmarks/label_efficiency.py --fractions 0.05 0.1 0.25 1.0 --seeds 0 1 2
    python benchmarks/label_efficiency.py --npz breastmnist.npz --image_size 28 \\
        --output_dir ./runs/label_efficiency_breastmnist
    python benchmarks/label_efficiency.py --multi_label --data_dir ./data/label_efficiency_multilabel \\
        --output_dir ./runs/label_efficiency_multilabel          # several findings per image: mean ROC-AUC

Pretrains once (test split left out), then for every fraction x seed x {ssl, scratch} runs
fine_tune.py's main with identical settings (epochs, augmentation, learning rates, best-on-val
selection), evaluates each on the test split with evaluate.py's code, and writes
results.csv (one row per run, with the train and val label counts), summary.csv / summary.md (mean, sample
standard deviation and 95% t-interval over seeds), gains.csv (per fraction the SSL - scratch gain in balanced
accuracy and accuracy with its t-interval and a sign test over seeds) and label_efficiency.png (metric against
labelled fraction, one line per method, +-1 sample SD).
probe.csv and the end of summary.md check that the gain has the right cause: a linear probe on the
frozen SSL features against one on the same network's random initialisation, fitted on the same
labelled subsets (--probe_only: just that, in seconds, for a given --ssl_checkpoint).
"""
import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import augmentations  # noqa: E402
import calibration  # noqa: E402
import checkpoints  # noqa: E402
import data_loader  # noqa: E402
import data_splits  # noqa: E402
import evaluate  # noqa: E402
import fine_tune  # noqa: E402
import label_tables  # noqa: E402
import medmnist_npz  # noqa: E402
import train_ssl  # noqa: E402
import utils  # noqa: E402
from classification_metrics import compute_metrics, compute_multilabel_metrics  # noqa: E402
import probes  # noqa: E402
import recipes  # noqa: E402
import scoring  # noqa: E402
import synthetic  # noqa: E402
import tasks  # noqa: E402

METRICS = ("balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro")   # the first is the gain metric
PROBABILITY_METRICS = ("ece", "brier")            # lower is better; of probabilities (not of kNN vote shares)
MULTILABEL_METRICS = ("mean_auc", "mean_ap")      # over the findings, on the test split
METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "mean_auc": "mean ROC-AUC",
                "mean_ap": "mean AP"}


def is_multilabel(args, label_file: str) -> bool:
    """--multi_label, or a label file (e.g. an imported ChestMNIST) that is multi-label."""
    return args.multi_label or label_tables.label_file_format(label_file) != "classes"


def prepare_data(args) -> tuple:
    """(data_dir, label_file): import the npz, or generate synthetic data when the folder is empty."""
    data_dir = args.data_dir
    label_file = os.path.join(data_dir, "labels.csv")
    if os.path.isfile(label_file):
        if not args.npz and args.num_unlabeled and not os.path.isdir(os.path.join(data_dir, "unlabeled")):
            print(f"warning: reusing {data_dir}, which has no unlabeled/ folder: pretraining sees only its labelled "
                  f"images, not --num_unlabeled {args.num_unlabeled} more (empty the folder to generate them)",
                  file=sys.stderr)
        with open(label_file, encoding="utf-8-sig") as f:
            has_split = "split" in [c.strip().strip('"').lower() for c in f.readline().split(",")]
        if not args.npz and not has_split:
            print(f"warning: reusing {label_file}, which has no split column: every script splits it 70/15/15 by "
                  f"patient, not --test_fraction {args.test_fraction} (empty the folder to generate the data again)",
                  file=sys.stderr)
        return data_dir, label_file
    if args.npz:
        medmnist_npz.import_npz(args.npz, data_dir)
    elif args.multi_label:
        synthetic.generate_multilabel_dataset(data_dir, args.num_images, args.image_size, args.data_seed,
                                                args.num_unlabeled)
    else:
        synthetic.generate_dataset(data_dir, args.num_images, 3, args.image_size, args.data_seed, args.num_unlabeled)
    if not args.npz:
        counts = data_loader.write_split_column(label_file, data_dir, args.data_seed, args.val_fraction,
                                                args.test_fraction)
        print(f"split column (by patient): {', '.join(f'{s} {n}' for s, n in counts.items())} images")
    return data_dir, label_file


# the benchmark's flags that override a --recipe value: (phase, the script's flag); 'ft_ssl': SSL runs only
RECIPE_FLAGS = {"ssl_batch_size": ("ssl", "batch_size"), "ssl_optimizer": ("ssl", "optimizer"),
                "ssl_lr": ("ssl", "lr"), "temperature": ("ssl", "temperature"),
                "crop_min_scale": ("ssl", "crop_min_scale"), "ssl_rotation": ("ssl", "rotation"),
                "jitter": ("ssl", "jitter"), "gamma": ("ssl", "gamma"), "ft_batch_size": ("ft", "batch_size"),
                "ft_lr": ("ft", "lr"), "ft_rotation_fill": ("ft", "rotation_fill"),
                "encoder_lr_scale": ("ft_ssl", "encoder_lr_scale")}


def recipe_argv(args, phases: set) -> list:
    """--recipe, then the recipe-controlled flags of `phases` that this benchmark was given (they win)."""
    argv = ["--recipe", args.recipe]
    for name, (phase, flag) in RECIPE_FLAGS.items():
        if phase in phases and getattr(args, name) is not None:
            argv += [f"--{flag}", str(getattr(args, name))]
    return argv


def read_record(path: str, force: bool) -> dict:
    """What a finished (or started) step wrote about itself; {} when absent or with --force."""
    if force or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def pretrain(args, data_dir, label_file) -> str:
    if args.ssl_checkpoint:
        return args.ssl_checkpoint
    out = os.path.join(args.output_dir, "ssl")
    path, record = os.path.join(out, "best_ssl_model.pth"), os.path.join(out, "pretrain.json")
    argv = ["--data_dir", data_dir, "--label_file", label_file, "--output_dir", out,
            "--image_size", str(args.image_size), "--num_epochs", str(args.ssl_epochs), "--eval_every", "5",
            "--device", args.device, "--precision", args.precision, "--seed", "0", *recipe_argv(args, {"ssl"})]
    if args.ssl_compile:
        argv += ["--compile"]
    if args.ssl_cuda_graphs != "auto":          # only then: records of runs before the flag stay reusable
        argv += ["--cuda_graphs", args.ssl_cuda_graphs]
    saved = read_record(record, args.force)
    if saved.get("argv") == argv and saved.get("done"):      # only a finished pretraining with this recipe
        print(f"reusing {path}")
        return path
    resume = saved.get("argv") == argv and os.path.isfile(os.path.join(out, "last_ssl_checkpoint.pth"))
    os.makedirs(out, exist_ok=True)
    utils.atomic_write_text(record, json.dumps({"argv": argv, "done": False}))
    # the benchmark's own record decides what is reused, so a run of another recipe replaces its folder's model
    train_ssl.main(train_ssl.get_args_parser().parse_args(argv + (["--resume"] if resume else ["--overwrite"])))
    utils.atomic_write_text(record, json.dumps({"argv": argv, "done": True}))
    return path


def finetune_and_score(args, data_dir, label_file, ssl_path, method, fraction, seed) -> dict:
    out = os.path.join(args.output_dir, f"{method}_frac{fraction:g}_seed{seed}")
    argv = ["--data_dir", data_dir, "--label_file", label_file, "--output_dir", out,
            "--image_size", str(args.image_size), "--label_fraction", str(fraction),
            *(["--num_epochs", str(args.ft_epochs)] if args.ft_epochs else ["--num_steps", str(args.ft_steps)]),
            "--device", args.device, "--precision", args.precision,
            "--seed", str(seed), "--output_name", "model.pth",
            *recipe_argv(args, {"ft", "ft_ssl"} if method == "ssl" else {"ft"})]
    if method == "ssl":
        argv += ["--ssl_checkpoint", ssl_path, "--head_prefit_steps", str(args.head_prefit_steps)]
        if args.freeze_epochs > 0:
            argv += ["--freeze_encoder", "--unfreeze_after_epoch", str(args.freeze_epochs)]
    done = os.path.join(out, "score.json")
    key = argv + ([f"ssl_sha256={utils.sha256_file(ssl_path)}"] if method == "ssl" else [])
    saved = read_record(done, args.force)          # an interrupted benchmark goes on where it stopped
    if saved.get("argv") == key:                   # only a run with these very settings (and encoder) counts
        return saved["row"]
    start = time.perf_counter()
    fine_tune.main(fine_tune.get_args_parser().parse_args(argv + ["--overwrite"]))   # the record decides reuse
    seconds = time.perf_counter() - start
    eval_args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", os.path.join(out, "model.pth"), "--data_dir", data_dir, "--label_file", label_file,
         "--device", args.device, "--bootstrap", "0"])
    device = utils.resolve_device(args.device)
    (ev,) = scoring.evaluate_checkpoint(eval_args.checkpoint[0], method, eval_args, device, None)
    ckpt = checkpoints.ClassifierCheckpoint.load(eval_args.checkpoint[0])
    row = {"method": method, "recipe": args.recipe, "fraction": fraction, "seed": seed,
           "train_seconds": round(seconds, 1), "train_labels": len(ckpt.train_files),
           "val_labels": len((ckpt.splits or {}).get("val") or []),
           "best_epoch": ev.info.epoch, "level_from_epoch": fine_tune.first_epoch_at_best(
               os.path.join(out, ckpt.history_file or ""), tasks.of(ev.info.task).selection_column,
               ev.info.epoch),
           "num_epochs": ev.info.num_epochs, "test_images": len(ev.y_true),
           **run_scores(ev.y_true, ev.prob, len(ev.class_names), ev.info.task, ev.info.thresholds)}
    utils.atomic_write_text(done, json.dumps({"argv": key, "row": row}))
    return row


def run_scores(y_true, prob, k: int, task: str, thresholds=None) -> dict:
    """Test-split metrics of one run: mean ROC-AUC and AP over findings (multi-label), or METRICS with the
    calibration of its probabilities, ECE and Brier score (one label)."""
    if task == "multilabel":
        scores = compute_multilabel_metrics(y_true, prob, thresholds, 0, 0)
        return {m: float(scores[m]["value"]) for m in MULTILABEL_METRICS}
    scores = compute_metrics(y_true, prob, k, resamples=0, seed=0)
    return {**{m: float(scores[m]["value"]) for m in METRICS}, "ece": calibration.ece(y_true, prob, False),
            "brier": calibration.brier_score(y_true, prob)}


def probe_frozen_features(args, data_dir, label_file, ssl_path) -> list:
    """The right-reason check: a linear probe on frozen features, fitted on the same labelled subsets
    as the fine-tuning runs and scored on the test split, for the SSL encoder and for the same network
    at its random initialisation. SSL features that beat random ones learned something about the
    classes without labels; seconds of work next to the fine-tuning runs."""
    from argparse import Namespace

    import torch

    ckpt = checkpoints.SSLCheckpoint.load(ssl_path, "--ssl_checkpoint")
    table = label_tables.load_label_table(label_file, data_dir, seed=ckpt.split_seed)
    train, val, test = table.indices("train"), table.indices("val"), table.indices("test")   # all sorted
    files = [table.filenames[i] for i in np.r_[train, val, test]]
    device = utils.resolve_device(args.device)
    enc_args = Namespace(data_dir=data_dir, cache_gb=4.0, num_workers=0, batch_size=128)
    torch.manual_seed(0)
    encoders = {"random init": scoring.ssl_encoder(ckpt, ssl_path, pretrained=False),
                "ssl": scoring.ssl_encoder(ckpt, ssl_path)}
    results = []
    for name, encoder in encoders.items():
        features = scoring.encode_images(encoder.eval(), files, ckpt, enc_args, device, None)
        train_x, val_x, test_x = np.split(features, [len(train), len(train) + len(val)])
        for fraction in args.fractions:
            for seed in args.seeds:   # the very subset fine_tune.py draws for this fraction and seed
                if table.task == "multilabel":
                    results.append({"features": name, "fraction": fraction, "seed": seed,
                                    **multilabel_probe(table, train, test, train_x, test_x, fraction, seed)})
                    continue
                subset = data_splits.stratified_subset(table.labels, train, fraction, seed)
                probe = probes.fit_linear_probe(train_x[np.searchsorted(train, subset)], table.labels[subset],
                                                  test_x, table.num_classes, seed, [], val_x, table.labels[val])
                results.append({"features": name, "fraction": fraction, "seed": seed, "C": probe.C,
                                **run_scores(table.labels[test], probe.prob, table.num_classes, table.task)})
    return results


def multilabel_probe(table, train, test, train_x, test_x, fraction: float, seed: int) -> dict:
    """One logistic regression per finding on standardised frozen features of fine_tune.py's labelled subset
    (ignored cells left out), scored on the test split: mean ROC-AUC and AP over the findings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    subset = data_splits.iterative_stratified_subset(table.labels, train, fraction, seed)
    fit_x, fit_y = train_x[np.searchsorted(train, subset)], table.labels[subset]
    scaler = StandardScaler().fit(fit_x)
    prob = np.full((len(test), table.num_classes), 0.5)
    for k in range(table.num_classes):
        counted = fit_y[:, k] >= 0
        if len(np.unique(fit_y[counted, k])) == 2:   # iterative stratification keeps a positive; a negative too?
            probe = LogisticRegression(max_iter=2000, random_state=seed)
            prob[:, k] = probe.fit(scaler.transform(fit_x[counted]), fit_y[counted, k]).predict_proba(
                scaler.transform(test_x))[:, 1]
    scores = compute_multilabel_metrics(table.labels[test], prob, np.full(table.num_classes, 0.5), 0, 0)
    return {m: float(scores[m]["value"]) for m in MULTILABEL_METRICS}


def mean_sd(values) -> str:
    """'0.663 ± 0.050': mean ± sample standard deviation over seeds ('0.663' for one seed)."""
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def summarise_probe(results: list, path_csv: str) -> list:
    import pandas as pd

    df = pd.DataFrame(results)
    utils.atomic_write_text(path_csv, df.to_csv(index=False))
    g = df.groupby(["fraction", "features"])
    shown = ("mean_auc", "mean_ap") if "mean_auc" in df else ("balanced_accuracy", "roc_auc_macro", "brier")
    lines = ["", "Linear probe on frozen features, same labelled subsets, test split (mean ± sample standard "
             "deviation over seeds; one-label files: L2 strength C chosen by val log-loss per run, see probe.csv):", "",
             "| label fraction | features | runs | " + " | ".join(shown) + " |", "|---|---|---|" + "---|" * len(shown)]
    for (fraction, name), part in g:
        lines.append(f"| {fraction:g} | {name} | {len(part)} | " + " | ".join(mean_sd(part[m]) for m in shown) + " |")
    return lines


def run_epochs(df, num_epochs: int):
    """Each run's epoch count: recorded per run (--ft_steps makes it depend on the fraction), else num_epochs."""
    return df.num_epochs.fillna(num_epochs) if "num_epochs" in df else num_epochs


def convergence_warnings(df, num_epochs: int) -> list:
    """Lines for method x fraction groups whose val selection metric first reached its best in the last 10% of
    the epochs: those runs were still improving, and a baseline stopped while still improving is a crippled
    baseline. A later best epoch that only tied it and won on val loss is a plateau, not counted (runs scored
    before `level_from_epoch` was recorded count by their best epoch)."""
    reached = df.level_from_epoch.fillna(df.best_epoch) if "level_from_epoch" in df else df.best_epoch
    late = df[fine_tune.peaked_late(reached, run_epochs(df, num_epochs))].groupby(["fraction", "method"]).size()
    return [f"- warning: {n} of {len(df[(df.fraction == f) & (df.method == m)])} {m} runs at {f:g} peaked on val in "
            f"the last 10% of their epochs and may still be improving: rerun with more --ft_steps"
            for (f, m), n in late.items()]


def seed_interval(values) -> dict:
    """Mean over seeds, sample standard deviation (ddof=1) and the 95% t-interval of the mean (scipy.stats.t);
    NaN where fewer than two seeds give a value."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    out = {"seeds": len(v), "mean": float(v.mean()) if len(v) else float("nan"), "sd": float("nan"),
           "low": float("nan"), "high": float("nan")}
    if len(v) >= 2:
        out["sd"] = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(v) - 1)) * out["sd"] / np.sqrt(len(v))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def sign_test(diff) -> dict:
    """SSL ahead in k of the n seeds that differ (ties left out) and the exact two-sided sign test's p
    (scipy.stats.binomtest, p = 1/2): how surprising k of n would be if SSL were no better than scratch."""
    from scipy import stats

    diff = np.asarray(diff, dtype=np.float64)
    ahead, differ = int((diff > 0).sum()), int((diff != 0).sum())
    p = float(stats.binomtest(ahead, differ, 0.5).pvalue) if differ else float("nan")
    return {"ahead": ahead, "differ": differ, "seeds": len(diff), "p": p}


def seed_gains(df, metric: str):
    """Per seed, SSL - scratch on `metric` (both methods share the seed's labelled subset); None when absent."""
    paired = df.pivot_table(index="seed", columns="method", values=metric)
    if not {"ssl", "scratch"} <= set(paired.columns):
        return None
    diff = (paired["ssl"] - paired["scratch"]).dropna()
    return None if diff.empty else diff


def labels_used(df) -> str:
    """'18 train labels + 121 val labels chose the epoch' for a fraction's runs; '' for rows without counts."""
    if not {"train_labels", "val_labels"} <= set(df) or df[["train_labels", "val_labels"]].isna().any().any():
        return ""
    train, val = sorted(set(df.train_labels.astype(int))), sorted(set(df.val_labels.astype(int)))
    span = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"   # noqa: E731
    return f"{span(train)} train labels + {span(val)} val labels chose the epoch"


def gain_line(frac: float, part, metrics: tuple) -> tuple:
    """(the summary.md line, gains.csv rows) of SSL - scratch at one fraction: the gain metric, the second
    metric beside it, each with its 95% t-interval over seeds, and the sign test on the gain metric."""
    labels = labels_used(part)
    head = f"- {frac:g}" + (f" ({labels})" if labels else "") + ": SSL - scratch "
    cells, records = [], []
    for metric in metrics[:2]:
        diff = seed_gains(part, metric)
        if diff is None:
            continue
        gain, signs = seed_interval(diff), sign_test(diff)
        ci = f" [{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}]" if np.isfinite(gain["low"]) else ""
        cells.append((metric, diff, f"{METRIC_NAMES[metric]} {100 * gain['mean']:+.1f} points{ci}", signs))
        records.append({"fraction": frac, "metric": metric, "gain_mean": gain["mean"], "gain_sd": gain["sd"],
                        "gain_ci95_low": gain["low"], "gain_ci95_high": gain["high"], "seeds": gain["seeds"],
                        "ssl_ahead": signs["ahead"], "seeds_differing": signs["differ"], "sign_test_p": signs["p"]})
    if not cells:
        return "", []
    metric, diff, first, signs = cells[0]
    beside = f" ({cells[1][2]})" if len(cells) > 1 else ""
    p = f"; two-sided sign test p = {signs['p']:.3f}" if np.isfinite(signs["p"]) else ""
    return (head + first + beside + f"; SSL ahead in {signs['ahead']} of {signs['seeds']} seeds (per seed: "
            f"{', '.join(f'{100 * d:+.1f}' for d in diff)}{p})"), records


def summary_table(df, metrics: tuple):
    """summary.csv's frame (per fraction and method: runs, labels, and per metric the mean, sample SD and 95%
    t-interval over seeds) and summary.md's table (mean ± sample SD)."""
    import pandas as pd

    records = []
    for (fraction, method), part in df.groupby(["fraction", "method"]):
        record = {"fraction": fraction, "method": method, "runs": len(part)}
        for m in metrics:
            stats = seed_interval(part[m])
            record |= {f"{m}_mean": stats["mean"], f"{m}_sd": stats["sd"], f"{m}_ci95_low": stats["low"],
                       f"{m}_ci95_high": stats["high"]}
        records.append(record)
    lines = ["| label fraction | method | runs | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for (fraction, method), part in df.groupby(["fraction", "method"]):
        lines.append(f"| {fraction:g} | {method} | {len(part)} | " + " | ".join(mean_sd(part[m]) for m in metrics)
                     + " |")
    return pd.DataFrame(records), lines


def summarise(rows: list, path_csv: str, path_md: str, extra: list = (), num_epochs: int = 0,
              metrics: tuple = METRICS) -> list:
    import pandas as pd

    df = pd.DataFrame(rows)
    metrics = tuple(metrics) + tuple(m for m in PROBABILITY_METRICS if m in df)
    summary, lines = summary_table(df, metrics)
    utils.atomic_write_text(path_csv, summary.to_csv(index=False))
    gains, records = [], []
    for frac, part in df.groupby("fraction"):
        line, rec = gain_line(frac, part, metrics)
        gains += [line] if line else []
        records += rec
    if records:
        utils.atomic_write_text(os.path.join(os.path.dirname(path_csv), "gains.csv"),
                                pd.DataFrame(records).to_csv(index=False))
    chosen = []
    if "best_epoch" in df and df.best_epoch.notna().all():     # rows kept from before best_epoch was recorded lack it
        runs = df.assign(run_epochs=run_epochs(df, num_epochs)).groupby(["fraction", "method"])
        epochs = runs[["best_epoch", "run_epochs"]].median()
        chosen = ["", "Epoch chosen on val:", *[f"- {f:g} {m}: median best epoch {r.best_epoch:g} of {r.run_epochs:g}"
                                                for (f, m), r in epochs.iterrows()],
                  *convergence_warnings(df, num_epochs)]
    head = ["Test split, mean ± sample standard deviation (ddof=1) over seeds"
            + ("; ECE and Brier score: lower is better" if "brier" in df else "") + ".", ""]
    out = head + lines + ["", f"Gain of SSL initialisation in {METRIC_NAMES[metrics[0]]} (points; per seed SSL - "
                                f"scratch on the same labelled subset, mean and 95% t-interval over seeds):",
                          *gains, "", gain_caveat(df.seed.nunique()), *chosen, *extra]
    utils.atomic_write_text(path_md, "\n".join(out) + "\n")
    return out


def gain_caveat(seeds: int) -> str:
    return (f"The interval and the sign test cover the spread over seeds (labelled subset and fine-tuning "
            f"randomness) for this one pretraining and this one test split. With {seeds} seed(s) the smallest "
            f"possible two-sided sign-test p is {2 * 0.5 ** seeds:.3g}: SSL ahead in every seed is not by itself "
            f"significant below 6 seeds.")


def plot(rows: list, path: str, metrics: tuple = METRICS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for ax, metric in zip(axes, metrics):
        for method, colour in (("ssl", "tab:blue"), ("scratch", "tab:orange")):
            part = df[df.method == method].groupby("fraction")[metric]
            mean, std = part.mean(), part.std(ddof=1).fillna(0)
            ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=4, color=colour,
                        label="SSL init" if method == "ssl" else "from scratch")
        ax.set_xscale("log")
        fractions = sorted(df.fraction.unique())
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled fraction of the train split")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Label efficiency on the held-out test split (mean ± sample SD over seeds)")
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def main(args):
    import pandas as pd

    utils.resolve_device(args.device)          # a wrong --device fails now, not after writing the data
    utils.check_flags(args, get_args_parser())    # --fractions, --seeds: before data and pretraining, not after
    utils.check_split_shares(args.val_fraction, args.test_fraction)
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir, label_file = prepare_data(args)
    ssl_path = pretrain(args, data_dir, label_file)
    probe = summarise_probe(probe_frozen_features(args, data_dir, label_file, ssl_path),
                            os.path.join(args.output_dir, "probe.csv"))
    if args.probe_only:
        print("\n".join(probe))
        return
    rows = []
    for fraction in args.fractions:
        for seed in args.seeds:
            for method in args.methods:
                rows.append(finetune_and_score(args, data_dir, label_file, ssl_path, method, fraction, seed))
                print(rows[-1], flush=True)
                utils.atomic_write_text(os.path.join(args.output_dir, "results.csv"),
                                        pd.DataFrame(rows).to_csv(index=False))
    metrics = MULTILABEL_METRICS if is_multilabel(args, label_file) else METRICS
    lines = summarise(rows, os.path.join(args.output_dir, "summary.csv"), os.path.join(args.output_dir, "summary.md"),
                      probe, args.ft_epochs or 0, metrics)
    plot(rows, os.path.join(args.output_dir, "label_efficiency.png"), metrics)
    print("\n".join(lines))


class _RecipeHelp:
    """Help for a flag whose default is the --recipe's value in `script`: names both recipes' values."""

    def __init__(self, script):
        self.tuned, self.parser = script.TUNED, script.get_args_parser()

    def __call__(self, text: str, flag: str) -> str:
        tuned = recipes.recipe_text(self.tuned.get(flag, self.parser.get_default(flag)))
        return f"{text} (default: the --recipe's, tuned {tuned}, spec {self.parser.get_default(flag)})"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--recipe", default="tuned", choices=recipes.RECIPE_NAMES,
                   help="the recipe both scripts run (train_ssl.py / fine_tune.py --recipe): tuned, the measured one; "
                        "spec, the scripts' defaults (the seed README's table). The flags below override single "
                        "values; --ssl_epochs and --ft_steps (or --ft_epochs) are always passed. Give each recipe its own "
                        "--output_dir to keep both")
    p.add_argument("--data_dir", default="./data/label_efficiency", help="dataset folder (created if empty)")
    p.add_argument("--npz", default=None,
                   help="import this MedMNIST .npz (e.g. breastmnist.npz: README) into --data_dir instead of synthetic data")
    p.add_argument("--multi_label", action="store_true",
                   help="synthetic data with several findings per image (data_loader.py --multi_label); the runs "
                        "are scored by mean ROC-AUC over the findings (also automatic for a multi-label --npz)")
    p.add_argument("--output_dir", default="./runs/label_efficiency", help="runs, tables and the figure")
    p.add_argument("--num_images", type=int, default=800, help="labelled synthetic images (the quick start's data)")
    p.add_argument("--num_unlabeled", type=int, default=800,
                   help="extra unlabelled synthetic images (pretraining only; the quick start's data)")
    p.add_argument("--val_fraction", type=float, default=0.15,
                   help="synthetic data: val share of the patients, written as labels.csv's split column")
    p.add_argument("--test_fraction", type=float, default=0.4,
                   help="synthetic data: test share of the patients (0.4 of 800: 318 test images, so that one seed's "
                        "10-point difference is resolvable; 0.15 and --num_images 500: the older tables' split)")
    p.add_argument("--data_seed", type=int, default=42, help="seed of the synthetic data")
    p.add_argument("--image_size", type=int, default=64, help="resolution for every phase")
    p.add_argument("--ssl_epochs", type=int, default=32,
                   help="pretraining epochs (the quick start's 32 on its 1,282 non-test images: docs/performance.md)")
    ssl, ft = _RecipeHelp(train_ssl), _RecipeHelp(fine_tune)
    p.add_argument("--ssl_batch_size", type=int, default=None, help=ssl("pretraining batch (images)", "batch_size"))
    p.add_argument("--ssl_optimizer", default=None, choices=["adam", "lars"],
                   help=ssl("pretraining optimizer", "optimizer"))
    p.add_argument("--ssl_lr", type=float, default=None, help=ssl("pretraining learning rate", "lr"))
    p.add_argument("--ssl_compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train_ssl.py --compile: torch.compile the pretraining step (1.6x faster on a 2-core bf16 "
                        "CPU, no faster on an fp32 one; needs a C++ compiler there, else it trains uncompiled with a warning)")
    p.add_argument("--ssl_cuda_graphs", default="auto", choices=["auto", "on", "off"],
                   help="train_ssl.py --cuda_graphs: on replays each pretraining step from a CUDA graph")
    p.add_argument("--temperature", type=float, default=None, help=ssl("NT-Xent temperature", "temperature"))
    p.add_argument("--crop_min_scale", type=float, default=None,
                   help=ssl("pretraining crop: smallest area fraction", "crop_min_scale"))
    p.add_argument("--ssl_rotation", type=float, default=None,
                   help=ssl("pretraining rotation range in degrees (docs/results.md)", "rotation"))
    p.add_argument("--jitter", type=float, default=None,
                   help=ssl("pretraining brightness and contrast strength", "jitter"))
    p.add_argument("--gamma", type=float, default=None,
                   help=ssl("pretraining random gamma strength (0: off; 0.35 spans the synthetic detector's "
                            "0.75-1.35)", "gamma"))
    utils.bounded(p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1],
                                 help="labelled fractions of train (5%%: 18 synthetic images, the headline; every "
                                      "fraction run is reported)"),
                  utils.Bound(float, 0, 1, lo_open=True, hint="e.g. 0.05 for 5% of the labels"))
    utils.bounded(p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds"),
                  utils.Bound(int, 0))
    p.add_argument("--ft_steps", type=int, default=200,
                   help="fine-tuning optimizer steps (both methods; fine_tune.py --num_steps): with 18-35 labels a "
                        "step is an epoch, and from-scratch runs of 100 steps were still improving")
    p.add_argument("--ft_epochs", type=int, default=None,
                   help="fine-tuning epochs instead of --ft_steps (fine_tune.py --num_epochs)")
    p.add_argument("--ft_batch_size", type=int, default=None, help=ft("fine-tuning batch", "batch_size"))
    p.add_argument("--ft_lr", type=float, default=None, help=ft("fine-tuning learning rate (both methods)", "lr"))
    p.add_argument("--ft_rotation_fill", default=None, choices=augmentations.ROTATION_FILLS,
                   help=ft("fine-tuning (both methods): what fills the corners a rotation brings in", "rotation_fill"))
    p.add_argument("--head_prefit_steps", type=int, default=0,
                   help="SSL runs: full-batch head steps on the frozen features before fine-tuning (a linear probe "
                        "of a random encoder only hurts: scratch runs fell to chance with it)")
    p.add_argument("--freeze_epochs", type=int, default=0, help="SSL runs: epochs with the encoder frozen")
    p.add_argument("--encoder_lr_scale", type=float, default=None,
                   help=ft("SSL runs: the pretrained encoder's learning rate relative to --ft_lr once it trains",
                           "encoder_lr_scale"))
    p.add_argument("--methods", nargs="+", default=["ssl", "scratch"], choices=["ssl", "scratch"],
                   help="which initialisations to fine-tune (scratch runs do not depend on the SSL recipe)")
    p.add_argument("--ssl_checkpoint", default=None, help="reuse this pretrained checkpoint instead of pretraining")
    p.add_argument("--probe_only", action="store_true",
                   help="only the linear probes of SSL and random-init features (seconds): is a pretraining any good?")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast in every phase (auto: bf16 on GPUs and on CPUs with native bf16)")
    p.add_argument("--force", action="store_true",
                   help="pretrain and fine-tune again even where a checkpoint or a finished run's score.json exists")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
