r"""Metrics and figures for trained checkpoints, on a held-out split, with bootstrap confidence intervals.

    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --data_dir ./data/medical_images \
        --label_file ./data/medical_images/labels.csv --output_dir ./evaluation_results --num_classes 3
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth \
        --checkpoint ./checkpoints/best_baseline_model.pth --names "SSL init" "from scratch" \
        --data_dir ./data/medical_images --output_dir ./evaluation_results/ssl_vs_scratch
    python evaluate.py --checkpoint ./checkpoints/best_ssl_model.pth --data_dir ./data/medical_images \
        --output_dir ./evaluation_results/ssl_probe          # linear probe + kNN on frozen features
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --split test --bootstrap 5000
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --images ./new_scans \
        --output_dir ./predictions                          # no labels: predictions.csv, summary.md, gradcam.png
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --export onnx --output_dir ./export \
        --data_dir ./data/medical_images                    # model.onnx for onnxruntime (docs/export.md)

A classifier is scored on the split recorded in its checkpoint (never recomputed); an SSL checkpoint is
scored as a representation (a logistic-regression probe and a kNN fitted on the train split's frozen
features). Several --checkpoint flags add comparison.csv/.md, an overlaid ROC figure and a paired bootstrap
of the differences between the first two models, said in words at the top of the report. A classifier's
report shows Grad-CAM heat maps (the `grad-cam` package); when the data folder has findings.csv (the
synthetic generator writes it) the pointing game scores them against where the finding was drawn.
"""
import argparse
import os

import checkpoints
import folder_predictions
import gradcam
import reports
import scoring
import tasks
import tensorboard_log
import utils

INIT_NAMES = {"ssl": "SSL init", "scratch": "from scratch"}


def display_names(args, ckpts: list) -> list:
    """--names, or what each model is: "SSL init" / "from scratch" (the checkpoint's `init`), "SSL encoder" for
    a pretrained encoder; the file name is added where two models would share a name."""
    if args.names:
        return list(args.names)
    kinds = [INIT_NAMES.get(c.init if c.kind == "classifier" else None,
                            "SSL encoder" if c.kind == "ssl" else checkpoints.default_name(p))
             for p, c in zip(args.checkpoint, ckpts)]
    stems = [checkpoints.default_name(p) for p in args.checkpoint]
    stems = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{s}" if stems.count(s) > 1 else s
             for p, s in zip(args.checkpoint, stems)]
    return [f"{k} ({s})" if kinds.count(k) > 1 and k != s else k for k, s in zip(kinds, stems)]


def check_args(args) -> None:
    if args.label_file is None and args.images is None and args.export is None:
        args.label_file = os.path.join(args.data_dir, "labels.csv")
    if args.names and len(args.names) != len(args.checkpoint):
        raise utils.UserError(f"--names gives {len(args.names)} name(s) for {len(args.checkpoint)} --checkpoint(s); "
                              f"give one per checkpoint, in the same order")
    # --images reads no data_dir; --export reads it only when given (or the default folder exists)
    optional_data = args.images is not None or (args.export is not None and
                                                args.data_dir == get_args_parser().get_default("data_dir"))
    utils.check_flags(args, get_args_parser(), skip=("data_dir",) if optional_data else ())
    for flag, value in (("--images", args.images), ("--export", args.export)):
        if value is not None and len(args.checkpoint) != 1:
            raise utils.UserError(f"{flag} takes one classifier; give one --checkpoint, not {len(args.checkpoint)}")
    if args.images is not None and args.export is not None:
        raise utils.UserError("--images and --export are separate runs; give one of them")
    if args.images is not None and os.path.realpath(args.output_dir) == os.path.realpath(args.images):
        raise utils.UserError(f"--output_dir {args.output_dir} is the --images folder: its gradcam.png would be scored "
                              f"as a scan by the next run; choose another --output_dir (a subfolder is fine)")
    if args.tensorboard:
        if args.images is not None or args.export is not None:
            raise utils.UserError("--tensorboard adds a scored split's embeddings to TensorBoard's projector; leave "
                                  "it out with --images or --export")
        tensorboard_log.summary_writer_class()


def export_model(args):
    """--export onnx: OUT/model.onnx, checked against PyTorch on the recorded test split when the data is here."""
    import export_onnx

    export_onnx.require_onnx()
    path = args.checkpoint[0]
    ckpt = checkpoints.read_checkpoint(path, ("classifier", "ssl"))
    if ckpt.kind != "classifier":
        raise utils.UserError(f"--checkpoint {path}: is an SSL encoder, which predicts no class; export the "
                              f"classifier fine_tune.py wrote (best_finetuned_model.pth or best_baseline_model.pth)")
    data_dir = args.data_dir if os.path.isdir(args.data_dir) else None
    return export_onnx.export(ckpt, args.output_dir, data_dir, args.cache_gb)


@utils.locks_output_dir(check_args, "evaluate")
def main(args):
    device = utils.resolve_device(args.device)
    autocast_dtype, precision = utils.resolve_precision(args.precision, args.amp, device)
    if args.export is not None:
        utils.print_settings("evaluate: export", {"checkpoint": args.checkpoint[0], "export": args.export,
                                                  "output_dir": args.output_dir, "data_dir": args.data_dir})
        return export_model(args)
    if args.images is not None:
        utils.print_settings("evaluate: predictions for a folder", {
            "checkpoint": args.checkpoint[0], "images": args.images, "output_dir": args.output_dir,
            "batch_size": args.batch_size, "device": str(device), "precision": precision})
        return folder_predictions.predict_folder(args, device, autocast_dtype)
    ckpts = [checkpoints.read_checkpoint(p, ("classifier", "ssl")) for p in args.checkpoint]
    names = display_names(args, ckpts)
    settings = {"checkpoints": args.checkpoint, "names": names, "data_dir": args.data_dir,
                "label_file": args.label_file, "output_dir": args.output_dir, "split": args.split,
                "bootstrap": args.bootstrap, "batch_size": args.batch_size, "seed": args.seed,
                "device": str(device), "precision": precision}
    utils.print_settings("evaluate", settings)
    utils.seed_everything(args.seed)

    # ============ predictions ============
    evaluated = []
    for path, ckpt, name in zip(args.checkpoint, ckpts, names):
        evaluated += scoring.evaluate_checkpoint(path, name, args, device, autocast_dtype, ckpt)
    del ckpts

    # ============ metrics with bootstrap intervals, files and figures ============
    result = reports.report(evaluated, tasks.of_models(evaluated), args, device, settings)
    if args.tensorboard:
        folders = tensorboard_log.write_projectors(evaluated, reports.folder_names(evaluated), args.data_dir,
                                                   args.output_dir)
        print(f"TensorBoard projector: {len(folders)} model(s); view with: tensorboard --logdir {args.output_dir}")
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter, parents=[utils.common_parser()])
    utils.bounded(p.add_argument("--checkpoint", action="append", required=True,
                                 help="a classifier (best_finetuned_model.pth, best_baseline_model.pth) or SSL "
                                      "checkpoint (best_ssl_model.pth); repeat the flag to compare several side by "
                                      "side"), utils.EXISTING_FILE)
    utils.bounded(p.add_argument("--data_dir", default="./data/medical_images",
                                 help="folder the label file's paths are relative to, or its prepared copy "
                                      "(data_loader.py --prepare)"), utils.EXISTING_DIR)
    utils.bounded(p.add_argument("--label_file", default=None,
                                 help="CSV filename,label[,split][,patient_id]; None means <data_dir>/labels.csv"),
                  utils.EXISTING_FILE)
    utils.bounded(p.add_argument("--output_dir", default="./evaluation_results",
                                 help="folder for metrics, figures and report.md"), utils.OUTPUT_DIR)
    utils.bounded(p.add_argument("--num_classes", type=int, default=None,
                                 help="expected number of classes; an error if a classifier checkpoint has another "
                                      "count"), utils.Bound(int, 2, 10_000))
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each model's embeddings with image thumbnails for TensorBoard's projector, "
                        "under OUTPUT_DIR/tensorboard/<model> (needs `pip install tensorboard`)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="images to score; for a classifier, the split recorded in its checkpoint")
    utils.bounded(p.add_argument("--bootstrap", type=int, default=2000,
                                 help="bootstrap resamples of the patients (images without patient ids) for the 95%% "
                                      "confidence intervals; below 200 no percentile interval is given (0: none)"),
                  utils.Bound(int, 0, 100_000, hint="resamples; 0 for no intervals"))
    utils.bounded(p.add_argument("--batch_size", type=int, default=64, help="images per forward pass"),
                  utils.Bound(int, 1, 1 << 16))
    p.add_argument("--names", nargs="+", default=None,
                   help="display names, one per --checkpoint in order (default: what each model is, from the "
                        "checkpoint: 'SSL init', 'from scratch', 'SSL encoder')")
    utils.bounded(p.add_argument("--images", default=None,
                                 help="score every readable image under this folder (PNG, JPEG, BMP, TIFF, DICOM; no "
                                      "label file) with one classifier: predictions.csv, summary.md and gradcam.png "
                                      "in --output_dir"), utils.EXISTING_DIR)
    p.add_argument("--export", default=None, choices=["onnx"],
                   help="write the classifier as <output_dir>/model.onnx (normalisation, temperature and softmax or "
                        "sigmoids inside; docs/export.md), checked with onnxruntime on the recorded test split "
                        "under --data_dir when that folder exists, else on random images; needs "
                        "requirements-export.txt")
    p.add_argument("--gradcam", action=argparse.BooleanOptionalAction, default=True,
                   help="Grad-CAM heat maps (gradcam.png) and, when the data folder has findings.csv, the "
                        "pointing game")
    p.add_argument("--cam_layer", default="auto", choices=("auto",) + gradcam.CAM_LAYERS,
                   help="ResNet stage Grad-CAM reads; auto: the deepest whose map is at least 7 cells a side "
                        "(layer4 at 224 px, layer2 at 64 px)")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
