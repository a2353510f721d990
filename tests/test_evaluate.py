"""Long-tail evaluation: group boundaries, accuracy per class / group, report files and plots."""

import json
import math
import statistics

import pytest
import torch

from ltdist.evaluate import (
    TableSection,
    binned_accuracy,
    class_groups,
    count_bins,
    group_accuracy,
    per_class_accuracy,
    plot_group_bars,
    plot_per_class_accuracy,
    write_report,
)
from ltdist.evaluate.aggregate import aggregate_reports, format_mean_std_table


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

