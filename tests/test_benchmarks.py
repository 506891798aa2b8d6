"""benchmarks/label_efficiency.py end to end at toy size: one pretraining, both methods, the table and
figure, and an interrupted benchmark that goes on without redoing finished runs; the other benchmarks'
smoke runs."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import fine_tune  # noqa: E402
import label_efficiency  # noqa: E402
import utils  # noqa: E402
from tiny_data import write_tiny_dataset  # noqa: E402


def run(data, out, *extra):
    argv = ["--data_dir", data, "--output_dir", out, "--image_size", "32", "--ssl_epochs", "1",
            "--ssl_batch_size", "16", "--ft_epochs", "1", "--freeze_epochs", "0", "--fractions", "0.5",
            "--seeds", "0", "--device", "cpu", "--no-ssl_compile", *extra]
    label_efficiency.main(label_efficiency.get_args_parser().parse_args(argv))


def test_label_efficiency_writes_its_table_and_figure_and_resumes(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", n=48, size=32, splits=(30, 9))
    out = str(tmp_path / "runs")
    run(data, out)
    results = pd.read_csv(os.path.join(out, "results.csv"))
    assert sorted(results.method) == ["scratch", "ssl"] and set(results.test_images) == {9}
    assert results[["accuracy", "roc_auc_macro"]].apply(lambda c: c.between(0, 1)).all().all()
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| 0.5 | ssl | 1 |" in summary and "SSL - scratch balanced accuracy" in summary
    assert "of 1 seeds (per seed: " in summary                            # how many seeds SSL won, and by what
    assert set(results.val_labels) == {9} and results.train_labels.between(1, 30).all()
    assert f"({results.train_labels[0]} train labels + 9 val labels chose the epoch)" in summary
    assert results[["ece", "brier"]].notna().all().all() and "brier" in summary
    gains = pd.read_csv(os.path.join(out, "gains.csv"))
    assert list(gains.metric) == ["balanced_accuracy", "accuracy"] and gains.gain_ci95_low.isna().all()  # 1 seed
    assert set(results.best_epoch) == {1} == set(results.level_from_epoch)
    assert "0.5 scratch: median best epoch 1 of 1" in summary
    assert "1 of 1 scratch runs at 0.5 peaked on val in the last 10%" in summary     # 1 epoch: still improving
    assert os.path.getsize(os.path.join(out, "label_efficiency.png")) > 10_000
    probe = pd.read_csv(os.path.join(out, "probe.csv"))                 # the right-reason check
    assert sorted(probe.features) == ["random init", "ssl"] and probe.accuracy.between(0, 1).all()
    assert probe.brier.between(0, 2).all() and probe.ece.between(0, 1).all()
    assert "| 0.5 | ssl | 1 |" in summary.split("Linear probe")[1]

    calls, real_main = [], fine_tune.main
    monkeypatch.setattr(fine_tune, "main", lambda args: (calls.append(args.lr), real_main(args))[1])
    run(data, out)                                   # every run finished: nothing is trained again
    assert calls == [] and pd.read_csv(os.path.join(out, "results.csv")).equals(results)
    run(data, out, "--ft_lr", "0.01")                # other settings: those runs are not reused
    assert calls == [0.01, 0.01]

    only = str(tmp_path / "probe_only")                # a given checkpoint, probes only: no training at all
    run(data, only, "--probe_only", "--ssl_checkpoint", os.path.join(out, "ssl", "best_ssl_model.pth"))
    assert calls == [0.01, 0.01] and sorted(os.listdir(only)) == ["probe.csv"]

    run(data, out, "--ft_lr", "0.01", "--ssl_epochs", "2")   # another recipe: pretrain again, redo only the SSL run
    assert calls == [0.01] * 3 and len(pd.read_csv(os.path.join(out, "ssl", "ssl_history.csv"))) == 2


def test_frozen_head_ablation_scores_every_head_and_augmentation(tmp_path, capsys):
    import frozen_head_ablation

    data = write_tiny_dataset(tmp_path / "data", n=48, size=32, splits=(30, 9))
    out = str(tmp_path / "runs")
    run(data, out, "--probe_only")                   # pretrains one epoch, then only the probes
    args = frozen_head_ablation.get_args_parser().parse_args(
        ["--ssl_checkpoint", os.path.join(out, "ssl", "best_ssl_model.pth"), "--data_dir", data,
         "--label_fraction", "0.5", "--seeds", "0", "1", "--steps", "20", "--copies", "2",
         "--rotation_fill", "reflection"])
    rows = frozen_head_ablation.main(args)
    assert len(rows) == 6 and all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in rows.values())
    assert "| linear head, 2 augmented copies, rotation +-10 (reflection fill) |" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["lars", "lars_loop"])
def test_ssl_throughput_prints_its_ratios_with_the_pretraining_optimizer(optimizer):
    result = subprocess.run(
        [sys.executable, "benchmarks/ssl_throughput.py", "--device", "cpu", "--sizes", "16", "--batch_size", "8",
         "--precision", "fp32", "--steps", "2", "--warmup", "1", "--rounds", "1", "--num_workers", "0",
         "--num_images", "16", "--png_size", "32", "--optimizer", optimizer],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"optimizer {optimizer}" in result.stdout
    last = dict(kv.split("=") for kv in result.stdout.strip().splitlines()[-1].split())
    assert float(last["views_per_s_a_16"]) > 0 and 0 < float(last["ratio_b_over_a_16"])


def test_ssl_throughput_train_step_mode_prints_ratios_and_writes_its_profile_table(tmp_path, capsys):
    """Issue 23's measurement at toy size on the CPU: train_ssl.py's step with --cuda_graphs off and on
    (there without a graph) against the model alone, and the profiler's table of the step's parts."""
    import ssl_throughput

    table = tmp_path / "profile.md"
    ssl_throughput.PROFILE_ROWS.clear()
    ssl_throughput.main(ssl_throughput.get_args_parser().parse_args(
        ["--train_step", "--device", "cpu", "--sizes", "16", "--batches", "4", "--precision", "fp32",
         "--optimizer", "lars", "--steps", "1", "--rounds", "1", "--num_images", "8", "--png_size", "24",
         "--profile_md", str(table)]))
    last = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    for graphs in ("off", "on"):
        assert 0 < float(last[f"step_over_model_{graphs}_4_fp32_16"]) < 10
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 16 | 4 | fp32 |")]
    parts = [r.split(" | ")[3] for r in rows]
    assert parts == ["augmentation", "forward", "backward", "optimizer", "loss read", "whole step, --cuda_graphs on"]
    assert all(int(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows)      # operator calls counted per part


def test_label_efficiency_checks_its_fractions_before_making_data(tmp_path):
    args = label_efficiency.get_args_parser().parse_args(["--fractions", "0.05", "1.5", "--output_dir",
                                                          str(tmp_path / "out")])
    with pytest.raises(utils.UserError, match=r"--fractions 1.5: must be a number in \(0, 1\]"):
        label_efficiency.main(args)
    assert not (tmp_path / "out").exists()


def test_seed_interval_is_the_t_interval_with_the_sample_sd():
    from scipy import stats

    gains = [0.057, 0.160, 0.248, 0.132, 0.173]
    out = label_efficiency.seed_interval(gains)
    sd = np.sqrt(sum((g - np.mean(gains)) ** 2 for g in gains) / 4)             # ddof=1, by hand
    half = stats.t.ppf(0.975, 4) * sd / np.sqrt(5)
    assert out["sd"] == pytest.approx(sd) and out["sd"] > np.std(gains)        # ddof=0 is smaller
    assert (out["low"], out["high"]) == pytest.approx((np.mean(gains) - half, np.mean(gains) + half))
    assert half == pytest.approx(2.776 * sd / np.sqrt(5), rel=1e-3)           # t(0.975, 4 df), not 1.96
    one = label_efficiency.seed_interval([0.5, float("nan")])
    assert one["seeds"] == 1 and one["mean"] == 0.5 and np.isnan(one["sd"]) and np.isnan(one["low"])


def test_a_run_level_since_mid_training_is_not_warned_about_as_still_improving():
    runs = pd.DataFrame({"fraction": [0.05, 0.05], "method": ["scratch", "scratch"], "best_epoch": [198, 195],
                         "level_from_epoch": [135, 193], "num_epochs": [200, 200]})
    (line,) = label_efficiency.convergence_warnings(runs, 200)       # only the run whose metric rose late
    assert "1 of 2 scratch runs at 0.05 peaked on val in the last 10%" in line
    older = runs.drop(columns="level_from_epoch")                      # rows scored before the field existed
    assert "2 of 2" in label_efficiency.convergence_warnings(older, 200)[0]


def test_sign_test_of_k_of_n_seeds():
    assert label_efficiency.sign_test([0.1] * 5)["p"] == pytest.approx(0.0625)   # 5 of 5: not below 0.05
    assert label_efficiency.sign_test([0.1] * 6)["p"] == pytest.approx(0.03125)
    mixed = label_efficiency.sign_test([-0.07, -0.05, -0.006, 0.044, 0.06, 0.0])
    assert (mixed["ahead"], mixed["differ"], mixed["seeds"]) == (2, 5, 6) and mixed["p"] == pytest.approx(1.0)


def test_gain_line_reports_balanced_accuracy_with_its_interval_labels_and_sign_test():
    rows = []
    for seed, (ssl, scratch) in enumerate([(0.70, 0.60), (0.65, 0.50), (0.72, 0.61), (0.66, 0.60), (0.69, 0.52)]):
        for method, bal in (("ssl", ssl), ("scratch", scratch)):
            rows.append({"method": method, "seed": seed, "fraction": 0.05, "balanced_accuracy": bal,
                         "accuracy": bal + 0.02 * (method == "ssl"), "train_labels": 18, "val_labels": 121})
    line, records = label_efficiency.gain_line(0.05, pd.DataFrame(rows), label_efficiency.METRICS)
    gain = label_efficiency.seed_interval([0.10, 0.15, 0.11, 0.06, 0.17])
    assert line.startswith("- 0.05 (18 train labels + 121 val labels chose the epoch): SSL - scratch balanced "
                           f"accuracy +11.8 points [{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}] (accuracy "
                           "+13.8 points [")
    assert ("SSL ahead in 5 of 5 seeds (per seed: +10.0, +15.0, +11.0, +6.0, +17.0; two-sided sign test "
            "p = 0.062)") in line
    assert [r["metric"] for r in records] == ["balanced_accuracy", "accuracy"]
    assert records[0]["gain_ci95_low"] == pytest.approx(gain["low"]) and records[0]["sign_test_p"] == 0.0625


def test_brier_score_by_hand():
    import calibration

    prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # image 0 (class 0): 0.3^2 + 0.2^2 + 0.1^2 = 0.14; image 1 (class 1): 0.1^2 + 0.9^2 + 0.8^2 = 1.46
    assert calibration.brier_score(np.array([0, 1]), prob) == pytest.approx(0.8)
    assert calibration.brier_score(np.array([2]), np.eye(3)[[2]]) == 0.0
