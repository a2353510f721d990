"""Pretrained backbones: torchvision-layout files load strictly, wrong files name their keys, unsafe files are
refused, and a frozen pretrained backbone (model.weights, no train stage) gives the source model's features."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from data_fixtures import write_imagefolder

from ltdist.data.build import build_shards
from ltdist.models import build_model, export_model
from ltdist.models.resnet_imagenet import IMAGENET_SPECS, ImageNetResNet
from ltdist.models.weights import WeightsMismatchError, load_backbone_state, load_weights_file
from ltdist.rundir import load_features
from ltdist.stages import run_stages


def torchvision_layout(net: ImageNetResNet, arch: str, classes: int = 1000) -> dict[str, torch.Tensor]:
    """``net``'s weights under the key names torchvision's ResNet gives them (conv1, bn1, layer<s>.<b>, fc), without
    BatchNorm's num_batches_tracked (torchvision's published files predate it), plus a ``classes``-way fc."""
    blocks = IMAGENET_SPECS[arch][0]
    names = {0: "conv1", 1: "bn1"}
    layer_of = [(s + 1, b) for s, n in enumerate(blocks) for b in range(n)]
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        part, index, rest = key.split(".", 2)
        if part == "stem":
            key = f"{names[int(index)]}.{rest}"
        else:
            s, b = layer_of[int(index)]
            key = f"layer{s}.{b}.{rest}"
        state[key] = value.clone()
    state["fc.weight"], state["fc.bias"] = torch.randn(classes, net.feature_dim), torch.randn(classes)
    return state


@pytest.fixture(scope="module")
def resnet50_source():
    torch.manual_seed(1)
    net = ImageNetResNet("resnet50", 3)
    with torch.no_grad():  # non-trivial BN statistics and last-BN weights (zero at init), so a skipped key shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def test_a_torchvision_layout_state_dict_loads_strictly(resnet50_source, caplog):
    state = torchvision_layout(resnet50_source, "resnet50")
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias",
            "fc.weight"} <= set(state)
    torch.manual_seed(2)
    fresh = ImageNetResNet("resnet50", 3)
    caplog.set_level("INFO", logger="ltdist.models.weights")
    load_backbone_state(fresh, state, "resnet50-test.pth")
    assert "fc.bias, fc.weight" in caplog.text  # the old head is named, not loaded
    for key, value in resnet50_source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), resnet50_source.eval()(x))


def test_a_wrong_state_dict_names_its_keys(resnet50_source):
    state = torchvision_layout(resnet50_source, "resnet50")
    del state["layer2.1.bn2.running_mean"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone_state(ImageNetResNet("resnet50", 3), state, "wrong.pth")
    text = str(err.value)
    assert isinstance(err.value, ValueError) and text.startswith("wrong.pth does not fit")
    assert re.search(r"1 missing from the file: stages\.4\.bn2\.running_mean\b", text)  # layer2.1 = stages.4
    assert "1 unexpected in the file: layer5.0.conv1.weight" in text
    assert "stages.7.conv2.weight (256, 256, 1, 1) in the file, (256, 256, 3, 3) in the backbone" in text
    assert len(text.splitlines()) <= 5 and "Traceback" not in text
    # ResNet-152 weights for a ResNet-50: the surplus blocks are listed, shortened.
    with pytest.raises(WeightsMismatchError, match=r"unexpected in the file: layer2\.4\..*… and \d+ more"):
        load_backbone_state(ImageNetResNet("resnet50", 3), torchvision_layout(ImageNetResNet("resnet152", 3),
                                                                             "resnet152"), "resnet152.pth")


def test_weights_files_are_read_safely_in_every_accepted_layout(tmp_path):
    state = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    for name, payload in (("raw", state), ("sd", {"state_dict": state, "epoch": 3}), ("model", {"model": state})):
        torch.save(payload, tmp_path / f"{name}.pt")
        got = load_weights_file(tmp_path / f"{name}.pt")
        assert set(got) == set(state) and torch.equal(got["a.weight"], state["a.weight"])
    torch.save({"state_dict": state, "hook": hashlib.sha256}, tmp_path / "code.pt")  # a pickled global
    with pytest.raises(ValueError, match=r"code\.pt is not a weights file torch\.load\(weights_only=True\) accepts"):
        load_weights_file(tmp_path / "code.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_weights_file(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError, match=r"model\.weights: no file at"):
        load_weights_file(tmp_path / "absent.pt")


def test_frozen_pretrained_backbone_reproduces_the_source_models_features(tmp_path):
    """Source run: an ltdist model export + extract. New run: model.weights=<that weights/final.pt> and
    stages=[extract, kt, ncm, crt, evaluate], no train: identical features, a KT report, the weights recorded."""
    from stage_fixtures import stage_context

    src = write_imagefolder(tmp_path / "tree", {"train": [40, 20, 10, 6], "test": [5] * 4}, size=8)
    shards = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=2, shard_size=16,
                          progress=False).parent
    data = [f"data.shards={shards}", "data.format=imagefolder", "data.image_size=8", "data.num_workers=0",
            "model.arch=resnet8", "evaluate.many_threshold=20", "evaluate.few_threshold=8", "method.kt.ks=[0,10]",
            "method.crt.epochs=2"]
    torch.manual_seed(3)
    source = build_model("resnet8", num_classes=4, channels=1)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    weights = export_model(source, tmp_path / "source" / "weights" / "final.pt")
    run_stages(stage_context(tmp_path / "source", *data, "stages=[extract]"))
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    run_stages(stage_context(frozen, *data, f"model.weights={weights}", "stages=[extract,kt,ncm,crt,evaluate]"))
    for split in ("train", "val", "test"):
        a, b = load_features(tmp_path / "source", split), load_features(frozen, split)
        assert a["keys"] == b["keys"] and torch.equal(a["features"], b["features"]), split
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads((frozen / "weights" / "source.json").read_text()) == {"path": str(weights), "sha256": digest}
    report = json.loads((frozen / "report.json").read_text())
    assert report["weights"]["sha256"] == digest
    assert {"ensemble", "NCM", "cRT"} <= set(report["classifiers"])
    assert digest in (frozen / "report.md").read_text()
    # The imprinted head: row j is class j's prototype (normalised mean of normalised train features).
    head = torch.load(frozen / "weights" / "final.pt", weights_only=True)["state_dict"]["classifier.weight"]
    train = load_features(frozen, "train")
    f = torch.nn.functional.normalize(train["features"], dim=1)
    mean0 = torch.nn.functional.normalize(f[train["labels"] == 0].mean(0), dim=0)
    torch.testing.assert_close(head[0], mean0)
