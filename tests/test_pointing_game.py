"""Grad-CAM checked against where the finding is: the pointing game of evaluate.py on images whose finding
box is known (findings.csv), a briefly trained classifier against chance, and its pieces by hand."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import evaluate
import fine_tune
import gradcam
import reports
import single_label_reports

SIZE, SQUARE = 64, 16               # a 16 px square in a 64 px image: 24 px a side with the 4 px tolerance


def write_square_dataset(folder, n_per_class=48, seed=0):
    """Class 'lesion': a bright square at a random place on dark noise, its box in findings.csv; class
    'clear': the noise alone. A split column keeps 12 images per class for the test split; four consecutive
    images (two of each class) share a patient_id, so the test split holds 6 patients."""
    rng = np.random.default_rng(seed)
    labels, findings = ["filename,label,split,patient_id"], ["filename,finding,x0,y0,x1,y1"]
    for i in range(n_per_class * 2):
        lesion = i % 2 == 1
        image = rng.integers(0, 90, (SIZE, SIZE)).astype(np.uint8)
        name = f"img{i:03d}.png"
        if lesion:
            x0, y0 = rng.integers(0, SIZE - SQUARE + 1, 2)
            image[y0:y0 + SQUARE, x0:x0 + SQUARE] = rng.integers(200, 256, (SQUARE, SQUARE))
            findings.append(f"{name},lesion,{x0},{y0},{x0 + SQUARE},{y0 + SQUARE}")
        Image.fromarray(image).save(os.path.join(folder, name))
        split = "train" if i < 2 * (n_per_class - 18) else "val" if i < 2 * (n_per_class - 12) else "test"
        labels.append(f"{name},{'lesion' if lesion else 'clear'},{split},p{i // 4}")
    (folder / "labels.csv").write_text("\n".join(labels) + "\n")
    (folder / "findings.csv").write_text("\n".join(findings) + "\n")


@pytest.fixture(scope="module")
def pointing(tmp_path_factory):
    root = tmp_path_factory.mktemp("pointing")
    data = root / "data"
    data.mkdir()
    write_square_dataset(data)
    fine_tune.main(fine_tune.get_args_parser().parse_args([
        "--data_dir", str(data), "--label_file", str(data / "labels.csv"), "--output_dir", str(root),
        "--image_size", str(SIZE), "--batch_size", "30", "--num_epochs", "6", "--lr", "0.002",
        "--device", "cpu", "--precision", "fp32", "--seed", "0"]))
    out = root / "eval"
    args = evaluate.get_args_parser().parse_args([
        "--checkpoint", str(root / "best_baseline_model.pth"), "--data_dir", str(data), "--output_dir", str(out),
        "--bootstrap", "200", "--device", "cpu", "--precision", "fp32"])
    with pytest.MonkeyPatch.context() as mp:       # the other figures are tested elsewhere and cost seconds
        mp.setattr(reports, "embedding_projections", lambda evaluated, seed: {e.checkpoint: {} for e in evaluated})
        mp.setattr(single_label_reports.SingleLabelReports, "write_figures", lambda *a, **k: {})
        return evaluate.main(args), out


def test_a_trained_model_points_at_the_finding_far_more_often_than_chance(pointing):
    result, out = pointing
    rows = {r["model"]: r for r in result["pointing"]}
    trained = rows["from scratch"]
    assert trained["images"] == 12 and 0.10 < trained["chance"] <= (SQUARE + 8) ** 2 / SIZE ** 2
    assert trained["layer"] == "layer2"                      # 8x8 cells at 64 px; layer4 would be 2x2
    # at chance (0.14 at most) 12 images give 7 or more hits with probability 3e-4; the model trained here
    # points at the square in 12 of 12
    assert trained["hits"] >= 9, trained
    assert trained["low"] > 2 * trained["chance"]
    assert "random init" in rows and 0 <= rows["random init"]["value"] <= 1
    # squares at random places: another image's box is rarely where this map points
    assert trained["permutation_baseline"] < 0.5 and trained["above_baseline"]["low"] > 0.3
    assert trained["unit"] == "patient" and trained["units"] == 6         # 2 lesion images per patient
    assert trained["nonblank"]["images"] == 12 - trained["blank_maps"]
    paired = rows["random init"]["paired_with_first"]
    assert paired["model_a"] == "from scratch" and paired["value"] == pytest.approx(
        trained["value"] - rows["random init"]["value"]) and paired["low"] > 0
    report = (out / "report.md").read_text()
    assert "## Grad-CAM pointing game" in report and "| from scratch | layer2 |" in report
    assert "permutation baseline" in report and "- from scratch - random init: +" in report
    assert "over the 6 patients" in report
    assert "](pointing_game.png)" in report and (out / "pointing_game.png").stat().st_size > 5000
    assert json.loads((out / "pointing_game.json").read_text())[0]["model"] == "from scratch"
    assert (out / "gradcam.png").stat().st_size > 5000


def test_pointing_hits_by_hand():
    cams = np.zeros((3, 8, 8))
    cams[0, 1, 1] = 1.0                                       # peak in the top-left cell
    cams[1, 6, 6] = 1.0                                       # peak bottom right
    boxes = [[(0, 0, 4, 4)], [(0, 0, 4, 4), (10, 10, 16, 16)], [(0, 0, 16, 16)]]
    hits, chance, blank = gradcam.pointing_hits(cams, boxes, [(16, 16)] * 3, tolerance=0)
    # image 1's peak cell (6, 6) covers pixels 12-13 of 16: inside the second box; image 2's map is blank
    assert hits.tolist() == [True, True, False] and blank.tolist() == [False, False, True]
    np.testing.assert_allclose(chance, [16 / 256, 52 / 256, 1.0])
    cams[0] = 0
    cams[0, 2, 2] = 1.0                                       # the cell's centre, pixel 5: outside the 0-3 box
    assert not gradcam.pointing_hits(cams[:1], boxes[:1], [(16, 16)], tolerance=0)[0][0]
    hits, chance, _ = gradcam.pointing_hits(cams[:1], boxes[:1], [(16, 16)], tolerance=2 / 16)   # 2 px wider
    assert hits[0] and chance[0] == pytest.approx(36 / 256)


@pytest.mark.parametrize("size,small,layer", [(224, False, "layer4"), (64, False, "layer2"), (32, True, "layer3"),
                                              (128, False, "layer3")])
def test_cam_layer_is_the_deepest_with_a_usable_map(size, small, layer):
    from model_ssl import ModelConfig
    assert gradcam.cam_layer_name(ModelConfig(small_stem=small), size) == layer


def test_permutation_baseline_by_hand():
    cams = np.zeros((4, 8, 8))
    cams[0, 1, 1] = cams[1, 1, 1] = cams[2, 6, 6] = 1.0       # peaks: top left, top left, bottom right; 3 blank
    boxes = [[(0, 0, 4, 4)], [(12, 12, 16, 16)], [(0, 0, 4, 4)], [(0, 0, 16, 16)]]
    classes = [0, 0, 0, 1]
    baseline = gradcam.permutation_baseline(cams, boxes, [(16, 16)] * 4, classes, tolerance=0)
    # image 0's peak (pixel 2) against images 1 and 2's boxes: misses 1, hits 2; image 1's against 0 and 2:
    # hits both; image 2's (pixel 13) against 0 and 1: hits 1 only; image 3 has no other image of its class
    np.testing.assert_allclose(baseline[:3], [0.5, 1.0, 0.5])
    assert np.isnan(baseline[3])
    cams[1] = 0                                               # a blank map scores 0 against every other box
    assert gradcam.permutation_baseline(cams, boxes, [(16, 16)] * 4, classes, tolerance=0)[1] == 0


def test_a_map_that_points_where_the_class_usually_is_does_not_beat_the_permutation_baseline():
    """Findings of a class always drawn in the same place: a map that ignores the image and points there hits
    every time, far above the area share, and exactly as often as the permutation baseline."""
    n = 20
    cams = np.zeros((n, 8, 8))
    cams[:, 4, 4] = 1.0                                       # always the centre
    boxes = [[(6, 6, 11, 11)]] * n
    hits, chance, blank = gradcam.pointing_hits(cams, boxes, [(16, 16)] * n, tolerance=0)
    baseline = gradcam.permutation_baseline(cams, boxes, [(16, 16)] * n, [0] * n, tolerance=0)
    scores = gradcam.pointing_scores(hits, baseline, blank, None, 200, 0)
    assert scores["value"] == 1.0 and chance.mean() < 0.1
    assert scores["permutation_baseline"] == 1.0 and scores["above_baseline"]["value"] == 0.0


def test_whole_patients_are_resampled_and_widen_the_interval():
    """Three identical images per patient carry one patient's information: resampled as images the interval
    is too narrow; resampled by patient it is as wide as that of the patients themselves."""
    rng = np.random.default_rng(0)
    per_patient = rng.random(30) < 0.5
    hits, groups = np.repeat(per_patient, 3), np.repeat(np.arange(30), 3)
    by_image = gradcam.mean_with_ci(hits, 2000, 0)
    by_patient = gradcam.mean_with_ci(hits, 2000, 0, groups)
    patients = gradcam.mean_with_ci(per_patient, 2000, 0)
    width = {k: v["high"] - v["low"] for k, v in [("image", by_image), ("patient", by_patient), ("one", patients)]}
    assert by_patient["value"] == by_image["value"] == per_patient.mean()
    assert width["patient"] > 1.4 * width["image"] and width["patient"] == pytest.approx(width["one"], rel=0.2)


def test_blank_maps_are_left_out_of_the_non_blank_hit_rate():
    hits = np.array([True, True, False, False, False])
    blank = np.array([False, False, False, True, True])
    scores = gradcam.pointing_scores(hits, np.full(5, 0.2), blank, None, 100, 0)
    assert scores["value"] == pytest.approx(0.4) and scores["nonblank"]["value"] == pytest.approx(2 / 3)
    assert scores["nonblank"]["images"] == 3 and scores["above_baseline"]["value"] == pytest.approx(0.2)
    none = gradcam.pointing_scores(hits[3:], np.full(2, np.nan), blank[3:], None, 100, 0)
    assert np.isnan(none["nonblank"]["value"]) and np.isnan(none["permutation_baseline"])


def test_an_all_hits_rate_gets_a_wilson_interval_not_a_zero_width_one():
    from scipy.stats import binomtest

    hits, groups = np.ones(12, bool), np.repeat(np.arange(4), 3)
    out = gradcam.rate_with_ci(hits, 200, 0, groups)
    wilson = binomtest(4, 4).proportion_ci(method="wilson")                  # over the 4 patients
    assert out["value"] == 1.0 and out["high"] == pytest.approx(1.0) and out["low"] == pytest.approx(wilson.low)
    assert out["low"] < 0.7 and "Wilson" in out["interval"]
    assert gradcam.rate_with_ci(np.zeros(12, bool), 200, 0)["high"] > 0.1  # none of 12 images
    mixed = gradcam.rate_with_ci(np.arange(12) % 2 == 0, 200, 0)
    assert "interval" not in mixed and mixed["low"] < 0.5 < mixed["high"]
