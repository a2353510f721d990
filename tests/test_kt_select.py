"""KT's τ and k set chosen on val (method.kt.select_on_val), beside paper 1's fixed choice."""

import json

import torch
from stage_fixtures import make_run_dir, stage_context

from ltdist.methods.classifier_set import LinearScorer, load_classifier_sets
from ltdist.methods.kt_select import ProbabilityEnsemble, k_subsets
from ltdist.rundir import features_path
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage


def test_k_subsets_start_with_the_full_set():
    assert k_subsets([20, 0, 100]) == [(0, 20, 100), (0, 20), (0, 100), (20, 100), (0,), (20,), (100,)]


def test_probability_ensemble_is_the_log_of_the_mean_probability():
    a = LinearScorer("linear", torch.tensor([[1.0], [0.0]]))
    b = LinearScorer("linear", torch.tensor([[0.0], [3.0]]))
    scores = ProbabilityEnsemble([a, b]).scores(torch.tensor([[1.0]]))
    # softmax([1, 0]) = [0.7311, 0.2689], softmax([0, 3]) = [0.0474, 0.9526] → mean [0.3892, 0.6108]
    torch.testing.assert_close(scores.exp(), torch.tensor([[0.38926, 0.61074]]), atol=1e-4, rtol=0)


def _chosen(run_dir, *overrides):
    kt_stage.run(stage_context(run_dir, "stages=[kt,evaluate]", "method.kt.select_on_val=true",
                               "method.kt.tau_grid=[1.0,50.0]", *overrides))
    return load_classifier_sets(run_dir)["kt_val"]


def test_kt_tau_and_ks_are_chosen_on_val_and_reported_beside_the_paper(tmp_path):
    run_dir = make_run_dir(tmp_path)
    result = _chosen(run_dir)
    chosen, accuracy = result.chosen, result.chosen["val_accuracy"]
    assert chosen["paper"] == {"tau": 10.0, "ks": [0, 20, 100]}
    assert len(accuracy) == 3 * 7  # τ ∈ {10 (paper), 1, 50} × the non-empty subsets of {0, 20, 100}
    best = str((chosen["tau"], tuple(chosen["ks"])))
    assert accuracy[best] == max(accuracy.values()) >= accuracy[str((10.0, (0, 20, 100)))]
    assert list(result.ensembles["KT-val ensemble"]) == [f"KT-val w_h({k})" for k in chosen["ks"]]

    test = torch.load(features_path(run_dir, "test"))
    test["labels"] = (test["labels"] + 3) % 6  # poison the test split: the choice must not move
    torch.save(test, features_path(run_dir, "test"))
    assert _chosen(run_dir).chosen == chosen

    evaluate_stage.run(stage_context(run_dir, "stages=[kt,evaluate]"))
    report = json.loads((run_dir / "report.json").read_text())
    assert {"ensemble", "KT-val ensemble"} <= set(report["classifiers"])
    md = (run_dir / "report.md").read_text()
    assert "kt_val: (τ, k set) = " in md and "paper 1's fixed choice τ = 10" in md
    assert "|  | ensemble (w_h(0), w_h(20), w_h(100)) |" in md.split("## Classifiers on the frozen backbone")[1]

    features_path(run_dir, "val").unlink()
    without_val = _chosen(run_dir)
    assert (without_val.chosen["tau"], without_val.chosen["ks"]) == (10.0, [0, 20, 100])
    assert "no val split" in without_val.notes[0]
