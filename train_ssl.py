"""SimCLR pretraining on unlabelled images -> best_ssl_model.pth.

    python train_ssl.py --data_dir ./data/medical_images --output_dir ./checkpoints --num_epochs 100
    python train_ssl.py --data_dir ./data/medical_images --label_file ./data/medical_images/labels.csv \\
        --image_size 64 --num_epochs 30 --eval_every 5        # keep test images out, watch kNN accuracy
    python train_ssl.py --data_dir ./data/medical_images --recipe tuned --image_size 64   # the measured recipe
    python train_ssl.py --data_dir ./data/medical_images --resume  # continue from last_ssl_checkpoint.pth
    torchrun --standalone --nproc_per_node 2 train_ssl.py --data_dir ./data/medical_images

Outputs in --output_dir: best_ssl_model.pth (lowest loss, or best kNN accuracy on val when a label file
is given), last_ssl_checkpoint.pth (full state for --resume: after the first epoch, then at most every 30 s,
and after the last epoch), ssl_history.csv, ssl_training.png, ssl_settings.json (the settings as resolved:
device, precision and workers with the reason for each, and in value_sources where each value that --recipe
controls came from: flag, recipe tuned or default).
"""
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import augmentations
import checkpoints
import data_loader
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
from checkpoints import SSLCheckpoint
from model_ssl import ModelConfig, SimCLR, nt_xent_loss, use_small_stem
from utils import Bound, UserError, bounded

RESUME_KEYS = ("backbone", "image_size", "projection_dim", "batch_size", "optimizer", "seed", "val_fraction",
               "test_fraction")


def lars_lr(args, given):
    """1.2 with LARS (--optimizer adam keeps its default)"""
    return 1.2 if args.optimizer == "lars" else recipes.KEEP_DEFAULT


def tenth_of_epochs(args, given):
    """a tenth of --num_epochs, at least 1"""
    return max(1, args.num_epochs // 10)


# --recipe tuned: benchmarks/label_efficiency.py's measured pretraining (docs/results.md): LARS, a sharper
# temperature, smaller crops, a random gamma and no rotation (its black corners held pretraining back)
TUNED = {"optimizer": "lars", "lr": lars_lr, "batch_size": 64, "temperature": 0.2, "crop_min_scale": 0.3,
         "rotation": 0.0, "jitter": 0.3, "gamma": 0.35, "warmup_epochs": tenth_of_epochs}


# ============ data ============

def pretraining_files(args):
    """Every readable image under data_dir, minus the test split of --label_file when given."""
    files = image_io.list_images(args.data_dir)
    table, excluded = None, []
    if args.label_file:
        table = label_tables.load_label_table(args.label_file, args.data_dir, args.task, seed=args.split_seed,
                                              val_fraction=args.val_fraction, test_fraction=args.test_fraction)
        monitored = tasks.of(table.task).knn_monitor
        if monitored and len(np.unique(table.labels)) < 2:   # every kNN vote would be right
            raise UserError(f"--label_file {args.label_file}: every image has the same label; the kNN monitor needs "
                            f"at least 2 classes (leave --label_file out to pick the epoch by the loss)")
        excluded = sorted(np.asarray(table.filenames)[table.indices("test")].tolist())
        held_out = set(excluded)
        files = [f for f in files if f not in held_out]
        if monitored and len(table.indices("val")) == 0:
            print(f"warning: {args.label_file}: the val split is empty, so the kNN monitor has nothing to score; "
                  f"the best epoch is chosen by loss", file=sys.stderr)
            table = None
        elif not monitored:
            print(f"{label_tables.describe_table(table)}\nmulti-label file: its test split is left out of "
                  f"pretraining; the best epoch is chosen by loss (the kNN monitor needs one class per image)")
            table = None
    if len(files) < 2:
        raise UserError(f"--data_dir {args.data_dir}: SimCLR needs at least 2 images, found {len(files)}")
    return files, table, excluded


def ssl_augment_config(args) -> augmentations.AugmentConfig:
    """The spec's SSL augmentations, with the crop's minimum area from --crop_min_scale, the rotation
    range from --rotation, the brightness and contrast strength from --jitter and the random gamma
    from --gamma."""
    return dataclasses.replace(augmentations.SSL_AUGMENT, crop_scale=(args.crop_min_scale, 1.0), rotation=args.rotation,
                               brightness=args.jitter, contrast=args.jitter, gamma=args.gamma)


def build_loader(args, files, runtime):
    """A shuffled batch loader over decoded images (or the per-image PIL pipeline for --augment pil)."""
    dist = runtime.dist
    if args.augment == "pil" and image_io.prepared_folder(args.data_dir) is not None:
        raise UserError(f"--augment pil decodes the image files, and --data_dir {args.data_dir} is a prepared folder; "
                        f"give --augment pil the source folder, or leave --augment at batch")
    if args.augment == "pil":
        transform = augmentations.build_pil_transform(ssl_augment_config(args), args.image_size)
        dataset = augmentations.PILTwoViewDataset(args.data_dir, files, transform)
        sampler = torch.utils.data.DistributedSampler(dataset, dist.world_size, dist.rank, seed=args.seed) \
            if dist.world_size > 1 else torch.utils.data.RandomSampler(dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                             num_workers=runtime.choose_workers(args.num_workers, streaming=True),
                                             drop_last=_per_rank(len(files), dist) > args.batch_size)
        return None, loader
    store = data_loader.ImageStore(args.data_dir, files, args.image_size, cache_gb=args.cache_gb, skip_unreadable=True)
    loader = data_loader.BatchLoader(
        store, np.arange(len(store)), batch_size=args.batch_size, shuffle=True, seed=args.seed,
        drop_last=_per_rank(len(store), dist) > args.batch_size,
        num_workers=runtime.choose_workers(args.num_workers, streaming=not store.in_memory),
        rank=dist.rank, world_size=dist.world_size, pin_memory=runtime.device.type == "cuda")
    return store, loader


def _per_rank(num_images: int, dist) -> int:
    """Images each process sees per epoch (both samplers pad the shards to equal length)."""
    return -(-num_images // dist.world_size)


def make_loss_fn(augment, device, temperature, collapse_log, dist):
    """Two augmented views per image, one forward over both, NT-Xent over the (global) batch."""
    def loss_fn(model, batch):
        if augment is None:                      # PIL path: views were made by the workers
            v1, v2 = (v.to(device, non_blocking=True) for v in batch)
        else:
            images = batch[0].to(device, non_blocking=True)
            v1, v2 = augment(images), augment(images)
        x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        z1, z2 = model(x).float().chunk(2)
        if dist.world_size > 1:                   # every anchor sees the negatives of all processes
            z1_all, z2_all = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
            loss = nt_xent_loss(z1, z2, temperature, z1_all, z2_all, offset=dist.rank * z1.shape[0])
        else:
            loss = nt_xent_loss(z1, z2, temperature)
        collapse_log.append(F.normalize(z1.detach(), dim=1).std(dim=0).mean())   # a tensor: read once per epoch
        return loss, v1.shape[0]
    return loss_fn


# ============ the capture-friendly step (--cuda_graphs) ============

def resolve_step_mode(args, device, dist, autocast_dtype) -> tuple[str, str]:
    """'eager' (the step of training.train_one_epoch), 'static' (the capture-friendly step, run as it is:
    what --cuda_graphs on does without CUDA) or 'graphed' (that step replayed from a CUDA graph); and
    a note for the settings."""
    if args.cuda_graphs != "on":
        return "eager", f"off ({args.cuda_graphs}: off until graphs are measured to win on a GPU)"
    refused = {"--augment pil (the views come from the workers)": args.augment == "pil",
               "torchrun (one process only)": dist.world_size > 1,
               "--precision fp16 (its GradScaler reads the GPU every step)": autocast_dtype == torch.float16,
               "--compile": args.compile}
    for what, bad in refused.items():
        if bad:
            raise UserError(f"--cuda_graphs on does not work with {what}; leave one of them out")
    if device.type == "cuda":
        return "graphed", "on: augmentation, forward, backward and optimizer replayed from one CUDA graph"
    return "static", f"on, but no CUDA on {device.type}: the capture-friendly step runs without a graph"


def make_static_step(model, augment, optimizer, generator, temperature, device, autocast_dtype, capture):
    """The pretraining step with nothing that waits for the device: the augmentation draws its random
    numbers from `generator` on the device, the loss and the embedding spread stay tensors. Returns
    step(batch, collapse_log) -> (loss, images), the step training.train_one_epoch takes as step_fn."""
    def body(images):
        with utils.autocast(device.type, autocast_dtype, cache_enabled=False):   # no weight cache across graph replays
            v1, v2 = augment(images, generator), augment(images, generator)
            x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
            z1, z2 = model(x).float().chunk(2)
            loss = nt_xent_loss(z1, z2, temperature)
        loss.backward()
        optimizer.step()
        return loss.detach(), F.normalize(z1.detach(), dim=1).std(dim=0).mean()

    captured = training.CapturedStep(body, optimizer, capture=capture, generators=[generator] if capture else [])

    def step(batch, collapse_log):
        images = batch[0].to(device, non_blocking=True)
        loss, spread = captured(images)
        collapse_log.append(spread.clone())          # a graph overwrites its outputs at the next replay
        return loss, images.shape[0]
    return step


def build_static_step(args, model, augment, optimizer, device, autocast_dtype, dist):
    """(step or None, its augmentation generator or None, a note for the settings) for --cuda_graphs."""
    mode, note = resolve_step_mode(args, device, dist, autocast_dtype)
    if mode == "eager":
        return None, None, note
    generator = seed_augment_rng(torch.Generator(device), args.seed)
    step = make_static_step(model, augment, optimizer, generator, args.temperature, device, autocast_dtype,
                            capture=mode == "graphed")
    return step, generator, note


def seed_augment_rng(generator: torch.Generator, seed: int) -> torch.Generator:
    """A CPU generator continues torch's global stream, which the eager step draws its augmentations
    from: on a CPU both steps then see the same views. A CUDA one starts from the run's seed."""
    if generator.device.type == "cpu":
        return generator.set_state(torch.get_rng_state())
    return generator.manual_seed(seed)


def restore_augment_rng(state, generator, start_epoch: int, seed: int) -> None:
    """The augmentation generator where the checkpoint left it (`state`: its saved state, or None). A
    checkpoint of a run without --cuda_graphs on (or from another device) has none that fits: the generator
    is seeded again, with a seed of its own for this epoch."""
    if generator is None:
        return
    if state is not None and state.numel() == generator.get_state().numel():
        generator.set_state(state)
    else:
        seed_augment_rng(generator, seed + 1000 * start_epoch)


# ============ model and optimisation ============

def build_model(args):
    config = ModelConfig(backbone=args.backbone, small_stem=use_small_stem(args.image_size),
                         projection_dim=args.projection_dim)
    return SimCLR(config)


def build_optimizer(args, model, steps_per_epoch):
    groups = optimizers.split_decay_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        optimizer = optimizers.LARS(groups, lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = optimizers.warmup_cosine(optimizer, args.warmup_epochs * steps_per_epoch,
                                         args.num_epochs * steps_per_epoch)
    return optimizer, scheduler


def build_knn_loaders(table, store, args, channels) -> dict:
    """Loaders over the labelled train and val images, reusing the pretraining store's decoded images
    when it holds them all (it does unless --augment pil or some labelled image is unreadable)."""
    wanted = {s: table.indices(s) for s in ("train", "val")}
    position = {f: i for i, f in enumerate(store.filenames)} if store is not None and store.in_memory else {}
    needed = [table.filenames[i] for idx in wanted.values() for i in idx]
    if not all(f in position for f in needed):
        store = data_loader.ImageStore(args.data_dir, needed, args.image_size, cache_gb=args.cache_gb,
                                       channels=channels)
        position = {f: i for i, f in enumerate(store.filenames)}
    labels = np.full(len(store), -1, dtype=np.int64)
    loaders = {}
    for split, idx in wanted.items():
        rows = np.array([position[table.filenames[i]] for i in idx], dtype=np.int64)
        labels[rows] = table.labels[idx]
        loaders[split] = rows
    return {split: data_loader.BatchLoader(store, rows, labels, batch_size=args.batch_size)
            for split, rows in loaders.items()}


def knn_accuracy(model, loaders: dict, num_classes: int, device, autocast_dtype):
    """kNN (k=20) on frozen encoder features: train split -> val split."""
    feats = {split: probes.extract_features(model.encoder, loader, image_io.normalize, device, autocast_dtype)
             for split, loader in loaders.items()}
    (f_train, y_train, _), (f_val, y_val, _) = feats["train"], feats["val"]
    if len(y_val) == 0 or len(y_train) == 0:
        return None
    scores = probes.knn_predict(f_train, y_train, f_val, num_classes)
    return (scores.argmax(1) == y_val).float().mean().item()


# ============ checkpoints ============

def build_checkpoint(model, args, epoch, loss, knn, label_sha256, excluded, channels, world_size) -> SSLCheckpoint:
    return SSLCheckpoint(
        model_config=model.config, image_size=args.image_size, channels=channels,
        normalization={"mean": list(image_io.IMAGENET_MEAN), "std": list(image_io.IMAGENET_STD)},
        encoder=model.encoder.state_dict(), projector=model.projector.state_dict(), epoch=epoch,
        num_epochs=args.num_epochs, args=dict(vars(args)), loss=loss, knn_accuracy=knn,
        label_file=args.label_file, label_file_sha256=label_sha256, excluded_files=excluded,
        split_seed=args.split_seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        history_file="ssl_history.csv", world_size=world_size)


def resume_path(args) -> str | None:
    if not args.resume:
        return None
    return os.path.join(args.output_dir, "last_ssl_checkpoint.pth") if args.resume == "auto" else args.resume


# ============ main ============

def check_args(args) -> None:
    """Every flag checked before any work (each flag's rule, utils.bounded): one line naming the flag, value and
    range."""
    training.check_training_flags(args, get_args_parser())
    if 0 < args.num_epochs <= args.warmup_epochs:
        source = getattr(args, "value_sources", {}).get("warmup_epochs", "flag")
        print(f"note: --warmup_epochs {args.warmup_epochs} ({source}) is not below --num_epochs {args.num_epochs}: the "
              f"learning rate rises for the whole run and never decays from --lr; pass a smaller --warmup_epochs "
              f"(--recipe tuned warms up for a tenth of the epochs)", file=sys.stderr)


@utils.locks_output_dir(check_args, "ssl")
def main(args):
    runtime = training_run.setup_runtime(args.device, args.precision, args.amp, args.seed)
    dist, device, autocast_dtype = runtime.dist, runtime.device, runtime.autocast_dtype

    # ============ preparing data ============
    files, table, excluded = pretraining_files(args)
    # the table has hashed the file already, unless the kNN monitor does not use it (multi-label, no val rows)
    label_sha256 = table.sha256 if table is not None else utils.sha256_file(args.label_file) if args.label_file \
        else None
    resume = resume_path(args)
    if (not resume or training_run.resumes_another_folder(resume, args.output_dir)) and dist.is_main:
        checkpoints.refuse_replacing_another_run(os.path.join(args.output_dir, "best_ssl_model.pth"), args,
                                                 label_sha256, args.overwrite)
    store, loader = build_loader(args, files, runtime)
    channels = store.channels if store is not None else 3
    augment = augmentations.BatchAugment(ssl_augment_config(args), args.image_size, channels_last=True) \
        if store is not None else None

    # ============ building model and optimizer ============
    model = build_model(args).to(device).to(memory_format=torch.channels_last)
    model = distributed.convert_sync_bn(model, args.sync_bn, dist)
    optimizer, scheduler = build_optimizer(args, model, max(1, len(loader)))
    scaler = training.make_grad_scaler(device, autocast_dtype)
    static_step, augment_rng, step_note = build_static_step(args, model, augment, optimizer, device, autocast_dtype,
                                                            dist)
    start_epoch, best, state = training_run.resume_run(resume_path(args), "ssl", args, RESUME_KEYS, dist,
                                                       {"encoder": model.encoder, "projector": model.projector},
                                                       optimizer, scheduler, scaler, args.seed, label_sha256)
    if state is not None:
        restore_augment_rng(state.augment_rng, augment_rng, start_epoch, args.seed)
    optimizers.lr_on_device(optimizer, device if static_step is not None else None)
    train_model = training.maybe_compile(distributed.wrap_ddp(model, dist), args.compile, device)   # DDP broadcasts rank 0's weights

    if store is not None and len(store) < 2:
        raise UserError(f"--data_dir {args.data_dir}: SimCLR needs at least 2 readable images, found {len(store)}")
    files_out = training_run.RunFiles(training_run.RunPaths.of(args.output_dir, "ssl", "best_ssl_model.pth"), "SimCLR pretraining",
                                      start_epoch, resume_path(args), training_run.tensorboard_dir(args, "ssl"))
    files_out.write_settings("SimCLR pretraining", runtime.settings(
        vars(args), images=len(store) if store else len(files), excluded_test_images=len(excluded),
        cached_in_memory=getattr(store, "images", None) is not None,
        prepared_folder=getattr(store, "prepared", None) is not None, channels=channels,
        small_stem=model.config.small_stem, steps_per_epoch=len(loader), start_epoch=start_epoch,
        cuda_graphs_step=step_note), dist)

    # ============ training ============
    knn_loaders = None
    with files_out.last.on_interrupt(args.num_epochs, dist.is_main):
        for epoch in range(start_epoch, args.num_epochs):
            _set_epoch(loader, epoch)
            collapse = []
            stats = training.train_one_epoch(train_model, loader, optimizer,
                                             make_loss_fn(augment, device, args.temperature, collapse, dist),
                                             device=device, scaler=scaler, autocast_dtype=autocast_dtype,
                                             scheduler=scheduler, epoch=epoch, num_epochs=args.num_epochs,
                                             desc="pretrain", show_progress=dist.is_main,
                                             step_fn=None if static_step is None else lambda b: static_step(b, collapse))
            stats, rngs = distributed.reduce_epoch_stats(stats, dist)
            if not dist.is_main:                   # the others wait for rank 0 in the next epoch's first step
                continue
            knn = None
            if table is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.num_epochs):
                knn_loaders = knn_loaders or build_knn_loaders(table, store, args, channels)
                knn = knn_accuracy(model, knn_loaders, table.num_classes, device, autocast_dtype)
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": stats["lr"],
                   "images_per_sec": stats["images_per_sec"], "knn_accuracy": "" if knn is None else knn,
                   "embedding_std": torch.stack(collapse).mean().item()}
            improved = _improved(best, stats["loss"], knn, table is not None)
            if improved:
                best = knn if table is not None else stats["loss"]
            ckpt = build_checkpoint(model, args, epoch + 1, stats["loss"], knn, label_sha256, excluded, channels,
                                    dist.world_size)
            files_out.end_epoch(epoch, args.num_epochs, row, ckpt, improved, optimizer, scheduler, scaler, best, rngs,
                                chance=1 / table.num_classes if table is not None else None,
                                augment_rng=augment_rng.get_state() if augment_rng is not None else None)
            print(_epoch_line(epoch, args.num_epochs, stats, knn, row["embedding_std"], improved), flush=True)
            _warn_collapse(row["embedding_std"], model.config.projection_dim)
    if dist.is_main:
        print(done_line(files_out.paths.best, args.num_epochs))
    distributed.cleanup_distributed(dist)


def done_line(best_path: str, num_epochs: int) -> str:
    """The run's last line: which epoch was kept and why. On small data the kept epoch can be long before the
    last, whose features may have got worse on val (docs/results.md, Pretraining length on the GPU)."""
    best = SSLCheckpoint.load(best_path)
    by = f"kNN accuracy on val {best.knn_accuracy:.3f}" if best.knn_accuracy is not None else f"loss {best.loss:.4f}"
    return f"done: best epoch {best.epoch} of {num_epochs} by {by} -> {best_path}"


def _set_epoch(loader, epoch: int) -> None:
    """Reshuffle deterministically per epoch (our BatchLoader, or a DistributedSampler)."""
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def _improved(best, loss, knn, monitored_by_knn) -> bool:
    """Ties go to the later epoch: on a small val split the kNN accuracy moves in steps of one image, so an
    early, barely trained encoder would otherwise be kept over a later one that scores the same."""
    if monitored_by_knn:
        return knn is not None and (best is None or knn >= best)
    return best is None or loss < best


def _epoch_line(epoch, num_epochs, stats, knn, std, improved) -> str:
    knn_text = f"  knn_acc {knn:.3f}" if knn is not None else ""
    return (f"epoch {epoch + 1}/{num_epochs}  loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
            f"{stats['images_per_sec']:.0f} img/s  emb_std {std:.3f}{knn_text}{'  *saved best*' if improved else ''}")


def _warn_collapse(std: float, dim: int) -> None:
    """Normalised embeddings spread over the sphere have per-dimension std near 1/sqrt(dim)."""
    if std < 0.2 / np.sqrt(dim):
        print(f"warning: embedding std {std:.4f} is far below 1/sqrt({dim}) = {1 / np.sqrt(dim):.3f}: the "
              f"representation may be collapsing; lower --lr or raise --temperature", file=sys.stderr)


def get_args_parser():
    p = recipes.RecipeParser(description=__doc__,
                             parents=[utils.common_parser(), training.training_parser(), utils.task_parser(uncertain=False)],
                             formatter_class=utils.HelpFormatter, recipes={"tuned": TUNED})
    bounded(p.add_argument("--data_dir", default="./data/medical_images",
                           help="folder of unlabelled images (recursive), or its prepared copy "
                                "(data_loader.py --prepare)"), utils.EXISTING_DIR)
    bounded(p.add_argument("--output_dir", default="./checkpoints", help="where checkpoints, history and plots go"),
            utils.OUTPUT_DIR)
    bounded(p.add_argument("--label_file", default=None,
                           help="optional labels.csv: its test split is left out of pretraining and a kNN monitor "
                                "(train -> val) picks the best epoch"), utils.EXISTING_FILE)
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"], help="ResNet encoder")
    bounded(p.add_argument("--batch_size", type=int, default=64,
                           help="images per step per process (2x views); under torchrun the global batch is this x "
                                "processes"), Bound(int, 1, 1 << 16))
    bounded(p.add_argument("--num_epochs", type=int, default=100, help="pretraining epochs"), Bound(int, 1, 1 << 20))
    bounded(p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (after warm-up)"),
            Bound(float, 0, 100, lo_open=True, hint="e.g. 3e-4"))
    bounded(p.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay (not on biases and norms)"),
            Bound(float, 0, 10))
    p.add_argument("--optimizer", default="adam", choices=["adam", "lars"],
                   help="adam (AdamW) as in the original recipe, or LARS as in the SimCLR paper "
                        "(use lr ~ 0.3 x batch/256)")
    bounded(p.add_argument("--warmup_epochs", type=int, default=10,
                           help="linear warm-up epochs before the cosine decay"), utils.UINT)
    bounded(p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature"),
            Bound(float, 1e-3, 100, hint="NT-Xent temperature, e.g. 0.5"))
    bounded(p.add_argument("--projection_dim", type=int, default=128, help="output size of the projection head"),
            Bound(int, 1, 1 << 16))
    bounded(p.add_argument("--image_size", type=int, default=224,
                           help="training resolution in pixels; 32 or less uses the small-image stem"),
            Bound(int, 8, 4096, hint="pixels; 32 or less uses the small-image stem"))
    p.add_argument("--augment", default="batch", choices=augmentations.AUGMENT_MODES,
                   help="batch: decode once, augment whole batches on the device; pil: classic per-image "
                        "torchvision pipeline in DataLoader workers (reference)")
    bounded(p.add_argument("--crop_min_scale", type=float, default=0.8,
                           help="smallest crop area as a fraction of the image (the original recipe's 0.8; the "
                                "SimCLR paper uses 0.08; smaller crops force the encoder to use local findings, not "
                                "the global anatomy)"), utils.FRACTION)
    bounded(p.add_argument("--rotation", type=float, default=15.0,
                           help="random rotation in degrees, uniform in [-rotation, rotation], corners zero-filled "
                                "as RandomRotation does (the original recipe's 15; 0: off)"),
            Bound(float, 0, 180, hint="degrees"))
    bounded(p.add_argument("--jitter", type=float, default=0.3,
                           help="brightness and contrast factors are drawn from [1 - jitter, 1 + jitter] (the "
                                "original recipe's 0.3; grayscale images have no colour to distort, so stronger "
                                "intensity jitter stops the encoder matching views by their histogram)"),
            Bound(float, 0, 1))
    bounded(p.add_argument("--gamma", type=float, default=0.0,
                           help="random gamma: pixel ** g with g log-uniform in [1/(1+gamma), 1+gamma] (0: off, as "
                                "in the original recipe); changes the shape of the histogram, which brightness and "
                                "contrast cannot"), Bound(float, 0, 10))
    bounded(p.add_argument("--eval_every", type=int, default=5,
                           help="epochs between kNN evaluations (with --label_file)"),
            Bound(int, 1, hint="epochs between kNN evaluations"))
    p.add_argument("--cuda_graphs", default="auto", choices=["auto", "on", "off"],
                   help="on: the capture-friendly step (augmentation random numbers drawn on the device, full "
                        "batches, no host read inside a step) replayed from one CUDA graph per step; on a CPU it "
                        "runs without a graph. auto = off everywhere until graphs are measured to win on a GPU "
                        "(not measured yet: docs/performance.md); off: the step as before")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
