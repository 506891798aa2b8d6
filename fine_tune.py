"""Supervised fine-tuning of an SSL encoder, or the same recipe from scratch (the baseline).

    python fine_tune.py --data_dir ./data/medical_images --label_file ./data/medical_images/labels.csv \\
        --ssl_checkpoint ./checkpoints/best_ssl_model.pth --freeze_encoder --unfreeze_after_epoch 25
    python fine_tune.py --data_dir ./data/medical_images --label_file ./data/medical_images/labels.csv \\
        --label_fraction 0.1                                  # baseline from scratch on 10% of the labels
    python fine_tune.py ... --recipe tuned --ssl_checkpoint ./checkpoints/best_ssl_model.pth   # the measured recipe
    python fine_tune.py ... --resume                          # continue the interrupted run
    torchrun --standalone --nproc_per_node 2 fine_tune.py --data_dir ./data/medical_images \\
        --label_file ./data/medical_images/labels.csv --ssl_checkpoint ./checkpoints/best_ssl_model.pth

An SSL-initialised run writes best_finetuned_model.pth, a from-scratch run best_baseline_model.pth
(so the original recipe's two commands, which share --output_dir, no longer overwrite each other); --output_name
overrides. Beside it: <run>_history.csv, <run>_training.png, <run>_settings.json (the settings as resolved:
device, precision and workers with the reason for each) and last_<run>_checkpoint.pth (full state for
--resume: after the first epoch, then at most every 30 s, and after the last epoch).
Training uses the train split (or its --label_fraction), the best epoch is chosen on the val split,
and the test split is never read. Under torchrun each process trains on its shard of the train split
and rank 0 alone validates and writes.
"""
import argparse
import dataclasses
import os
import sys

import numpy as np
import pandas as pd
import torch

import augmentations
import checkpoints
import data_loader
import data_splits
import distributed
import image_io
import label_tables
import optimizers
import probes
import recipes
import tasks
import training
import training_run
import utils
from checkpoints import ClassifierCheckpoint, SSLCheckpoint
from model_ssl import Classifier, ModelConfig, use_small_stem
from utils import Bound, UserError, bounded

RESUME_KEYS = ("label_fraction", "seed", "split_seed", "num_classes", "image_size", "batch_size", "freeze_encoder",
               "unfreeze_after_epoch", "frozen_steps", "ssl_checkpoint", "task", "uncertain", "pos_weight")

TUNED_STEPS = 200     # from-scratch runs with one step per epoch were still improving after 100 (docs/design.md)


# a flag that, when nonzero, sets others: a recipe value of it yields to them, and giving both is refused
SETS = {"num_steps": ("num_epochs",), "frozen_steps": ("freeze_encoder", "unfreeze_after_epoch")}


def tuned_frozen_steps(args, given):
    """with --ssl_checkpoint, the first half of --num_steps (linear probing, then fine-tuning)"""
    if not args.ssl_checkpoint or args.num_steps <= 0:
        return recipes.KEEP_DEFAULT           # nothing to freeze, or no steps to halve
    return args.num_steps // 2


# --recipe tuned: benchmarks/label_efficiency.py's measured fine-tuning (docs/results.md): a length in steps;
# mirrored corners in rotations; an SSL encoder frozen for the first half (the head learns on its features),
# then trained at a tenth of the head's learning rate
TUNED = {"lr": 1e-3, "batch_size": 32, "encoder_lr_scale": 0.1, "rotation_fill": "reflection",
         "num_steps": TUNED_STEPS, "frozen_steps": tuned_frozen_steps}


# ============ data ============

def load_ssl(args):
    """The SSL checkpoint (validated) or None for a from-scratch baseline."""
    if not args.ssl_checkpoint:
        return None
    return SSLCheckpoint.load(args.ssl_checkpoint, "--ssl_checkpoint")


def warn_if_pretraining_saw_test_images(ssl: SSLCheckpoint, table, ssl_path: str) -> list:
    """An SSL run given the label file records the test images it left out; warn (before training, as evaluate.py
    will after it) when this run's test split holds others. Returns those test images."""
    test = np.asarray(table.filenames)[table.indices("test")].tolist()
    seen = ssl.not_left_out_of(test) or []
    if seen:
        print(f"warning: {len(seen)} of the {len(test)} test images were not left out of pretraining by {ssl_path} "
              f"(first {seen[0]!r}): give train_ssl.py the same --label_file, --split_seed, --val_fraction and "
              f"--test_fraction as this run, or the evaluation's test images will not be unseen", file=sys.stderr)
    return seen


def build_data(args, ssl, runtime):
    """Label table, the labelled train subset, val indices, and loaders (train: this process's shard)."""
    table = label_tables.load_label_table(args.label_file, args.data_dir, args.task, args.uncertain, args.num_classes,
                                          seed=args.split_seed, val_fraction=args.val_fraction,
                                          test_fraction=args.test_fraction)
    if runtime.dist.is_main:
        print(label_tables.describe_table(table))
    task = tasks.of(table.task)
    task.check_table(table, args)
    train_idx = task.train_subset(table, table.indices("train"), args.label_fraction, args.seed)
    val_idx = table.indices("val")
    for name, idx in (("train", train_idx), ("val", val_idx)):
        if len(idx) == 0:
            raise UserError(f"{args.label_file}: the {name} split is empty; add images or a 'split' column")
    used = np.concatenate([train_idx, val_idx])            # the test images are never decoded here
    files = [table.filenames[i] for i in used]
    store = data_loader.ImageStore(args.data_dir, files, args.image_size, cache_gb=args.cache_gb,
                                   channels=ssl.channels if ssl else None)
    labels = table.labels[used]
    local_train, local_val = np.arange(len(train_idx)), np.arange(len(train_idx), len(used))
    pin, dist = runtime.device.type == "cuda", runtime.dist
    workers = runtime.choose_workers(args.num_workers, streaming=not store.in_memory)
    per_rank = -(-len(local_train) // dist.world_size)      # shards are padded to equal length
    train_loader = data_loader.BatchLoader(store, local_train, labels, batch_size=args.batch_size, shuffle=True,
                                           seed=args.seed, drop_last=per_rank > args.batch_size,
                                           num_workers=workers, pin_memory=pin,
                                           rank=dist.rank, world_size=dist.world_size)
    val_loader = data_loader.BatchLoader(store, local_val, labels, batch_size=args.batch_size,
                                         num_workers=workers, pin_memory=pin)
    return table, train_idx, store, train_loader, val_loader


# ============ model and optimisation ============

def build_model(args, ssl, num_classes):
    if ssl is None:
        config = ModelConfig(backbone=args.backbone, small_stem=use_small_stem(args.image_size))
        return Classifier(config, num_classes)
    config = ssl.model_config
    if config.small_stem != use_small_stem(args.image_size):
        raise UserError(f"--image_size {args.image_size} needs the {'small' if use_small_stem(args.image_size) else 'standard'} "
                        f"stem but {args.ssl_checkpoint} was pretrained with the other one at {ssl.image_size} px; "
                        f"leave --image_size out to use {ssl.image_size}")
    model = Classifier(config, num_classes)
    checkpoints.load_state_strict(model.encoder, ssl.encoder, "encoder", args.ssl_checkpoint)
    return model


def build_optimizer(args, model, steps_per_epoch, pretrained: bool):
    """AdamW; a pretrained encoder learns at lr x encoder_lr_scale, a from-scratch one at the full lr."""
    encoder_lr = args.lr * (args.encoder_lr_scale if pretrained else 1.0)
    groups = [{"params": model.head.parameters(), "lr": args.lr},
              {"params": model.encoder.parameters(), "lr": encoder_lr}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = optimizers.warmup_cosine(optimizer, 0, args.num_epochs * steps_per_epoch)
    return optimizer, scheduler


def prefit_head(model, store, train_idx, table, args, device, weights, task) -> float:
    """Train the head alone, full batch, for --head_prefit_steps on the encoder's frozen features of the
    labelled train images (no augmentation), before epoch 1. With a few dozen labels an epoch is one or
    two steps, so a freshly initialised head is still near chance when the encoder unfreezes and its
    gradients distort the features (Kumar et al. 2022, linear probing then fine-tuning). Returns the
    final training loss. Features come from the encoder in eval mode, as a frozen encoder runs."""
    loader = data_loader.BatchLoader(store, np.arange(len(train_idx)), table.labels[train_idx], batch_size=256)
    features, labels, _ = probes.extract_features(model.encoder, loader, image_io.normalize, device)
    return fit_head(model.head, features.to(device), labels.to(device), args.head_prefit_steps, args.lr,
                    args.weight_decay, weights, task)


def fit_head(head, features, labels, steps: int, lr: float, weight_decay: float, weights=None,
             task=tasks.SINGLE_LABEL) -> float:
    """`steps` full-batch AdamW steps of the task's loss on (features, labels); returns the last loss."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(steps):
        loss = task.loss(head(features), labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def supervised_augment_config(args) -> augmentations.AugmentConfig:
    """The spec's milder supervised augmentations, with the rotation from --rotation and --rotation_fill."""
    return dataclasses.replace(augmentations.SUPERVISED_AUGMENT, rotation=args.rotation, rotation_fill=args.rotation_fill)


def make_loss_fn(augment, device, weights, task):
    def loss_fn(model, batch):
        images, labels, _ = batch
        x = augment(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        logits = model(x)
        return task.loss(logits.float(), labels.to(device), weights), len(labels)
    return loss_fn


# ============ checkpoints ============

def run_names(args, pretrained: bool):
    """(checkpoint file name, short run name) such as ('best_finetuned_model.pth', 'finetuned')."""
    name = args.output_name or ("best_finetuned_model.pth" if pretrained else "best_baseline_model.pth")
    if not name.endswith(".pth"):
        name += ".pth"
    run = name[:-4].removeprefix("best_").removesuffix("_model")
    return name, run


def build_checkpoint(model, args, ssl, table, train_idx, store, epoch, val_metrics, history_file,
                     world_size) -> ClassifierCheckpoint:
    files = np.asarray(table.filenames)
    return ClassifierCheckpoint(
        model_config=model.config, num_classes=table.num_classes, class_names=list(table.class_names),
        class_display_names=label_tables.read_class_names(args.label_file, table.class_names),
        image_size=args.image_size, channels=store.channels,
        normalization={"mean": list(image_io.IMAGENET_MEAN), "std": list(image_io.IMAGENET_STD)},
        encoder=model.encoder.state_dict(), head=model.head.state_dict(), init="ssl" if ssl else "scratch",
        ssl_checkpoint=os.path.basename(args.ssl_checkpoint) if ssl else None, label_file=args.label_file,
        label_file_sha256=table.sha256, split_seed=args.split_seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, splits={s: files[table.indices(s)].tolist() for s in data_splits.SPLITS},
        train_files=files[train_idx].tolist(), label_fraction=args.label_fraction, val_metrics=val_metrics,
        history_file=history_file, epoch=epoch, num_epochs=args.num_epochs, world_size=world_size,
        args=dict(vars(args)), **tasks.of(table.task).checkpoint_entries(table, val_metrics))


@torch.no_grad()
def calibrate_best(path: str, val_loader, device, task) -> None:
    """Fit the best model's temperature on the val split and write it into `path`; a multi-label model's
    thresholds, chosen on uncalibrated val probabilities, move to the calibrated scale (the same images
    predicted). Fitted from the recorded epoch's own logits and thresholds, so running it twice changes nothing."""
    ckpt = ClassifierCheckpoint.load(path)
    model = ckpt.build_model().to(device)
    batches = list(tasks.val_batches(model, val_loader, device, None))      # float32: the fit is not autocast
    logits, labels = torch.cat([z.cpu() for z, _ in batches]), torch.cat([y for _, y in batches])
    task.calibrate(ckpt, logits, labels)
    ckpt.save(path)
    print(f"calibration: temperature {task.temperature_text(ckpt.temperature)} fitted on {len(labels)} val images "
          f"(val NLL) -> {path}")


# ============ main ============

def check_args(args) -> None:
    """Every flag checked before any work (each flag's rule, utils.bounded): one line naming the flag, value and
    range."""
    training.check_training_flags(args, get_args_parser())
    recipes.refuse_contradictions(args, SETS)
    if "unfreeze_after_epoch" in recipes.given_flags(args) and not args.freeze_encoder:
        raise UserError(f"--unfreeze_after_epoch {args.unfreeze_after_epoch} does nothing without --freeze_encoder; "
                        f"add --freeze_encoder (or give --frozen_steps instead, counted in optimizer steps)")
    if args.pos_weight != "none" and args.task == "multiclass":
        raise UserError("--pos_weight is for multi-label files; with one label per image use --class_weights")
    if args.ssl_checkpoint and 0 < args.num_steps <= args.frozen_steps:
        raise UserError(f"--frozen_steps {args.frozen_steps} is not below --num_steps {args.num_steps}: the encoder "
                        f"would never train; lower --frozen_steps (--recipe tuned freezes it for half the steps)")


def resolve_backbone(args, ssl) -> None:
    """An SSL checkpoint decides the architecture: --backbone is what the log, settings and checkpoint record,
    so it must name what trains."""
    if ssl is None:
        args.backbone = args.backbone or "resnet18"
        return
    saved = ssl.model_config.backbone
    if args.backbone not in (None, saved):
        print(f"note: --backbone {args.backbone} ignored: {args.ssl_checkpoint} holds a {saved} encoder, which is "
              f"what is fine-tuned (the checkpoint decides the architecture)")
    args.backbone = saved


def resolve_num_epochs(args, steps_per_epoch: int) -> None:
    """--num_steps N > 0: train for the epochs that hold N optimizer steps (rounded up), so a few dozen labels,
    one step an epoch, get as many updates as a large labelled set; --frozen_steps M > 0 with an SSL checkpoint:
    freeze the encoder for the epochs that hold M steps. Both recorded in value_sources."""
    sources = getattr(args, "value_sources", {})
    per_epoch = max(1, steps_per_epoch)
    if args.num_steps > 0:
        args.num_epochs = -(-args.num_steps // per_epoch)
        sources["num_epochs"] = f"--num_steps {args.num_steps} at {steps_per_epoch} step(s) per epoch"
    if args.frozen_steps > 0 and args.ssl_checkpoint:
        args.freeze_encoder, args.unfreeze_after_epoch = True, -(-args.frozen_steps // per_epoch)
        sources["unfreeze_after_epoch"] = f"--frozen_steps {args.frozen_steps} at {steps_per_epoch} step(s) per epoch"
        if args.unfreeze_after_epoch >= args.num_epochs:
            source = sources.get("frozen_steps", "flag")
            raise UserError(f"--frozen_steps {args.frozen_steps} ({source}) covers all {args.num_epochs} epoch(s) of "
                            f"{steps_per_epoch} step(s): the encoder would never train; lower --frozen_steps or "
                            f"raise {'--num_steps' if args.num_steps > 0 else '--num_epochs'}")
    args.value_sources = sources


def refuse_replacing_another_run(args, ssl, dist) -> None:
    """Before any work: a fresh run would replace the best model there, which may be another run's."""
    resume = None if args.resume in (None, "auto") else args.resume
    if (not args.resume or training_run.resumes_another_folder(resume, args.output_dir)) and dist.is_main:
        # --num_steps sets num_epochs only once the data is read: compare the steps, not those epochs
        compared = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                         if not (k == "num_epochs" and args.num_steps > 0)})
        checkpoints.refuse_replacing_another_run(os.path.join(args.output_dir, run_names(args, ssl is not None)[0]),
                                                 compared, utils.sha256_file(args.label_file), args.overwrite)


@utils.locks_output_dir(check_args, lambda args: run_names(args, bool(args.ssl_checkpoint))[1])
def main(args):
    runtime = training_run.setup_runtime(args.device, args.precision, args.amp, args.seed)
    dist, device, autocast_dtype = runtime.dist, runtime.device, runtime.autocast_dtype

    # ============ preparing data and model ============
    ssl = load_ssl(args)
    args.image_size = args.image_size or (ssl.image_size if ssl else 224)
    resolve_backbone(args, ssl)
    refuse_replacing_another_run(args, ssl, dist)
    table, train_idx, store, train_loader, val_loader = build_data(args, ssl, runtime)
    if ssl is not None and dist.is_main:
        warn_if_pretraining_saw_test_images(ssl, table, args.ssl_checkpoint)
    resolve_num_epochs(args, len(train_loader))
    model = build_model(args, ssl, table.num_classes).to(device).to(memory_format=torch.channels_last)
    model = distributed.convert_sync_bn(model, args.sync_bn, dist)
    if args.freeze_encoder and ssl is None and dist.is_main:
        print("warning: --freeze_encoder without --ssl_checkpoint freezes a random encoder until "
              f"epoch {args.unfreeze_after_epoch}")
    optimizer, scheduler = build_optimizer(args, model, len(train_loader), pretrained=ssl is not None)
    scaler = training.make_grad_scaler(device, autocast_dtype)
    task = tasks.of(table.task)
    weights = task.loss_weights(args, table.labels[train_idx], table.num_classes, device)
    name, run = run_names(args, ssl is not None)
    paths = training_run.RunPaths.of(args.output_dir, run, name)

    resume = (paths.last if args.resume == "auto" else args.resume) if args.resume else None
    start_epoch, best, _ = training_run.resume_run(resume, "classifier", args, RESUME_KEYS, dist,
                                                   {"encoder": model.encoder, "head": model.head},
                                                   optimizer, scheduler, scaler, args.seed, table.sha256)
    if args.head_prefit_steps > 0 and start_epoch == 0:
        loss = prefit_head(model, store, train_idx, table, args, device, weights, task)
        if dist.is_main:
            print(f"head pre-fitted on frozen features of {len(train_idx)} images: {args.head_prefit_steps} steps, "
                  f"loss {loss:.4f}")
    # built while every parameter requires grad: a frozen encoder then counts as unused and its grads stay None
    freezes_later = args.freeze_encoder and start_epoch < args.unfreeze_after_epoch
    train_model = training.maybe_compile(distributed.wrap_ddp(model, dist, find_unused_parameters=freezes_later), args.compile,
                                         device)

    files_out = training_run.RunFiles(paths, f"fine-tuning ({run})", start_epoch, resume,
                                      training_run.tensorboard_dir(args, run))
    files_out.write_settings(
        f"fine-tuning ({'from ' + args.ssl_checkpoint if ssl else 'from scratch: baseline'})",
        runtime.settings(vars(args), init="ssl" if ssl else "scratch", writes=paths.best,
                         classes=table.class_names, train_images=len(train_idx), val_images=len(table.indices("val")),
                         test_images_held_out=len(table.indices("test")), small_stem=model.config.small_stem), dist)

    # ============ training ============
    augment = augmentations.BatchAugment(supervised_augment_config(args), args.image_size, channels_last=True)
    loss_fn = make_loss_fn(augment, device, weights, task)
    with files_out.last.on_interrupt(args.num_epochs, dist.is_main):
        for epoch in range(start_epoch, args.num_epochs):
            frozen = args.freeze_encoder and epoch < args.unfreeze_after_epoch
            model.freeze_encoder(frozen)
            train_loader.set_epoch(epoch)
            stats = training.train_one_epoch(train_model, train_loader, optimizer, loss_fn, device=device, scaler=scaler,
                                             autocast_dtype=autocast_dtype, scheduler=scheduler, epoch=epoch,
                                             num_epochs=args.num_epochs, show_progress=dist.is_main,
                                             desc="fine-tune" + (" (frozen)" if frozen else ""))
            stats, rngs = distributed.reduce_epoch_stats(stats, dist)
            if not dist.is_main:                   # the others wait for rank 0 in the next epoch's first step
                continue
            val = task.validate(model, val_loader, device, autocast_dtype, table.num_classes, args.threshold_rule)
            improved = task.is_better(val, best)
            if improved:
                best = val
            ckpt = build_checkpoint(model, args, ssl, table, train_idx, store, epoch + 1, val,
                                    os.path.basename(paths.history), dist.world_size)
            row = tasks.epoch_row(task, epoch, args.num_epochs, stats, val, frozen, improved)
            files_out.end_epoch(epoch, args.num_epochs, row, ckpt, improved, optimizer, scheduler, scaler, best, rngs,
                                chance=task.chance(table.num_classes))
    if dist.is_main:
        calibrate_best(paths.best, val_loader, device, task)
        best_epoch = ClassifierCheckpoint.load(paths.best).epoch
        print(f"done: best epoch {best_epoch} by {task.selection_text(best)} -> {paths.best}")
        hint = still_improving_hint(best_epoch, args.num_epochs,
                                    first_epoch_at_best(paths.history, task.selection_column, best_epoch))
        if hint:
            print(hint)
    distributed.cleanup_distributed(dist)


def peaked_late(best_epoch, num_epochs: int):
    """Whether the best val epoch (an int or a pandas Series of them) fell in the last 10% of the epochs:
    then the run was probably still improving when it stopped."""
    return best_epoch > 0.9 * num_epochs


def first_epoch_at_best(history_file: str, column: str, best_epoch: int) -> int:
    """The first epoch whose val selection metric (`column` of the history CSV) equals the best epoch's: the
    best epoch itself unless later epochs only tied it and won on val loss. The best epoch where the history
    cannot tell."""
    try:
        history = pd.read_csv(history_file)
        values = history.set_index("epoch")[column]
        first = values.index[values == values.loc[best_epoch]]
        return int(first.min()) if len(first) else best_epoch
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return best_epoch


def still_improving_hint(best_epoch: int, num_epochs: int, reached_epoch: int = None):
    """A hint when the val selection metric reached its best among the last 10% of 10 or more epochs. With a
    few dozen labels an epoch is one step, and from-scratch baselines stopped at 30 epochs were well short of
    their converged accuracy (CHANGELOG.md). `reached_epoch`: the first epoch at the best value (the best
    epoch can be later only by a tie won on val loss); a run whose metric levelled off earlier gets a note
    that says so instead."""
    reached = best_epoch if reached_epoch is None else reached_epoch
    if num_epochs < 10 or not peaked_late(best_epoch, num_epochs):
        return None
    if peaked_late(reached, num_epochs):
        return (f"note: the best val epoch was {best_epoch} of {num_epochs}, so the model was probably still "
                f"improving; train longer (--num_epochs), above all with few labels, where an epoch is a step or two")
    return (f"note: the val selection metric has been level since epoch {reached} of {num_epochs}; epoch "
            f"{best_epoch} tied it with a lower val loss, so the run had levelled off, not still improving")


def get_args_parser():
    p = recipes.RecipeParser(description=__doc__,
                             parents=[utils.common_parser(), training.training_parser(), utils.task_parser()],
                             formatter_class=utils.HelpFormatter, recipes={"tuned": TUNED}, sets=SETS)
    bounded(p.add_argument("--data_dir", default="./data/medical_images",
                           help="folder the label file's names are relative to, or its prepared copy "
                                "(data_loader.py --prepare)"), utils.EXISTING_DIR)
    bounded(p.add_argument("--label_file", default="./data/medical_images/labels.csv",
                           help="CSV filename,label[,split][,patient_id], or a multi-label file (docs/multilabel.md)"),
            utils.EXISTING_FILE)
    bounded(p.add_argument("--ssl_checkpoint", default=None,
                           help="best_ssl_model.pth from train_ssl.py; leave out to train from scratch (the baseline)"),
            utils.EXISTING_FILE)
    bounded(p.add_argument("--output_dir", default="./checkpoints", help="where the model, history and plots go"),
            utils.OUTPUT_DIR)
    bounded(p.add_argument("--output_name", default=None,
                           help="checkpoint file name (default: best_finetuned_model.pth with --ssl_checkpoint, "
                                "best_baseline_model.pth without)"), utils.FILE_NAME)
    bounded(p.add_argument("--num_classes", type=int, default=None,
                           help="number of classes (default: from the label file)"), Bound(int, 2, 10_000))
    p.add_argument("--backbone", default=None, choices=["resnet18", "resnet50"],
                   help="encoder for a from-scratch run (default resnet18); with --ssl_checkpoint the "
                        "checkpoint's encoder is used and a different value is ignored with a note")
    bounded(p.add_argument("--image_size", type=int, default=None,
                           help="training resolution (default: the SSL checkpoint's, else 224)"),
            Bound(int, 8, 4096, hint="pixels; 32 or less uses the small-image stem"))
    bounded(p.add_argument("--batch_size", type=int, default=32,
                           help="images per step per process; under torchrun the global batch is this x processes"),
            Bound(int, 1, 1 << 16))
    bounded(p.add_argument("--num_epochs", type=int, default=50, help="fine-tuning epochs"), Bound(int, 1, 1 << 20))
    bounded(p.add_argument("--num_steps", type=int, default=0,
                           help="fine-tuning length in optimizer steps (0: use --num_epochs); sets --num_epochs to the "
                                "epochs holding this many steps, rounded up (18-35 labels: one step an epoch)"),
            Bound(int, 0, 1 << 30, hint="optimizer steps; 0: use --num_epochs"))
    bounded(p.add_argument("--lr", type=float, default=1e-3,
                           help="learning rate of the head (and of a from-scratch encoder)"),
            Bound(float, 0, 100, lo_open=True, hint="e.g. 3e-4"))
    bounded(p.add_argument("--encoder_lr_scale", type=float, default=0.1,
                           help="learning rate of a pretrained encoder relative to --lr once it trains"),
            Bound(float, 0, 100))
    bounded(p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay"), Bound(float, 0, 10))
    p.add_argument("--freeze_encoder", action="store_true",
                   help="train only the head (encoder weights and BatchNorm statistics fixed) until --unfreeze_after_epoch")
    bounded(p.add_argument("--unfreeze_after_epoch", type=int, default=25,
                           help="epoch after which the whole network trains"), utils.UINT)
    bounded(p.add_argument("--frozen_steps", type=int, default=0,
                           help="with --ssl_checkpoint: train only the head for this many optimizer steps, then the "
                                "whole network (linear probing, then fine-tuning); sets --freeze_encoder and "
                                "--unfreeze_after_epoch to the epochs holding these steps. 0: off"),
            Bound(int, 0, 1 << 30, hint="optimizer steps with the encoder frozen; 0: off"))
    bounded(p.add_argument("--head_prefit_steps", type=int, default=0,
                           help="before epoch 1, train the head alone for this many full-batch steps on frozen "
                                "features of the labelled images (linear probing then fine-tuning; helps with a few "
                                "dozen labels)"), Bound(int, 0, 1_000_000))
    bounded(p.add_argument("--rotation", type=float, default=10.0,
                           help="augmentation: random rotation in degrees (the original recipe's 10; 0: off)"),
            Bound(float, 0, 180, hint="degrees"))
    p.add_argument("--rotation_fill", default="zeros", choices=augmentations.ROTATION_FILLS,
                   help="what fills the corners a rotation brings in: black (torchvision's RandomRotation, the "
                        "original recipe) or the image mirrored at its edges (no black wedges for the model to learn)")
    bounded(p.add_argument("--label_fraction", type=float, default=1.0,
                           help="stratified fraction of the train split to train on (val and test untouched)"),
            Bound(float, 0, 1, lo_open=True, hint="e.g. 0.1 for 10% of the labels"))
    p.add_argument("--class_weights", default="none", choices=["none", "balanced"],
                   help="balanced: weight the loss by inverse class frequency (rare diseases)")
    p.add_argument("--pos_weight", default="none", choices=["none", "balanced"],
                   help="multi-label: balanced weights each finding's positive term by its train negatives / "
                        "positives (rare findings)")
    p.add_argument("--threshold_rule", default="youden", choices=["youden", "f1"],
                   help="multi-label: how each finding's probability threshold is chosen on val (Youden's J: max "
                        "sensitivity + specificity - 1; or max F1); recorded in the checkpoint")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
