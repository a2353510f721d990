"""The README's result blocks are what ``ltdist compare`` computes from the kept run reports.

Each ``tests/results/<setting>/`` holds ``runs/`` (every run's report.json and config.yaml, as
``ltdist compare --keep-reports`` writes them) and ``claims.txt`` (one ``STAGE1=ROW > STAGE1=ROW`` per line).
The README quotes each setting between ``<!-- ltdist compare tests/results/<setting>/runs -->`` and
``<!-- end of ltdist compare -->``; that text must equal :func:`ltdist.evaluate.compare.summary_markdown`
of those runs, so no matrix cell, "best" or verdict in it is typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ltdist.evaluate.compare import compare_runs, conclusions, find_runs, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = sorted(p.parent for p in (ROOT / "tests" / "results").glob("*/runs"))
END = "<!-- end of ltdist compare -->"


def readme_block(setting: Path) -> str:
    readme = (ROOT / "README.md").read_text()
    begin = f"<!-- ltdist compare {setting.relative_to(ROOT).as_posix()}/runs -->"
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(END), readme, flags=re.S)
    assert match, f"README.md has no block {begin} … {END}"
    return match.group(1).strip()


@pytest.mark.parametrize("setting", SETTINGS, ids=[p.name for p in SETTINGS])
def test_readme_block_is_the_comparison_of_the_kept_reports(setting):
    runs = find_runs([setting / "runs"])
    rows = compare_runs(runs)
    claims = [line.strip() for line in (setting / "claims.txt").read_text().splitlines() if line.strip()]
    assert readme_block(setting) == summary_markdown(rows, conclusions(runs, rows, claims)).strip()


def test_there_are_kept_results_for_the_readme():
    assert SETTINGS, "tests/results/<setting>/runs is missing: the README's result blocks have nothing to check"
