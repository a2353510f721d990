"""The decoupled baselines (cRT, τ-norm, LWS, NCM, logit adjustment) against their formulas, and their stages."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from stage_fixtures import make_run_dir, stage_context

from ltdist.config import ConfigError, load_config, validate_config
from ltdist.methods.classifier_set import LinearScorer, head_scorer, load_classifier_sets, load_frozen_inputs
from ltdist.methods.decoupling import (
    RetrainConfig,
    balanced_batches,
    build_crt,
    build_lws,
    logit_adjusted_scorer,
    lws_scorer,
    ncm_scorer,
    tau_norm_scorer,
    tau_normalise,
)
from ltdist.rundir import features_path
from ltdist.stages import crt as crt_stage
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import logit_adjust, ncm, tau_norm
from ltdist.stages import lws as lws_stage


def chi_square_p_value(observed: torch.Tensor) -> float:
    """P(χ² ≥ statistic) for observed counts [C] against equal expected counts, C − 1 degrees of freedom."""
    observed = observed.double()
    expected = observed.sum() / observed.numel()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def test_tau_normalise_interpolates_between_the_raw_and_the_unit_rows():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    torch.testing.assert_close(tau_normalise(weight, 0.0), weight)
    torch.testing.assert_close(tau_normalise(weight, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(tau_normalise(weight, 0.5), torch.tensor([[3 / 5**0.5, 4 / 5**0.5], [0.0, 0.5**0.5]]))
    features = torch.tensor([[1.0, 2.0], [-3.0, 1.0]])
    linear = LinearScorer("linear", weight, torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(tau_norm_scorer(linear, 0.0).scores(features), features @ weight.T)  # bias dropped
    cosine = LinearScorer("cosine", weight, scale=8.0)
    torch.testing.assert_close(tau_norm_scorer(cosine, 1.0).scores(features), cosine.scores(features))
    unit = F.normalize(features, dim=1)
    torch.testing.assert_close(tau_norm_scorer(cosine, 0.0).scores(features), 8.0 * unit @ weight.T)


def test_lws_scales_each_class_score():
    features = torch.tensor([[1.0, 2.0]])
    linear = LinearScorer("linear", torch.eye(2), torch.tensor([1.0, -1.0]))  # scores [2, 1]
    scales = torch.tensor([2.0, 0.5])
    torch.testing.assert_close(lws_scorer(linear, scales).scores(features), torch.tensor([[4.0, 0.5]]))
    cosine = LinearScorer("cosine", torch.tensor([[2.0, 0.0], [0.0, 5.0]]), scale=10.0)
    # f = [3, 4]: cosines [0.6, 0.8] → stage-1 scores [6, 8] → LWS [12, 4], whatever ‖f‖.
    for f in (torch.tensor([[3.0, 4.0]]), torch.tensor([[21.0, 28.0]])):
        torch.testing.assert_close(lws_scorer(cosine, scales).scores(f), torch.tensor([[12.0, 4.0]]))


@pytest.mark.parametrize("center", [False, True])
def test_ncm_is_the_squared_distance_to_normalised_class_means(center):
    features = torch.tensor([[2.0, 0.0], [4.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    shifted = features - features.mean(dim=0) if center else features
    unit = shifted / shifted.norm(dim=1, keepdim=True)
    means = torch.stack([unit[labels == c].mean(dim=0) for c in range(3)])
    queries = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    shifted_q = queries - features.mean(dim=0) if center else queries
    unit_q = shifted_q / shifted_q.norm(dim=1, keepdim=True)
    expected = -torch.cdist(unit_q, means) ** 2
    scores = ncm_scorer(features, labels, 3, center=center).scores(queries)
    torch.testing.assert_close(scores - 1, expected)  # the constant ‖x̂‖² = 1 is dropped
    if not center:  # by hand: class 0's unit features [1, 0] and [4, 1]/√17
        torch.testing.assert_close(means[0], torch.tensor([(1 + 4 / 17**0.5) / 2, 1 / 17**0.5 / 2]))


def test_logit_adjustment_subtracts_tau_log_prior():
    head = LinearScorer("linear", torch.eye(2), torch.zeros(2))
    adjusted = logit_adjusted_scorer(head, torch.tensor([3, 1]), tau=2.0)
    # π = [0.75, 0.25]: offsets −2 log π = [0.5754, 2.7726]
    torch.testing.assert_close(adjusted.offset, torch.tensor([-2 * math.log(0.75), -2 * math.log(0.25)]))
    torch.testing.assert_close(adjusted.scores(torch.tensor([[1.0, 0.0]])), torch.tensor([[1.5754, 2.7726]]),
                               atol=1e-4, rtol=0)


def test_balanced_batches_see_every_class_equally_often():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([500, 100, 20, 5, 1])])
    draws = lambda power: torch.bincount(labels[torch.cat(list(balanced_batches(
        labels, power, 256, 40, torch.Generator().manual_seed(3))))], minlength=5)
    assert chi_square_p_value(draws(0.0)) > 1e-3
    assert chi_square_p_value(draws(1.0)) < 1e-12  # instance sampling: the test can tell


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path, classifier="linear")


def test_crt_trains_on_class_balanced_features(run_dir):
    inputs = load_frozen_inputs(run_dir, "crt")
    result = build_crt(inputs, RetrainConfig(epochs=5), seed=0)
    draws = torch.tensor(result.chosen["class_draws"])
    assert draws.sum() == 5 * math.ceil(300 * 6 / 512) * 512
    assert chi_square_p_value(draws) > 1e-3
    scorer = result.rows["cRT"]
    assert scorer.kind == "linear" and scorer.bias is not None
    test = inputs.test
    assert (scorer.scores(test["features"]).argmax(1) == test["labels"]).double().mean() > 0.9


def test_lws_raises_the_rare_classes(run_dir):
    inputs = load_frozen_inputs(run_dir, "lws")
    # A head biased as long-tail heads are: the class centres with norms growing with the class's count.
    centres = torch.stack([F.normalize(inputs.train["features"][inputs.train["labels"] == c].mean(0), dim=0)
                           for c in range(6)])
    with torch.no_grad():
        inputs.head.weight.copy_(centres * torch.tensor([3.0, 3.0, 2.0, 2.0, 0.5, 0.5])[:, None])
        inputs.head.bias.zero_()
    result = build_lws(inputs, RetrainConfig(epochs=5), seed=0)
    scales = torch.tensor(result.chosen["scales"])
    assert scales[4:].min() > scales[:2].max()  # LWS undoes the norm bias towards the many-shot classes
    test, few = inputs.test, inputs.test["labels"] >= 4
    accuracy = lambda scorer: (scorer.scores(test["features"][few]).argmax(1) == test["labels"][few]).double().mean()
    assert accuracy(result.rows["LWS"]) > accuracy(head_scorer(inputs.head)) + 0.1


def _poison(run_dir, split):
    data = torch.load(features_path(run_dir, split))
    data["labels"] = (data["labels"] + 1) % 6
    data["features"] = -data["features"]
    torch.save(data, features_path(run_dir, split))


def test_tau_and_adjustment_are_chosen_on_val_not_test(run_dir):
    ctx = stage_context(run_dir, "stages=[tau_norm,logit_adjust]")

    def chosen():
        tau_norm.run(ctx)
        logit_adjust.run(ctx)
        sets = load_classifier_sets(run_dir)
        return sets["tau_norm"].chosen, sets["logit_adjust"].chosen

    before = chosen()
    assert before[0]["val_accuracy"] and before[1]["val_accuracy"]  # a real choice over the grid
    _poison(run_dir, "test")
    assert chosen() == before
    _poison(run_dir, "val")
    assert chosen() != before  # the choice does read val
    features_path(run_dir, "val").unlink()
    tau_result, adjust_result = chosen()
    assert tau_result == {"tau": 1.0, "val_accuracy": {}} and adjust_result["tau"] == 1.0
    assert "no val split" in load_classifier_sets(run_dir)["tau_norm"].notes[0]


def test_every_baseline_stage_then_evaluate(run_dir):
    ctx = stage_context(run_dir, "model.classifier=linear", "method.crt.epochs=2", "method.lws.epochs=2",
                        "method.tau_norm.grid=[0.0,0.5,1.0]", "method.tau_norm.default=0.5")
    for stage in (crt_stage, tau_norm, lws_stage, ncm, logit_adjust, evaluate_stage):
        stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["classifiers"]) == {"dot product", "cRT", "τ-norm", "LWS", "NCM",
                                          "logit adjustment (post-hoc)"}
    assert load_classifier_sets(run_dir)["tau_norm"].chosen["tau"] in (0.0, 0.5, 1.0)
    md = (run_dir / "report.md").read_text()
    assert "tau_norm: τ = " in md and "chosen on val" in md and "logit_adjust: τ = " in md
    test = torch.load(features_path(run_dir, "test"))
    ncm_set = load_classifier_sets(run_dir)["ncm"]
    direct = ncm_set.rows["NCM"].scores(test["features"]).argmax(1) == test["labels"]
    assert report["classifiers"]["NCM"]["all"] == pytest.approx(direct.double().mean().item())


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_every_stage2_classifier_runs_on_either_head(tmp_path, head):
    """The comparison protocol's premise: cRT, τ-norm, LWS, NCM, post-hoc adjustment and KT on a cosine-head
    backbone and on a linear-head one, from the same features."""
    from ltdist.stages import kt as kt_stage

    run_dir = make_run_dir(tmp_path, classifier=head)
    ctx = stage_context(run_dir, f"model.classifier={head}", "method.crt.epochs=1", "method.lws.epochs=1",
                        "method.kt.ks=[0,20]")
    for stage in (kt_stage, crt_stage, tau_norm, lws_stage, ncm, logit_adjust, evaluate_stage):
        stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    own = "cosine" if head == "cosine" else "dot product"
    assert {own, "cRT", "τ-norm", "LWS", "NCM", "logit adjustment (post-hoc)", "w_h(0)", "w_h(20)",
            "ensemble"} <= set(report["classifiers"])
    # Every classifier learned something: 6 separable classes, chance is 1/6.
    assert all(row["all"] > 0.5 for row in report["classifiers"].values()), report["classifiers"]


def test_config_checks_the_baseline_keys():
    cfg = load_config(overrides=["method.tau_norm.grid=[0.5,1.5]", "method.crt.sampling_power=2",
                                 "method.lws.lr=0"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    problems = "\n".join(info.value.problems)
    assert "method.tau_norm.default: must be one of the grid's values, got 1.0" in problems
    assert "method.crt.sampling_power: must be in [0, 1]" in problems and "method.lws.lr:" in problems
    validate_config(load_config(overrides=["method.logit_adjust.grid=[0.0,0.5]", "method.logit_adjust.default=0.5"]))
