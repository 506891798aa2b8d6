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
    'clear': the noise alone. A split column keeps 12 images per class for the test split."""
    rng = np.random.default_rng(seed)
    labels, findings = ["filename,label,split"], ["filename,finding,x0,y0,x1,y1"]
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
        labels.append(f"{name},{'lesion' if lesion else 'clear'},{split}")
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
    report = (out / "report.md").read_text()
    assert "## Grad-CAM pointing game" in report and "| from scratch | layer2 |" in report
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
