"""The kt and evaluate stages on a synthetic run directory (real model export, constructed features)."""

import json

import pytest
import torch
import torch.nn.functional as F
from stage_fixtures import FEATURE_DIM, TRAIN_COUNTS, stage_context
from stage_fixtures import make_run_dir as _make_run_dir

from ltdist.rundir import features_path
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage
from ltdist.stages.kt import load_kt_classifiers


@pytest.fixture
def run_dir(tmp_path):
    return _make_run_dir(tmp_path)


def _context(run_dir, *overrides):
    return stage_context(run_dir, "stages=[kt,evaluate]", *overrides)


def _direct_accuracy(vectors, test, scale=16.0):
    logits = scale * F.normalize(test["features"], dim=1) @ F.normalize(vectors, dim=1).T
    return logits.argmax(dim=1)


def test_kt_then_evaluate_writes_consistent_report(run_dir, capsys):
    ctx = _context(run_dir)
    kt_stage.run(ctx)
    kt = load_kt_classifiers(run_dir)
    assert kt.ks == [0, 20, 100] and kt.w_h.shape == (3, 6, FEATURE_DIM)
    assert kt.train_counts.tolist() == TRAIN_COUNTS and torch.equal(kt.backbone_counts, kt.train_counts)
    evaluate_stage.run(ctx)
    out = capsys.readouterr().out
    assert "| Full training | cosine classifier |" in out and f"report: {run_dir / 'report.md'}" in out

    report = json.loads((run_dir / "report.json").read_text())
    assert report["dataset"] == "synthetic"
    assert report["groups"] == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    names = set(report["classifiers"])
    assert names == {"cosine", "prototypes", "prototypes + classifier", "w_h(0)", "w_h(20)", "w_h(100)",
                     "ensemble", "w_hc(0)", "w_hc(20)", "w_hc(100)", "continual ensemble"}
    test = torch.load(features_path(run_dir, "test"))
    # Reported numbers equal a direct scoring of the same classifiers.
    proto_pred = _direct_accuracy(kt.prototypes, test)
    assert report["classifiers"]["prototypes"]["all"] == pytest.approx(
        (proto_pred == test["labels"]).double().mean().item())
    scale = kt.scale
    f_hat = F.normalize(test["features"], dim=1)
    ens = sum(torch.softmax(scale * f_hat @ F.normalize(v, dim=1).T, dim=1) for v in kt.w_h)
    ens_correct = ens.argmax(dim=1) == test["labels"]
    few = torch.isin(test["labels"], torch.tensor([4, 5]))
    ensemble = report["classifiers"]["ensemble"]
    assert ensemble["few"] == pytest.approx(ens_correct[few].double().mean().item())
    assert ensemble["all"] == pytest.approx(ens_correct.double().mean().item())
    # Well-separated clusters: prototypes are near perfect, the noisy rare rows of the head are not.
    assert report["classifiers"]["prototypes"]["all"] > 0.95
    assert (run_dir / "plots" / "per_class_accuracy.png").stat().st_size > 5000
    md = (run_dir / "report.md").read_text()
    assert "KT classifiers (paper 1 Table 1 layout)" in md
    assert "|  | ensemble (w_h(0), w_h(20), w_h(100)) |" in md
    assert "|  | continual ensemble (prototypes, w_hc(20), w_hc(100)) |" in md


def test_continual_setting_builds_excluded_classes_from_prototypes(run_dir):
    ctx = _context(run_dir, "data.exclude_from_training=few")
    kt_stage.run(ctx)
    kt = load_kt_classifiers(run_dir)
    assert kt.backbone_counts.tolist() == [300, 150, 60, 25, 0, 0]
    torch.testing.assert_close(kt.w_h[:, 4:], kt.w_hc[:, 4:])
    evaluate_stage.run(ctx)
    md = (run_dir / "report.md").read_text()
    assert "| Classes [4, 5] excluded |" in md and "withheld from backbone training" in md
    report = json.loads((run_dir / "report.json").read_text())
    assert report["groups"]["few"] == [4, 5]  # groups still follow the dataset's counts
    assert report["classifiers"]["w_hc(20)"]["few"] > 0.9


def test_prototypes_from_val_and_missing_inputs(run_dir, tmp_path_factory):
    kt_stage.run(_context(run_dir, "method.kt.prototypes_from=val"))
    kt = load_kt_classifiers(run_dir)
    val = torch.load(features_path(run_dir, "val"))
    mean = F.normalize(val["features"][val["labels"] == 5], dim=1).mean(dim=0)
    torch.testing.assert_close(kt.prototypes[5], mean / mean.norm())
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="train stage"):
        kt_stage.run(_context(empty))
    with pytest.raises(FileNotFoundError, match="holds no classifier: run the kt stage first"):
        evaluate_stage.run(_context(empty))


def test_dot_product_baseline_when_the_head_is_linear(tmp_path):
    run_dir = _make_run_dir(tmp_path, classifier="linear")
    ctx = _context(run_dir, "model.classifier=linear", "method.kt.linear_scale=8.0")
    kt_stage.run(ctx)
    kt = load_kt_classifiers(run_dir)
    assert kt.classifier_type == "linear" and kt.scale == 8.0  # method.kt.linear_scale for the KT softmax
    evaluate_stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    assert "cosine" not in report["classifiers"]
    test = torch.load(features_path(run_dir, "test"))
    correct = (test["features"] @ kt.weights.T + kt.bias).argmax(dim=1) == test["labels"]
    assert report["classifiers"]["dot product"]["all"] == pytest.approx(correct.double().mean().item())
    assert "| Full training | dot product |" in (run_dir / "report.md").read_text()
