"""Model zoo shapes/sizes and the FeatureModel logits+features interface (direct and hook paths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodtune.errors import ModelError
from oodtune.models import FeatureModel, build_model, find_head


@pytest.mark.parametrize(("arch", "feature_dim"), [("wrn-40-2", 128), ("resnet18", 512), ("wrn-10-1", 64)])
def test_logits_and_feature_shapes(arch: str, feature_dim: int) -> None:
    net = FeatureModel(build_model(arch, 10)).eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert feats.shape == (3, feature_dim)
    assert net.num_classes == 10


def test_wrn_40_2_parameter_count() -> None:
    """WRN-40-2 for CIFAR-10 has ~2.24M parameters (Zagoruyko & Komodakis, Table 1; OE/Energy code)."""
    n = sum(p.numel() for p in build_model("wrn-40-2", 10).parameters())
    assert abs(n - 2.24e6) < 0.01e6, n


def test_direct_path_features_feed_the_head() -> None:
    """For oodtune models, logits == head(features) and equal the plain model's forward."""
    model = build_model("wrn-10-1", 5).eval()
    net = FeatureModel(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        logits, feats = net(x)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)


def _user_model() -> nn.Sequential:
    """A plain user classifier with no forward_features/head attribute: conv -> pool -> fc(8, 16) -> fc(16, 3)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3),
    ).eval()


def test_hook_path_on_plain_sequential() -> None:
    model = _user_model()
    net = FeatureModel(model)
    assert net.head is model[6], "the last nn.Linear is the classification head"
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        logits, feats = net(x)
        assert net._captured is None, "the captured activation must not be kept alive after forward"
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        torch.testing.assert_close(feats, model[:6](x), rtol=0, atol=0)
    assert feats.shape == (5, 16)
    assert not model[6]._forward_pre_hooks, "the user's model must be left without oodtune hooks"


def test_head_name_selects_an_inner_layer() -> None:
    """``head_name`` picks the named Linear; features are its input and logits are still the model output."""
    model = _user_model()
    net = FeatureModel(model, head_name="4")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        logits, feats = net(x)
        torch.testing.assert_close(feats, model[:4](x), rtol=0, atol=0)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert net.num_classes == 16  # out_features of the named layer


def test_head_name_must_be_linear() -> None:
    with pytest.raises(ValueError, match="expected the final nn.Linear"):
        FeatureModel(_user_model(), head_name="0")


def test_head_name_must_exist() -> None:
    with pytest.raises(ValueError, match="has no layer 'classifier'"):
        FeatureModel(_user_model(), head_name="classifier")


def test_model_without_linear_is_rejected() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)))


def test_head_not_called_in_forward_is_reported() -> None:
    """A Linear that exists but is bypassed in forward gives a clear error, not stale features."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    with pytest.raises(ModelError, match="was not called"):
        FeatureModel(Bypass())(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize("arch", ["vgg16", "wrn-41-2", "wrn-40", "resnet-18x"])
def test_bad_architecture_names(arch: str) -> None:
    with pytest.raises(ValueError, match="6n\\+4|unknown architecture"):
        build_model(arch, 10)


def test_too_few_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("wrn-16-1", 1)
