"""Images on disk -> tensors: readers, label files, splits, the decoded-image store, batch loaders,
augmentations, the synthetic chest X-ray generator, and the prepare step (decode a folder once).

    python data_loader.py                                   # 500 synthetic images + labels.csv in ./data/medical_images
    python data_loader.py --num_images 200 --num_unlabeled 2000 --image_size 64 --output_dir ./data/small
    python data_loader.py --from_npz breastmnist.npz --output_dir ./data/breastmnist   # a MedMNIST file (README)
    python data_loader.py --multi_label --output_dir ./data/multilabel   # several findings per image
    python data_loader.py --prepare --data_dir ./data/medical_images --output_dir ./data/prepared --image_size 128

Unlabelled folders: `list_readable_images(data_dir)` (corrupt files skipped with one warning).
Labelled data: `read_label_table(...)` then `ImageStore(...)`, where a corrupt file is an error.
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data_splits import SPLITS
from image_io import decode_to_tensor, filter_readable, load_image, prepared_folder
from label_tables import load_label_table
from medmnist_npz import import_npz
from synthetic import (CLASS_DESCRIPTIONS, MAX_SYNTHETIC_CLASSES, SYNTHETIC_FINDINGS, generate_dataset,
                       generate_multilabel_dataset)
from utils import (EXISTING_DIR, EXISTING_FILE, OUTPUT_DIR, UINT, Bound, HelpFormatter, UserError, bounded,
                   locks_output_dir)


class ImageStore(torch.utils.data.Dataset):
    """Images decoded once to uint8 (C, S, S); kept in RAM when they fit in `cache_gb`.

    Labelled data (the default): an unreadable file is a UserError naming it, since dropping it
    would silently shift the labels. Unlabelled data: pass `skip_unreadable=True` (or filter the
    list first with `filter_readable` / `list_readable_images`); skipped files are named in one
    warning and removed from `self.filenames`. A streaming store (larger than `cache_gb`) decodes
    lazily, so there an unreadable file raises only when it is reached. A prepared folder
    (prepared_images.py) as `root` is read by position from its file: nothing decoded, nothing cached."""

    def __init__(self, root: str, filenames: list, image_size: int, cache_gb: float = 4.0,
                 channels: int | None = None, skip_unreadable: bool = False):
        self.root, self.filenames, self.image_size = root, list(filenames), image_size
        self.prepared, self.images = prepared_folder(root), None
        if self.prepared is not None:
            self._open_prepared(channels, skip_unreadable)
            return
        self.channels = channels or self._guess_channels()
        need_gb = len(self.filenames) * self.channels * image_size * image_size / 2**30
        self.in_memory = need_gb <= cache_gb
        if not self.in_memory and skip_unreadable:
            self.filenames, _ = filter_readable(root, self.filenames)
        if self.in_memory:
            self.images = self._decode_all(skip_unreadable)

    def _open_prepared(self, channels: int | None, skip_unreadable: bool) -> None:
        """A prepared folder: nothing decoded, nothing cached; batches are read from its file by position. Its
        unreadable files are skipped or refused as decoding the source would."""
        prepared = self.prepared
        prepared.check_side(self.image_size)
        self.channels = channels or prepared.guess_channels(self.filenames)
        prepared.positions(self.filenames)                      # every name is in the folder
        kept, skipped = filter_readable(self.root, self.filenames, quiet=not skip_unreadable)
        if skipped and not skip_unreadable:
            raise UserError(prepared.unreadable[skipped[0]])
        if not kept:
            raise UserError(f"{self.root}: none of the images could be used (unreadable or too small, see the "
                            f"warning above); check the files")
        self.filenames, self.in_memory = kept, True
        self._positions = prepared.positions(kept)

    def _decode_all(self, skip_unreadable: bool) -> torch.Tensor:
        """Every image decoded straight into one preallocated uint8 tensor: the cache is never held twice."""
        images = torch.empty(len(self.filenames), self.channels, self.image_size, self.image_size, dtype=torch.uint8)

        def fill(i: int) -> bool:
            image = self._decode_or_none(i, skip_unreadable)
            if image is not None:
                images[i] = image
            return image is not None

        # PIL releases the GIL while decoding, so threads give a real speed-up on big folders
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(fill, range(len(self.filenames))))
        if all(ok):
            return images
        skipped = [f for f, good in zip(self.filenames, ok) if not good]
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} unreadable image(s) under {self.root}: {shown}", file=sys.stderr)
        kept = [i for i, good in enumerate(ok) if good]
        if not kept:
            raise UserError(f"{self.root}: none of the images could be used (unreadable or too small, see the "
                            f"warning above); check the files")
        self.filenames = [self.filenames[i] for i in kept]
        for j, i in enumerate(kept):  # compact in place, no second copy
            images[j] = images[i]
        return images[:len(kept)]

    def _decode_or_none(self, i: int, skip_unreadable: bool):
        try:
            return self._decode(i)
        except UserError:
            if skip_unreadable:
                return None
            raise

    def _guess_channels(self) -> int:
        """3 when any of the first readable images has real colour, else 1."""
        for name in self.filenames[:16]:
            try:
                arr = load_image(os.path.join(self.root, name))
            except UserError:
                continue
            if arr.ndim == 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                      and np.array_equal(arr[..., 0], arr[..., 2])):
                return 3
        return 1

    def _decode(self, i: int) -> torch.Tensor:
        return decode_to_tensor(os.path.join(self.root, self.filenames[i]), self.image_size, self.channels)

    def __len__(self):
        return len(self.filenames)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.prepared is not None:
            return self.batch(torch.tensor([i]))[0]
        return self.images[i] if self.images is not None else self._decode(i)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) of the images at `idx`, from the RAM cache or the prepared folder (not streaming)."""
        if self.prepared is not None:
            return torch.from_numpy(self.prepared.read(self._positions[idx.numpy()], self.channels))
        return self.images[idx]


class BatchLoader:
    """Yields (images uint8 (B, C, S, S), labels int64 (B,) or float32 (B, K), indices int64 (B,)) over `indices`.

    In-memory stores are sliced directly (no per-image collation); streaming stores go through a
    DataLoader with workers. `set_epoch` reshuffles deterministically; rank/world shard the epoch.
    """

    def __init__(self, store: ImageStore, indices, labels=None, batch_size: int = 64, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        self.store, self.indices = store, torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        labels = np.asarray(labels if labels is not None else np.full(len(store), -1))
        # multi-label targets (N, K) stay float: 1, 0 and -1 for an ignored cell
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.int64)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_workers, self.rank, self.world_size, self.pin_memory = num_workers, rank, world_size, pin_memory
        self.epoch = 0
        self._streaming = None      # the DataLoader of a streaming store, built once: its workers outlive epochs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        if self.world_size > 1:  # every rank gets the same number of images (pad by wrapping)
            per_rank = -(-len(order) // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - len(order)]])
            order = order[self.rank::self.world_size]
        return order

    def _batches(self):
        order = self._order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self):
        return len(self._batches())

    def __iter__(self):
        batches = self._batches()
        if self.store.in_memory:
            for idx in batches:
                images = self.store.batch(idx)
                yield (images.pin_memory() if self.pin_memory else images), self.labels[idx], idx
            return
        if self._streaming is None:
            # persistent workers: starting them every epoch cost more than the epoch on small data and many
            # workers (docs/performance.md, Throughput of the data path). The batch sampler is read again each
            # epoch, so set_epoch still reshuffles.
            self._streaming = torch.utils.data.DataLoader(
                self.store, batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        for idx, images in zip(batches, self._streaming):
            yield images, self.labels[idx], idx


class _EpochBatches:
    """A BatchLoader's batches of its current epoch, as a DataLoader batch sampler (lists of indices)."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self):
        return (b.tolist() for b in self.loader._batches())

    def __len__(self):
        return len(self.loader)


def write_split_column(label_file: str, data_dir: str, seed: int, val_fraction: float, test_fraction: float) -> dict:
    """Add a `split` column to a label file without one: the stratified, patient-level split the scripts would
    otherwise draw themselves (`load_label_table`), with these shares. Every script then uses it as written,
    so one choice of shares holds for pretraining, fine-tuning and evaluation. Returns {split: images}."""
    import pandas as pd

    from utils import atomic_write_text

    table = load_label_table(label_file, data_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    df = pd.read_csv(label_file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if "split" in df:
        raise UserError(f"{label_file}: already has a split column; not rewriting it")
    if len(df) != len(table.splits):         # a header-less file: its first row was read as a header
        raise UserError(f"{label_file}: {len(table.splits)} label rows but {len(df)} data rows; give it a header")
    df.insert(1, "split", table.splits)
    atomic_write_text(label_file, df.to_csv(index=False, lineterminator="\n"))
    return {s: int((table.splits == s).sum()) for s in SPLITS}


def _check_args(args) -> None:
    from utils import check_flags, check_split_shares
    check_flags(args, get_args_parser())
    if args.prepare:
        if args.data_dir is None:
            raise UserError("--prepare reads the folder named by --data_dir; give it")
        return
    if args.data_dir is not None:
        raise UserError(f"--data_dir {args.data_dir} is read by --prepare only; add --prepare or drop it")
    if args.label_names and not args.from_npz:
        raise UserError("--label_names names the finding columns of a --from_npz file; drop it or add --from_npz")
    if not args.from_npz:
        _check_generator_args(args)
    elif args.val_fraction is not None or args.test_fraction is not None:
        raise UserError(f"--from_npz {args.from_npz}: a MedMNIST file brings its own train/val/test split; "
                        f"drop --val_fraction and --test_fraction")
    if args.val_fraction is not None or args.test_fraction is not None:
        check_split_shares(*split_shares(args))


def split_shares(args) -> tuple:
    """(val, test) shares for the split column: the scripts' 0.15 for the one not given."""
    return (0.15 if args.val_fraction is None else args.val_fraction,
            0.15 if args.test_fraction is None else args.test_fraction)


@locks_output_dir(_check_args, lambda args: "prepare" if args.prepare else "generate")
def main(args):
    if args.prepare:
        return _prepare(args)
    if args.from_npz:
        rows = import_npz(args.from_npz, args.output_dir, args.label_names)
        counts = {s: sum(r[2] == s for r in rows) for s in SPLITS}
        print(f"wrote {len(rows)} images ({', '.join(f'{s} {n}' for s, n in counts.items())}) and labels.csv "
              f"to {args.output_dir}")
        return rows
    if args.multi_label:
        rows = _generate_multilabel(args)
    else:
        rows = generate_dataset(args.output_dir, args.num_images, args.num_classes, args.image_size, args.seed,
                                args.num_unlabeled)
        patients = len({r[2] for r in rows})
        print(f"wrote {len(rows)} labelled images of {patients} patients, {args.num_unlabeled} unlabelled, "
              f"labels.csv, classes.txt and preview.png to {args.output_dir}")
        for c in range(args.num_classes):
            print(f"  class {c}: {CLASS_DESCRIPTIONS[c]}")
    if args.val_fraction is not None or args.test_fraction is not None:
        val, test = split_shares(args)
        counts = write_split_column(os.path.join(args.output_dir, "labels.csv"), args.output_dir, args.seed, val, test)
        print(f"  split column (by patient): {', '.join(f'{s} {n}' for s, n in counts.items())} images")
    return rows


def _prepare(args) -> dict:
    import time

    from prepared_images import prepare
    start = time.perf_counter()
    manifest = prepare(args.data_dir, args.output_dir, args.image_size, args.num_workers)
    took = time.perf_counter() - start
    print(f"prepared {manifest['images']} images at {args.image_size} px, {manifest['channels']} channel(s), "
          f"in {took:.0f} s -> {args.output_dir}; give it as --data_dir to any script (at --image_size "
          f"{args.image_size})" + (f"; copied {', '.join(manifest['copied'])}" if manifest["copied"] else ""))
    return manifest


def _generate_multilabel(args) -> list:
    rows = generate_multilabel_dataset(args.output_dir, args.num_images, args.image_size, args.seed,
                                       args.num_unlabeled)
    patients = {r[2]: r[1] for r in rows}
    print(f"wrote {len(rows)} labelled images of {len(patients)} patients with several findings each, "
          f"{args.num_unlabeled} unlabelled, labels.csv (|-separated findings), classes.txt and preview.png "
          f"to {args.output_dir}")
    none = sum(not f for f in patients.values())
    print(f"  No Finding: {none} patients ({100 * none / len(patients):.0f}%)")
    for c, name in SYNTHETIC_FINDINGS.items():
        n = sum(c in f for f in patients.values())
        print(f"  {name}: {n} patients ({100 * n / len(patients):.0f}%) - {CLASS_DESCRIPTIONS[c]}")
    return rows


def _check_generator_args(args) -> None:
    """What a flag's own range cannot say: flags that depend on each other."""
    if args.num_images < args.num_classes:
        raise UserError(f"--num_images {args.num_images}: need at least one image per class "
                        f"({args.num_classes}); raise --num_images")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    bounded(p.add_argument("--output_dir", default="./data/medical_images",
                           help="folder for the images and labels.csv"), OUTPUT_DIR)
    bounded(p.add_argument("--num_images", type=int, default=500, help="labelled synthetic images"),
            Bound(int, 1, 10_000_000))
    bounded(p.add_argument("--num_unlabeled", type=int, default=0, help="extra synthetic images with no label row"),
            Bound(int, 0, 10_000_000))
    bounded(p.add_argument("--num_classes", type=int, default=3, help="number of findings (classes)"),
            Bound(int, 2, MAX_SYNTHETIC_CLASSES, hint="classes the generator draws"))
    bounded(p.add_argument("--image_size", type=int, default=224, help="side of the square images in pixels"),
            Bound(int, 32, 2048, hint="pixels"))
    bounded(p.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives identical files"),
            UINT)
    bounded(p.add_argument("--from_npz", default=None,
                           help="import a MedMNIST .npz (e.g. breastmnist.npz: README, Using your own data) instead "
                                "of generating"), EXISTING_FILE)
    p.add_argument("--multi_label", action="store_true",
                   help="several findings per image (consolidation, nodules, effusion, cardiomegaly at unequal, "
                        "correlated prevalences); labels.csv lists them |-separated; --num_classes is ignored")
    share = Bound(float, 0, 1, hi_open=True)
    bounded(p.add_argument("--val_fraction", type=float, default=None,
                           help="write a split column into labels.csv: this share of the patients for val (0.15 when "
                                "only --test_fraction is given); without either, each script splits 70/15/15 by "
                                "patient itself"), share)
    bounded(p.add_argument("--test_fraction", type=float, default=None,
                           help="write a split column into labels.csv: this share of the patients held out for "
                                "testing (the quick start's 0.4 of 800 gives 318 test images, enough to resolve a "
                                "10-point difference)"), share)
    p.add_argument("--prepare", action="store_true",
                   help="decode every image of --data_dir once, resized to --image_size, into a memory-mapped "
                        "folder at --output_dir (with labels.csv, classes.txt); every script takes that folder as "
                        "--data_dir. Killed, run it again to continue")
    bounded(p.add_argument("--data_dir", default=None, help="with --prepare: the folder of images to prepare"),
            EXISTING_DIR)
    bounded(p.add_argument("--num_workers", type=int, default=None,
                           help="with --prepare: decoding processes (default: one per CPU core)"), Bound(int, 1, 1024))
    p.add_argument("--label_names", nargs="+", default=None,
                   help="with --from_npz of a multi-label file (labels (N, K), e.g. ChestMNIST): the K finding "
                        "names in column order (default: finding_0 ... finding_K-1)")
    return p


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main, get_args_parser())
