"""The stage-2 helper (scorers, val selection, classifier files) and evaluate over several files."""

import json

import pytest
import torch
import torch.nn.functional as F
from stage_fixtures import make_run_dir, stage_context

from ltdist.methods.classifier_set import (
    ClassifierSet,
    LinearScorer,
    load_classifier_sets,
    load_frozen_inputs,
    save_classifier_set,
    select_on_val,
)
from ltdist.rundir import features_path
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage


def test_scorers_equal_their_formulas():
    gen = torch.Generator().manual_seed(1)
    features, weight = torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen)
    bias, offset = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    cosine = LinearScorer("cosine", weight, scale=7.0, offset=offset).scores(features)
    expected = 7.0 * (features / features.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cosine, expected + offset)
    torch.testing.assert_close(LinearScorer("linear", weight, bias).scores(features), features @ weight.T + bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        LinearScorer("linear", weight, torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        LinearScorer("cosine", weight.clone().fill_(float("nan")))


def test_select_on_val_picks_the_best_and_falls_back_without_val():
    labels = torch.arange(3).repeat(4)
    val = {"features": F.one_hot(labels, 3).float(), "labels": labels}
    good, bad = LinearScorer("linear", torch.eye(3)), LinearScorer("linear", torch.eye(3).roll(1, 0))
    chosen, accuracy, note = select_on_val({0.5: bad, 1.0: good}, val, default=0.5, what="τ")
    assert chosen == 1.0 and accuracy == {"0.5": 0.0, "1.0": 1.0} and "chosen on val" in note
    chosen, accuracy, note = select_on_val({0.5: bad, 1.0: good}, None, default=0.5, what="τ")
    assert chosen == 0.5 and accuracy == {} and "no val split" in note


def test_frozen_inputs_reject_nonfinite_features(tmp_path):
    run_dir = make_run_dir(tmp_path)
    train = torch.load(features_path(run_dir, "train"))
    train["features"][7, 2] = float("nan")
    torch.save(train, features_path(run_dir, "train"))
    with pytest.raises(ValueError, match=r"non-finite train features \(rows \[7\]"):
        load_frozen_inputs(run_dir, "crt")


def test_evaluate_reports_every_file_and_cross_file_ensembles(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path)
    ctx = stage_context(run_dir, "stages=[kt,evaluate]")
    kt_stage.run(ctx)
    inputs = load_frozen_inputs(run_dir, "toy")
    means = torch.zeros(inputs.num_classes, inputs.feature_dim).index_add_(
        0, inputs.train["labels"], F.normalize(inputs.train["features"], dim=1))
    toy = ClassifierSet("toy", {"class means": LinearScorer("cosine", means, scale=16.0)},
                        ensembles={"means + KT ensemble": ["class means", "kt/ensemble"]}, chosen={"x": 1},
                        notes=["a note for the report"])
    save_classifier_set(run_dir, toy)
    assert list(load_classifier_sets(run_dir)) == ["toy"]
    evaluate_stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    assert {"ensemble", "class means", "means + KT ensemble"} <= set(report["classifiers"])
    test = inputs.test
    direct = (LinearScorer("cosine", means, scale=16.0).scores(test["features"]).argmax(1) == test["labels"])
    assert report["classifiers"]["class means"]["all"] == pytest.approx(direct.double().mean().item())
    md = (run_dir / "report.md").read_text()
    assert "## Classifiers on the frozen backbone" in md and "toy: a note for the report" in md
    assert "| Stage 2 | cosine classifier |" in capsys.readouterr().out


def test_evaluate_without_kt_reports_the_head(tmp_path):
    run_dir = make_run_dir(tmp_path, classifier="linear")
    save_classifier_set(run_dir, ClassifierSet("toy", {"copy": LinearScorer("linear", torch.eye(6, 64))}))
    evaluate_stage.run(stage_context(run_dir, "stages=[evaluate]"))
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["classifiers"]) == {"dot product", "copy"}
