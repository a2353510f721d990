"""Long-tail evaluation: class groups by training count, top-1 per group / class, report files, plots."""

from ltdist.evaluate.bins import CountBin, binned_accuracy, count_bins
from ltdist.evaluate.groups import GROUPS, class_groups, group_accuracy, per_class_accuracy
from ltdist.evaluate.plots import (
    plot_accuracy_histogram,
    plot_binned_accuracy,
    plot_group_bars,
    plot_per_class_accuracy,
)
from ltdist.evaluate.report import TableSection, format_table, write_report

__all__ = ["GROUPS", "CountBin", "TableSection", "binned_accuracy", "class_groups", "count_bins", "format_table",
           "group_accuracy", "per_class_accuracy", "plot_accuracy_histogram", "plot_binned_accuracy",
           "plot_group_bars", "plot_per_class_accuracy", "write_report"]
