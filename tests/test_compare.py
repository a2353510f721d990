"""``ltdist compare``: mean ± std over seeds of every (stage-1 objective, stage-2 classifier) from run dirs."""

import json
import statistics

import pytest
import torch

from ltdist.evaluate.compare import find_runs, main
from ltdist.methods.classifier_set import ClassifierSet, LinearScorer, save_classifier_set

GROUPS = {"many": [0], "medium": [1], "few": [2]}


def _run(root, name, seed, accuracies, loss=None, head="cosine", experiment="fmnist_lt"):
    """A run dir with config.yaml (method.loss only when given) and report.json; accuracies: row → (many, few)."""
    run_dir = root / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    method = f"method:\n  loss: {loss}\n" if loss else "method:\n  name: kt\n"
    (run_dir / "config.yaml").write_text(f"experiment: {experiment}\nmodel:\n  classifier: {head}\n"
                                         f"trainer:\n  seed: {seed}\n{method}")
    classifiers = {row: {"many": many, "medium": 0.5, "few": few, "all": (many + few) / 2}
                   for row, (many, few) in accuracies.items()}
    (run_dir / "report.json").write_text(json.dumps({"dataset": "toy", "groups": GROUPS, "classifiers": classifiers}))
    return run_dir


def test_compare_aggregates_mean_and_std_over_seeds(tmp_path, capsys):
    ce_few = [0.10, 0.20, 0.60]
    for seed, few in enumerate(ce_few):
        _run(tmp_path / "runs", "ce", seed, {"cosine": (0.9, few), "cRT": (0.8, few + 0.2)})  # no method.loss: "ce"
    for seed, many in enumerate([0.70, 0.74]):
        run_dir = _run(tmp_path / "runs", "bs", seed, {"cosine": (many, 0.5)}, loss="balanced_softmax")
    save_classifier_set(run_dir, ClassifierSet("tau_norm", {"τ-norm": LinearScorer("linear", torch.eye(3))},
                                               chosen={"tau": 0.7, "val_accuracy": {"0.7": 0.5}}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    methods = {(m["stage1"], m["stage2"]): m for m in data["methods"]}
    assert set(methods) == {("ce (cosine head)", "cosine"), ("ce (cosine head)", "cRT"),
                            ("balanced_softmax (cosine head)", "cosine")}
    few = methods[("ce (cosine head)", "cosine")]["few"]
    assert few["mean"] == pytest.approx(0.3) and few["std"] == pytest.approx(statistics.stdev(ce_few))
    assert few["runs"] == 3 and methods[("ce (cosine head)", "cosine")]["seeds"] == [0, 1, 2]
    many = methods[("balanced_softmax (cosine head)", "cosine")]["many"]
    assert many["mean"] == pytest.approx(0.72) and many["std"] == pytest.approx(0.0282843, abs=1e-6)
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| ce (cosine head) | cosine | 90.0 ± 0.0 | 50.0 ± 0.0 | 30.0 ± 26.5 | 60.0 ± 13.2 | 3 |" in md
    assert "|  | cRT | 80.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 26.5 | 65.0 ± 13.2 | 3 |" in md
    assert "| balanced_softmax (cosine head) | cosine | 72.0 ± 2.8 |" in md
    assert f"- `{run_dir}`: balanced_softmax (cosine head), seed 1; chosen on val: tau_norm tau = 0.7" in md
    chosen = {r["run_dir"]: r["chosen_on_val"] for r in data["runs"]}
    assert chosen[str(run_dir)] == {"tau_norm": {"tau": 0.7}} and list(chosen.values()).count({}) == 4
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "png: " in capsys.readouterr().out
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "o2"), "--classifiers", "cRT"]) == 0
    assert [m["stage2"] for m in json.loads((tmp_path / "o2" / "comparison.json").read_text())["methods"]] == ["cRT"]


def test_compare_labels_and_refuses_duplicate_seeds(tmp_path, capsys):
    _run(tmp_path, "a", 0, {"cosine": (0.9, 0.1)}, loss="ce", head="linear", experiment="lt_a")
    _run(tmp_path, "b", 0, {"cosine": (0.8, 0.2)}, loss="ce", head="linear", experiment="lt_b")
    assert {r.objective for r in find_runs([tmp_path])} == {"ce"}
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0  # two experiments: the label says which
    stage1 = {m["stage1"] for m in json.loads((tmp_path / "out" / "comparison.json").read_text())["methods"]}
    assert stage1 == {"lt_a: ce (linear head)", "lt_b: ce (linear head)"}
    _run(tmp_path, "c", 0, {"cosine": (0.7, 0.3)}, loss="ce", head="linear", experiment="lt_a")
    assert main([str(tmp_path)]) == 2
    assert "several runs with seed [0]" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_mpcl_without_its_meta_network_is_labelled_ce_plus_lpc(tmp_path):
    _run(tmp_path, "mpdt", 0, {"cosine": (0.9, 0.1)}, loss="mpcl", head="linear")
    lpc = _run(tmp_path, "lpc", 0, {"cosine": (0.9, 0.1)}, loss="mpcl", head="linear", experiment="fmnist_lt_lpc")
    config = lpc / "config.yaml"
    config.write_text(config.read_text() + "  mpcl:\n    meta_network: false\n")
    assert sorted(r.objective for r in find_runs([tmp_path])) == ["ce + L_PC", "mpcl"]


def test_pick_keeps_the_named_pairs_in_order(tmp_path, capsys):
    for seed in (0, 1):
        _run(tmp_path, "ce", seed, {"cosine": (0.9, 0.1), "cRT": (0.8, 0.5)}, loss="ce", head="linear")
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--pick", "ce (linear head)=cRT",
                 "ce (linear head)=cosine"]) == 0
    methods = json.loads((tmp_path / "o" / "comparison.json").read_text())["methods"]
    assert [m["stage2"] for m in methods] == ["cRT", "cosine"]
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--pick", "ce=cRT"]) == 2
    assert "no such STAGE1=CLASSIFIER row" in capsys.readouterr().err


def test_split_val_compares_the_rows_scored_on_val(tmp_path, capsys):
    for seed in range(2):
        run_dir = _run(tmp_path / "runs", "ce", seed, {"cosine": (0.9, 0.1)})
        report = json.loads((run_dir / "report.json").read_text())
        report["val"] = {"samples": 30, "classifiers": {"cosine": {"many": 0.6, "medium": 0.5, "few": 0.4 + seed / 10,
                                                                   "all": 0.5}}}
        (run_dir / "report.json").write_text(json.dumps(report))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "val"), "--split", "val"]) == 0
    data = json.loads((tmp_path / "val" / "comparison.json").read_text())
    assert data["split"] == "val" and data["methods"][0]["few"]["mean"] == pytest.approx(0.45)
    assert "on the val split" in (tmp_path / "val" / "comparison.md").read_text()
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "comparison.json").read_text())["methods"][0]["few"]["mean"] == 0.1
    _run(tmp_path / "runs", "old", 0, {"cosine": (0.9, 0.1)}, experiment="older")  # a report without val rows
    assert main([str(tmp_path / "runs"), "--split", "val"]) == 2
    assert "has no val scores" in capsys.readouterr().err


def test_kept_reports_recompute_the_same_comparison_without_the_run_dirs(tmp_path):
    for seed, few in enumerate([0.1, 0.3, 0.2]):
        run_dir = _run(tmp_path / "runs", "ce", seed, {"cosine": (0.9, few), "cRT": (0.8, few + 0.1)}, loss="ce")
    save_classifier_set(run_dir, ClassifierSet("tau_norm", {"τ-norm": LinearScorer("linear", torch.eye(3))},
                                               chosen={"tau": 0.7}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "a"), "--keep-reports",
                 "--claim", "ce (cosine head)=cRT > ce (cosine head)=cosine"]) == 0
    kept = sorted(p.relative_to(tmp_path / "a" / "runs").as_posix() for p in (tmp_path / "a" / "runs").rglob("*.*"))
    assert kept == [f"fmnist_lt/seed{s}/{f}" for s in range(3) for f in ("config.yaml", "report.json")]
    assert not list((tmp_path / "a" / "runs").rglob("classifiers"))
    assert main([str(tmp_path / "a" / "runs"), "--out", str(tmp_path / "b"),
                 "--claim", "ce (cosine head)=cRT > ce (cosine head)=cosine"]) == 0
    first, again = (json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("a", "b"))
    assert again["methods"] == first["methods"] and again["conclusions"] == first["conclusions"]
    assert [r["chosen_on_val"] for r in again["runs"]] == [{}, {}, {"tau_norm": {"tau": 0.7}}]
