"""Long-tail evaluation: report files, plots, prototype health and comparisons across runs.

Class groups (many / medium / few) and top-1 per class / group are :mod:`ltdist.class_groups`, count bins
:mod:`ltdist.count_bins`: leaf modules, because data checks the groups and training validates by them.
"""

from ltdist.evaluate.plots import (
    plot_accuracy_histogram,
    plot_binned_accuracy,
    plot_group_bars,
    plot_per_class_accuracy,
)
from ltdist.evaluate.report import TableSection, format_table, write_report

__all__ = ["TableSection", "format_table", "plot_accuracy_histogram", "plot_binned_accuracy", "plot_group_bars",
           "plot_per_class_accuracy", "write_report"]
