"""Long-tail evaluation: group boundaries, accuracy per class / group, report files and plots."""

import csv
import itertools
import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stage_fixtures import make_run_dir, stage_context

from ltdist.class_groups import class_groups, group_accuracy, per_class_accuracy
from ltdist.count_bins import binned_accuracy, count_bins
from ltdist.evaluate import TableSection, plot_group_bars, plot_per_class_accuracy, write_report
from ltdist.evaluate.aggregate import aggregate_reports, format_mean_std_table, mean_std_cell
from ltdist.methods.classifier_set import ClassifierSet, LinearScorer
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage
from ltdist.stages.evaluate import evaluate_run, predict_all
from ltdist.stages.kt import load_kt_classifiers


def test_group_assignment_at_threshold_boundaries():
    counts = [101, 100, 99, 21, 20, 19, 0, 5000]
    groups = class_groups(counts, many_threshold=100, few_threshold=20)
    # n > 100 is many-shot; n < 20 is few-shot; 20 and 100 themselves are medium-shot.
    assert groups == {"many": [0, 7], "medium": [1, 2, 3, 4], "few": [5, 6]}


def test_group_thresholds_are_configurable_and_checked():
    groups = class_groups([10, 50], many_threshold=10, few_threshold=10)
    assert groups == {"many": [1], "medium": [0], "few": []}
    with pytest.raises(ValueError, match="few_threshold"):
        class_groups([1, 2], many_threshold=10, few_threshold=20)
    with pytest.raises(ValueError, match="non-negative"):
        class_groups([-1, 2])


def test_per_class_and_group_accuracy_against_direct_count():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=gen)
    labels[labels == 4] = 3  # class 4 has no test sample
    noise = torch.randint(0, 5, (400,), generator=gen)
    predictions = torch.where(torch.rand(400, generator=gen) < 0.6, labels, noise)
    per_class = per_class_accuracy(predictions, labels, 5)
    for c in range(4):
        mask = labels == c
        assert per_class[c].item() == pytest.approx((predictions[mask] == c).double().mean().item())
    assert per_class[4].isnan()
    groups = {"many": [0, 1], "medium": [2], "few": [3, 4]}
    acc = group_accuracy(predictions, labels, groups, 5)
    assert acc["many"] == pytest.approx((per_class[0] + per_class[1]).item() / 2)
    assert acc["medium"] == pytest.approx(per_class[2].item())
    assert acc["few"] == pytest.approx(per_class[3].item())  # untested class 4 is left out
    assert acc["all"] == pytest.approx((predictions == labels).double().mean().item())
    assert group_accuracy(predictions, labels, {"many": [0], "medium": [], "few": []}, 5)["medium"] is None


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must lie"):
        per_class_accuracy(torch.tensor([0]), torch.tensor([7]), 3)
    with pytest.raises(ValueError, match="equal-length"):
        per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_report_files_written_and_readable(tmp_path):
    counts = [500, 60, 5]
    groups = class_groups(counts)
    results = {"cosine": {"many": 0.9, "medium": 0.5, "few": None, "all": 0.6},
               "ensemble": {"many": 0.8, "medium": 0.6, "few": 0.4, "all": 0.65}}
    per_class = {"cosine": [0.9, 0.5, float("nan")], "ensemble": [0.8, 0.6, 0.4]}
    plots = [plot_per_class_accuracy(tmp_path / "plots" / "per_class.png", counts, per_class, 100, 20),
             plot_group_bars(tmp_path / "plots" / "groups.png", results)]
    tables = {"Full training": [TableSection("Ours", list(results))]}
    md_path = write_report(tmp_path, dataset="toy", groups=groups, results=results, per_class=per_class,
                           train_counts=counts, tables=tables,
                           notes=["N/A: no class of the group was trained"], plots=plots)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"dataset": "toy", "groups": {"many": [0], "medium": [1], "few": [2]},
                      "classifiers": results}
    per_class_json = json.loads((tmp_path / "per_class_accuracy.json").read_text())
    assert per_class_json["classifiers"]["cosine"] == [0.9, 0.5, None]
    md = md_path.read_text()
    assert "| Ours | cosine | 90.0 | 50.0 | N/A | 60.0 |" in md
    assert "|  | ensemble | 80.0 | 60.0 | 40.0 | 65.0 |" in md
    assert "plots/per_class.png" in md
    for png in plots:  # real PNGs, not empty files
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_refuses_table_rows_without_results(tmp_path):
    with pytest.raises(KeyError, match="w_h"):
        write_report(tmp_path, dataset="toy", groups={"many": [0], "medium": [], "few": []},
                     results={"cosine": {"many": 1.0, "medium": None, "few": None, "all": 1.0}},
                     per_class={"cosine": [1.0]}, train_counts=[200],
                     tables={"t": [TableSection("Ours", ["cosine", "w_h(0)"])]})


def test_aggregate_mean_and_std_over_runs(tmp_path):
    paths = []
    for seed, (many, few) in enumerate([(0.80, 0.40), (0.90, None), (0.70, 0.60)]):
        report = {"dataset": "toy", "groups": {"many": [0], "medium": [], "few": [1]},
                  "classifiers": {"cosine": {"many": many, "medium": None, "few": few, "all": 0.5}}}
        paths.append(tmp_path / f"r{seed}.json")
        paths[-1].write_text(json.dumps(report))
    table = aggregate_reports(paths)
    assert table["cosine"]["many"] == pytest.approx((0.8, 0.1, 3))
    assert table["cosine"]["few"] == pytest.approx((0.5, statistics.stdev([0.4, 0.6]), 2))  # None is left out
    assert table["cosine"]["medium"] is None
    assert "| cosine | 80.0 ± 10.0 | N/A | 50.0 ± 14.1 | 50.0 ± 0.0 |" in format_mean_std_table(table)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"dataset": "other", "groups": {}, "classifiers": {}}))
    with pytest.raises(ValueError, match="cannot average"):
        aggregate_reports([paths[0], other])
    assert mean_std_cell((0.811, 0.0, 1)) == "81.1 (1 run)"  # one run has no spread to show


def test_a_best_row_with_no_seed_in_common_gets_no_verdict(tmp_path):
    from ltdist.evaluate.compare import compare_runs, conclusions, find_runs, format_conclusions

    for seed in range(3):
        rows = {"cRT": (0.9, 0.5 + seed / 100), "NCM": (0.7, 0.3)}
        if seed:
            rows[f"KT-val w_h({seed})"] = (0.5, 0.1)  # a row named after what one seed chose
        else:
            rows["KT-val w_h(0)"] = (1.0, 1.0)
        _report_run(tmp_path, seed, rows)
    runs = find_runs([tmp_path])
    found = conclusions(runs, compare_runs(runs))
    best = found["best_overall"]
    assert best["best"].endswith("=KT-val w_h(0)")
    assert [d.verdict for d in best["versus"]] == ["n/a", "n/a"]  # cRT and NCM: seed 0 only in common
    assert sorted(best["unpaired"]) == ["ce (linear head)=KT-val w_h(1)", "ce (linear head)=KT-val w_h(2)"]
    assert "ahead of 0 of 2 others beyond seed noise; no verdict against 4 rows with fewer than 2 seeds in common" \
        in format_conclusions(found)


def test_count_bins_partition_the_classes_at_powers_of_two():
    counts = [0, 1, 2, 3, 4, 7, 8, 40, 1000, 5, 0]
    bins = count_bins(counts)
    # 16–31 holds no class: it joins the next bin (16–63, n = 40); so do 64–127, …, 256–511 (64–1000).
    assert [(b.lo, b.hi, b.classes) for b in bins] == [
        (0, 0, [0, 10]), (1, 1, [1]), (2, 3, [2, 3]), (4, 7, [4, 5, 9]), (8, 15, [6]), (16, 63, [7]),
        (64, 1000, [8])]
    assert [(b.lo, b.hi) for b in count_bins(range(2, 1001))][::8] == [(2, 3), (512, 1000)]  # iNat-2018's range
    assert count_bins([5, 5]) == [(5, 5, [0, 1])] and count_bins([]) == []
    with pytest.raises(ValueError, match="non-negative"):
        count_bins([3, -1])


def test_binned_accuracy_leaves_untested_classes_out():
    nan = float("nan")
    bins = count_bins([1, 1, 1, 2, 2])
    mean, std = binned_accuracy([0.2, nan, 0.6, nan, nan], bins)
    assert mean[0] == pytest.approx(0.4) and std[0] == pytest.approx(0.2)  # population std of {0.2, 0.6}
    assert math.isnan(mean[1]) and math.isnan(std[1])  # no tested class in the bin


def _synthetic_run(tmp_path, train_counts: list[int], test_counts: list[int], per_class_rows_max: int = 50):
    """evaluate_run on constructed features and two fixed linear classifiers (no training).

    "cosine" scores against the class centres; "biased" adds log(n + 1) to the scores, as a head trained on
    the long tail would, so its accuracy rises with the training count.
    """
    gen = torch.Generator().manual_seed(0)
    num_classes = len(train_counts)
    centres = F.normalize(torch.randn(num_classes, 32, generator=gen), dim=1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(test_counts)])
    test = {"features": 3 * centres[labels] + torch.randn(len(labels), 32, generator=gen), "labels": labels}
    log_counts = torch.log(torch.tensor(train_counts, dtype=torch.float32) + 1)
    sets = {"toy": ClassifierSet("toy", {"cosine": LinearScorer("cosine", centres, scale=16.0),
                                         "biased": LinearScorer("linear", 3 * centres, bias=log_counts)})}
    md_path, _ = evaluate_run(None, sets, test, train_counts, dataset="toy", out_dir=tmp_path, many_threshold=100,
                              few_threshold=20, per_class_rows_max=per_class_rows_max)
    return md_path, json.loads((tmp_path / "report.json").read_text())


def test_report_at_2000_classes_is_binned_by_training_count(tmp_path):
    num_classes = 2000
    counts = [round(1000 * (2 / 1000) ** (c / (num_classes - 2))) for c in range(num_classes - 1)] + [0]
    # Some classes are untested, among them the last, the only one never trained on.
    test_counts = [0 if c % 97 == 0 or c == num_classes - 1 else 3 for c in range(num_classes)]
    md_path, report = _synthetic_run(tmp_path, counts, test_counts)

    md = md_path.read_text()
    assert len(md.splitlines()) < 200
    assert "| Class | Train count | Group |" not in md  # no per-class rows
    assert "| Train count | Classes | cosine | biased |" in md
    assert "`per_class_accuracy.json` and `per_class_accuracy.csv`" in md

    assert set(report) == {"dataset", "groups", "classifiers", "count_bins"}
    bins = report["count_bins"]
    assert [b["lo"] for b in bins] == sorted(b["lo"] for b in bins)
    assert all(b["lo"] <= b["hi"] < later["lo"] for b, later in itertools.pairwise(bins))  # ordered, disjoint
    n = np.array(counts)
    members = [np.flatnonzero((n >= b["lo"]) & (n <= b["hi"])) for b in bins]
    assert [len(m) for m in members] == [b["classes"] for b in bins] and all(b["classes"] > 0 for b in bins)
    assert sum(b["classes"] for b in bins) == num_classes  # with the ranges disjoint: each class once

    per_class = json.loads((tmp_path / "per_class_accuracy.json").read_text())["classifiers"]
    for name in ("cosine", "biased"):
        accuracy = np.array([np.nan if v is None else v for v in per_class[name]])
        for b, m in zip(bins, members):
            tested = accuracy[m][~np.isnan(accuracy[m])]
            if tested.size:
                assert b["mean"][name] == pytest.approx(tested.mean())
                assert b["std"][name] == pytest.approx(tested.std())
            else:
                assert b["mean"][name] is None and b["std"][name] is None
    last = bins[-1]
    assert (f"| {last['lo']}–{last['hi']} | {last['classes']} | {100 * last['mean']['cosine']:.1f} ± "
            f"{100 * last['std']['cosine']:.1f} |") in md
    assert bins[0] == {"lo": 0, "hi": 0, "classes": 1, "mean": {"cosine": None, "biased": None},
                       "std": {"cosine": None, "biased": None}}  # class 1999: n = 0 and untested

    with (tmp_path / "per_class_accuracy.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == num_classes
    assert list(rows[0]) == ["class", "train_count", "group", "cosine", "biased"]
    group_of = {c: g for g, ids in report["groups"].items() for c in ids}
    for c, row in enumerate(rows):
        assert (int(row["class"]), int(row["train_count"]), row["group"]) == (c, counts[c], group_of[c])
        for name in ("cosine", "biased"):
            assert (None if row[name] == "" else float(row[name])) == per_class[name][c]

    for png in ("per_class_accuracy", "group_accuracy", "accuracy_histogram"):
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}.png" in md


def test_report_at_10_classes_keeps_a_row_per_class(tmp_path):
    counts = [500, 300, 150, 101, 100, 60, 20, 19, 5, 0]
    md_path, report = _synthetic_run(tmp_path, counts, [20] * 10)
    md = md_path.read_text()
    assert "| Class | Train count | Group | cosine | biased |" in md
    assert "| 9 | 0 | few |" in md and "by training count" not in md
    assert set(report) == {"dataset", "groups", "classifiers"}
    assert not (tmp_path / "plots" / "accuracy_histogram.png").exists()
    with (tmp_path / "per_class_accuracy.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 10  # the CSV is written at any C


def test_stage_takes_the_row_limit_from_the_config(tmp_path):
    run_dir = make_run_dir(tmp_path)  # 6 classes
    ctx = stage_context(run_dir, "stages=[kt,evaluate]", "evaluate.per_class_rows_max=5")
    kt_stage.run(ctx)
    evaluate_stage.run(ctx)
    assert "## Per-class top-1 (%) by training count" in (run_dir / "report.md").read_text()
    assert "count_bins" in json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "plots" / "accuracy_histogram.png").is_file()


def test_stage_scores_every_classifier_on_val_as_well(tmp_path):
    run_dir = make_run_dir(tmp_path)
    ctx = stage_context(run_dir, "stages=[kt,evaluate]")
    kt_stage.run(ctx)
    evaluate_stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    val = torch.load(run_dir / "features" / "val.pt", weights_only=True)
    assert report["val"]["samples"] == val["labels"].numel() == 24
    assert set(report["val"]["classifiers"]) == set(report["classifiers"])
    kt = load_kt_classifiers(run_dir)
    groups = {g: list(ids) for g, ids in report["groups"].items()}
    expected = group_accuracy(predict_all(kt, {}, val["features"])["prototypes"], val["labels"], groups, 6)
    assert report["val"]["classifiers"]["prototypes"] == pytest.approx(expected)
    assert report["val"]["classifiers"] != report["classifiers"]  # another split, not a copy of test's rows
    (run_dir / "features" / "val.pt").unlink()  # a run without val: the report has test rows only
    evaluate_stage.run(ctx)
    assert "val" not in json.loads((run_dir / "report.json").read_text())


def _report_run(root, seed, rows):
    """A run dir with report.json rows name → (many, few) and a config.yaml."""
    run_dir = root / f"seed{seed}"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"experiment: toy\nmodel:\n  classifier: linear\ntrainer:\n  seed: {seed}\n")
    classifiers = {n: {"many": m, "medium": 0.5, "few": f, "all": (m + f) / 2} for n, (m, f) in rows.items()}
    (run_dir / "report.json").write_text(json.dumps({"dataset": "toy", "groups": {"many": [0], "medium": [1],
                                                                                  "few": [2]},
                                                     "classifiers": classifiers}))
