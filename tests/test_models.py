"""Models: backbone shapes and sizes, the cosine classifier against eq. 2 of paper 1, export/load."""

import pytest
import torch
import torch.nn.functional as F

from ltdist.models import CosineClassifier, LinearClassifier, build_model, export_model, load_exported_model


@pytest.mark.parametrize("arch,channels,size,feature_dim", [
    ("resnet8", 1, 28, 64), ("resnet32", 3, 32, 64), ("resnet50", 3, 64, 2048), ("resnext50_32x4d", 1, 64, 2048)])
def test_backbone_shapes(arch, channels, size, feature_dim):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, channels=channels).eval()
    x = torch.randn(2, channels, size, size)
    assert model.feature_dim == feature_dim
    assert model.forward_features(x).shape == (2, feature_dim)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("arch,backbone_params", [
    # torchvision's counts minus their 1000-way fc (2048·1000 + 1000): the architectures match exactly.
    ("resnet50", 25_557_032 - 2_049_000), ("resnet101", 44_549_160 - 2_049_000),
    ("resnet152", 60_192_808 - 2_049_000), ("resnext50_32x4d", 25_028_904 - 2_049_000),
    # CIFAR ResNets with option-A shortcuts (akamaster/pytorch_resnet_cifar10: 0.27 M / 0.46 M / 1.7 M as in
    # He et al. Table 6) minus their 10-way fc (650), plus our two projection shortcuts: conv 16→32 and
    # 32→64 (512 + 2048) with their BNs (64 + 128).
    ("resnet20", 269_722 - 650 + 2_752), ("resnet32", 464_154 - 650 + 2_752),
    ("resnet110", 1_727_962 - 650 + 2_752)])
def test_parameter_counts(arch, backbone_params):
    model = build_model(arch, num_classes=10, channels=3)
    assert sum(p.numel() for p in model.backbone.parameters()) == backbone_params


def test_cosine_classifier_is_scaled_cosine_similarity():
    torch.manual_seed(0)
    head = CosineClassifier(feature_dim=16, num_classes=5, scale_init=16.0)
    features = torch.randn(8, 16, dtype=torch.float32) * 7.0  # the norm of f must not matter
    logits = head(features)
    f, w = features.double(), head.weight.detach().double()
    expected = 16.0 * (f / f.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= 16.0 + 1e-4
    # s is learnt: the loss has a gradient with respect to it, and the weights' norms do not matter
    F.cross_entropy(logits, torch.arange(5).repeat(2)[:8]).backward()
    assert head.scale.grad is not None and head.scale.grad.abs().item() > 0
    with torch.no_grad():
        head.weight.mul_(3.0)
    torch.testing.assert_close(head(features), logits.detach())


def test_fixed_scale_and_bad_scale():
    head = CosineClassifier(4, 3, scale_init=10.0, learn_scale=False)
    assert "scale" not in dict(head.named_parameters()) and float(head.scale) == 10.0
    with pytest.raises(ValueError, match="scale_init"):
        CosineClassifier(4, 3, scale_init=0.0)


def test_linear_classifier_is_dot_product():
    head = LinearClassifier(6, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(head(x), x @ head.weight.T + head.bias)
    assert head.weight.shape == (4, 6) and head.bias.shape == (4,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet33"), "unknown model.arch"), (dict(classifier="softmax"), "model.classifier"),
    (dict(channels=2), "channels"), (dict(num_classes=0), "num_classes"),
    (dict(arch="timm:resnet18"), "timm")])
def test_bad_arguments_name_the_problem(kwargs, match):
    args = {"arch": "resnet8", "num_classes": 3, "channels": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


@pytest.mark.parametrize("classifier", ["cosine", "linear"])
def test_export_roundtrip(tmp_path, classifier):
    torch.manual_seed(1)
    model = build_model("resnet8", num_classes=4, channels=1, classifier=classifier, scale_init=12.0)
    model.train()
    model(torch.randn(16, 1, 28, 28))  # move the BN running statistics away from their defaults
    path = export_model(model, tmp_path / "weights" / "final.pt")
    loaded = load_exported_model(path)
    assert not loaded.training and loaded.spec == model.spec
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"format": "other"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not an ltdist model export"):
        load_exported_model(tmp_path / "junk.pt")
