"""What one scored model predicted on the evaluated split (`Evaluated`) and where the predictions came from
(`ModelInfo`): the record every metric, figure and report of evaluate.py reads.
"""
import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModelInfo:
    """Where a model's predictions came from, for the reports and metrics.json."""
    split: str                                 # the evaluated split
    split_source: str                          # "recorded in the checkpoint" or "label file"
    checkpoint_kind: str                       # "classifier" or "ssl"
    init: str | None = None                    # "ssl", "scratch", or "ssl, frozen encoder" for probes
    label_fraction: float | None = None
    epoch: int | None = None                   # the kept epoch
    num_epochs: int | None = None              # of how many
    fit_images: int | None = None              # probes and kNN: train-split images they were fitted on
    probe: str | None = None                   # "linear probe" or "kNN"
    probe_C: float | None = None               # the linear probe's L2 strength, chosen on val
    task: str = "multiclass"
    uncertain: str | None = None               # multi-label: the --uncertain policy
    thresholds: list | None = None             # multi-label: per-finding thresholds chosen on val
    threshold_rule: str | None = None
    temperature: float | list | None = None    # classifiers: divides the logits, fitted on val (1.0: uncalibrated)
    small_split: list = field(default_factory=list)   # warnings: the split is too small for tight intervals

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Evaluated:
    """What one model predicted on the evaluated split, and where it came from."""
    name: str
    checkpoint: str
    kind: str                    # "classifier", "linear probe" or "kNN"
    filenames: list
    y_true: np.ndarray           # (N,) int64, in `class_names` order
    prob: np.ndarray             # (N, K) class probabilities
    features: np.ndarray         # (N, D) encoder embeddings, for t-SNE / UMAP
    class_names: list
    info: ModelInfo
    notes: list = field(default_factory=list)
    history_csv: str | None = None
    explained: object = None     # an `Explained` (network + preprocessing) for Grad-CAM; None for probes and kNN
    prob_uncalibrated: np.ndarray | None = None   # classifiers: `prob` at temperature 1, for the ECE before scaling
    patient_ids: np.ndarray | None = None   # (N,) the label file's patient of each image: the bootstrap's unit
