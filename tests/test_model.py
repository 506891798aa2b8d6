"""model_ssl: NT-Xent against SimCLR's Algorithm 1, shapes, and the frozen-encoder contract."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_ssl import Classifier, ModelConfig, SimCLR, nt_xent_loss, use_small_stem


def reference_nt_xent(z1, z2, temperature):
    """A naive transcription of Algorithm 1 of Chen et al. (2020): loops, no vectorisation."""
    n = z1.shape[0]
    z = [None] * (2 * n)
    for k in range(n):
        z[2 * k] = z1[k] / z1[k].norm()          # 2k-1 and 2k in the paper's 1-based indexing
        z[2 * k + 1] = z2[k] / z2[k].norm()

    def sim(i, j):
        return torch.dot(z[i], z[j])

    def ell(i, j):
        numerator = torch.exp(sim(i, j) / temperature)
        denominator = sum(torch.exp(sim(i, k) / temperature) for k in range(2 * n) if k != i)
        return -torch.log(numerator / denominator)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("n,d,temperature", [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (16, 4, 0.07)])
def test_nt_xent_matches_algorithm_1(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ours = nt_xent_loss(z1, z2, temperature)
    ref = reference_nt_xent(z1, z2, temperature)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours.item(), ref.item())


@pytest.mark.parametrize("n", [1, 4, 32])
def test_nt_xent_of_identical_embeddings_is_log_2n_minus_1(n):
    z = torch.ones(n, 7)
    assert nt_xent_loss(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_nt_xent_is_stable_at_low_temperature_and_has_finite_gradients():
    z1 = torch.randn(64, 128, requires_grad=True)
    z2 = (z1.detach() + 0.01 * torch.randn(64, 128)).requires_grad_()
    loss = nt_xent_loss(z1, z2, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_nt_xent_prefers_matching_pairs():
    z = F.normalize(torch.randn(16, 32), dim=1)
    assert nt_xent_loss(z, z + 0.01 * torch.randn_like(z), 0.5) < nt_xent_loss(z, torch.randn(16, 32), 0.5)


def test_nt_xent_shards_add_up_to_the_full_batch():
    """The distributed form (local anchors, global candidates) averaged over shards = the full loss."""
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    full = nt_xent_loss(z1, z2, 0.3)
    shards = [nt_xent_loss(z1[i:i + 4], z2[i:i + 4], 0.3, z1, z2, offset=i) for i in (0, 4)]
    assert torch.allclose(full, sum(shards) / 2, atol=1e-6)


@pytest.mark.parametrize("backbone,dim", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes_for_both_backbones_and_stems(backbone, dim, size):
    config = ModelConfig(backbone=backbone, small_stem=use_small_stem(size), projection_dim=64)
    model = SimCLR(config).eval()
    x = torch.randn(2, 3, size, size)
    assert model.encoder(x).shape == (2, dim)
    assert model(x).shape == (2, 64)
    assert config.small_stem == (size <= 32)
    assert Classifier(config, num_classes=5).eval()(x).shape == (2, 5)


def test_small_stem_keeps_spatial_resolution():
    small, standard = (SimCLR(ModelConfig(small_stem=s)).encoder for s in (True, False))
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert standard.conv1.stride == (2, 2)


def test_forward_backward_on_cpu():
    model = SimCLR(ModelConfig(small_stem=True))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    nt_xent_loss(model(x1), model(x2)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_frozen_encoder_is_really_frozen_and_unfreezing_trains_it():
    """Weights and BatchNorm buffers bit-identical after frozen steps (moco's sanity_check)."""
    torch.manual_seed(0)
    model = Classifier(ModelConfig(small_stem=True), num_classes=3)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.freeze_encoder(True)
    model.train()
    assert not model.encoder.training and model.head.training
    head_before = [p.clone() for p in model.head.parameters()]
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))

    model.freeze_encoder(False)
    model.train()
    loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
