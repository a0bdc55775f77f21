"""The airbench-style AirNet: shapes and parameter count, identity-initialised convolutions, the patch-whitening
stem, the oodtune model interface, and a few training steps that reduce the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oodtune.models import FeatureModel, build_model
from oodtune.models.airnet import AirNet, _conv, airnet_width


def test_shapes_parameters_and_names():
    net = build_model("airnet", 10)
    assert isinstance(net, AirNet)
    logits = net(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    assert net.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    # 3x3 convolutions 24-64, 64-64, 64-256, 256-256 (x3), 2x2 stem with bias, head without bias, BN biases/scales
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256)
    bn = 2 * (64 + 64 + 4 * 256)
    assert sum(p.numel() for p in net.parameters()) == convs + (3 * 24 * 4 + 24) + 256 * 10 + bn
    assert airnet_width("airnet-32") == 32 and airnet_width("airnet") == 64 and airnet_width("airnet-x") is None
    assert build_model("airnet-16", 5).head.in_features == 64
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("airnet-0", 10)


def test_batchnorm_scales_are_fixed_and_convolutions_start_as_identity():
    net = AirNet(10, width=8)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    conv = _conv(6, 9)
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(conv(x)[:, :6], x, atol=1e-6)  # the first min(c_in, c_out) outputs pass x through


def test_whitened_stem_decorrelates_the_patches_it_was_fitted_on():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 12, 12))
    images = images + 0.5 * torch.roll(images, 1, dims=3)  # correlated neighbours
    net = AirNet(10, width=8)
    net.whiten(images, eps=0.0)
    out = F.conv2d(images, net.stem.weight[:12])  # without bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    assert torch.allclose(flat @ flat.T / flat.shape[1], torch.eye(12), atol=1e-3)
    assert torch.allclose(net.stem.weight[12:], -net.stem.weight[:12])


def test_feature_model_interface_and_a_few_steps_learn():
    torch.manual_seed(0)
    net = AirNet(3, width=8)
    fm = FeatureModel(net)
    x = torch.randn(24, 3, 32, 32)
    y = torch.arange(24) % 3
    x = x + y.view(-1, 1, 1, 1).float()  # separable by brightness
    logits, feats = fm(x)
    assert torch.allclose(logits, net.head(feats)) and feats.shape == (24, 32)
    weight, bias = fm.head_parameters()
    assert weight.shape == (3, 32) and torch.equal(bias, torch.zeros(3))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9, nesterov=True)
    first = F.cross_entropy(net(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert F.cross_entropy(net(x), y).item() < 0.5 * first
