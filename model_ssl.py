"""SimCLR modules and the NT-Xent loss: pure nn.Modules, no files, prints or devices.

    from model_ssl import ModelConfig, SimCLR, Classifier, nt_xent_loss
    model = SimCLR(ModelConfig(backbone="resnet18", small_stem=False))
    z1, z2 = model(view1), model(view2)            # (N, projection_dim) each
    loss = nt_xent_loss(z1, z2, temperature=0.5)

Everything a later phase needs to rebuild a network lives in `ModelConfig`, which checkpoints
store as a plain dict (`dataclasses.asdict`).
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}
SMALL_STEM_MAX_SIZE = 32  # inputs this small lose too much to a stride-2 7x7 conv and a max-pool
SMALL_STEM_KERNEL = 3
STAGE_STRIDES = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}   # each ResNet stage's stride after the stem


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    small_stem: bool = False  # 3x3 stride-1 first conv, no max-pool (CIFAR/MedMNIST-sized inputs)
    projection_dim: int = 128

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.backbone]

    @property
    def stem_kernel_size(self) -> int:
        """The first convolution's kernel: 3x3 in the small stem, torchvision's 7x7 otherwise."""
        return SMALL_STEM_KERNEL if self.small_stem else 7

    @property
    def stem_stride(self) -> int:
        """How much the stem shrinks the image: 1, or a stride-2 convolution and a stride-2 max-pool."""
        return 1 if self.small_stem else 4

    def feature_map_side(self, image_size: int, stage: str) -> int:
        """Cells a side of a ResNet stage's feature map ('layer1' .. 'layer4') for a square input."""
        return image_size // self.stem_stride // STAGE_STRIDES[stage]

    def to_dict(self) -> dict:
        return asdict(self)


def use_small_stem(image_size: int) -> bool:
    return image_size <= SMALL_STEM_MAX_SIZE


def build_encoder(backbone: str, small_stem: bool) -> nn.Module:
    """A randomly initialised torchvision ResNet whose forward returns (N, feature_dim) features."""
    if backbone not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(FEATURE_DIMS)}")
    net = getattr(torchvision.models, backbone)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=SMALL_STEM_KERNEL, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class ProjectionHead(nn.Sequential):
    """Linear(d, d) -> BatchNorm -> ReLU -> Linear(d, projection_dim), as in SimCLR."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, in_dim),
            nn.BatchNorm1d(in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )


class SimCLR(nn.Module):
    """Encoder + projection head. forward(x: (N, 3, H, W)) -> z: (N, projection_dim), not normalised."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.backbone, config.small_stem)
        self.projector = ProjectionHead(config.feature_dim, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class ClassificationHead(nn.Sequential):
    """Linear(d,256)-ReLU-Dropout(0.3)-Linear(256,128)-ReLU-Dropout(0.3)-Linear(128,num_classes)."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.3):
        super().__init__(
            nn.Linear(in_dim, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )


class Classifier(nn.Module):
    """Encoder + classification head. forward(x: (N, 3, H, W)) -> logits: (N, num_classes)."""

    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.encoder = build_encoder(config.backbone, config.small_stem)
        self.head = ClassificationHead(config.feature_dim, num_classes)
        self.encoder_frozen = False

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Frozen: no gradients into the encoder and its BatchNorm statistics stay put (eval mode)."""
        self.encoder_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                 z1_all: torch.Tensor | None = None, z2_all: torch.Tensor | None = None,
                 offset: int = 0) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of SimCLR.

    z1, z2: (N, D) projections of two views of the same N images (row i of z1 and z2 is a pair).
    Returns the mean over all 2N anchors of -log softmax(sim(anchor, positive) / t) where the
    softmax runs over the 2N - 1 other views (the anchor itself excluded).

    For a batch spread over several processes, pass the gathered (with gradient) views of the
    whole batch as z1_all, z2_all (each (M, D)) and this process's row offset into them; the
    anchors are then the local 2N views and the candidates all 2M views, which is exactly the
    single-process loss restricted to this process's anchors.
    """
    if z1_all is None:
        z1_all, z2_all, offset = z1, z2, 0
    n, m = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)                  # (2N, D)
    candidates = F.normalize(torch.cat([z1_all, z2_all]), dim=1)       # (2M, D)
    logits = anchors.float() @ candidates.float().T / temperature      # (2N, 2M)
    local = torch.arange(n, device=z1.device) + offset                 # rows of this batch in z*_all
    self_index = torch.cat([local, local + m])                         # where each anchor sits
    positive_index = torch.cat([local + m, local])                     # its other view
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_index] = float("-inf")                           # a view is not its own negative
    return F.cross_entropy(logits, positive_index)


def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor,
                           pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross entropy of K independent findings, ignoring the cells a label file left uncertain.

    logits: (N, K) raw scores; targets: (N, K) with 1 present, 0 absent and -1 ignored (an uncertain
    CheXpert cell under --uncertain ignore); pos_weight: (K,) factor on each finding's positive term.
    Returns the mean over the counted cells (0, still differentiable, when every cell is ignored)."""
    counted = targets >= 0                                              # (N, K)
    per_cell = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype),
                                                  pos_weight=pos_weight, reduction="none")
    return (per_cell * counted).sum() / counted.sum().clamp(min=1)
