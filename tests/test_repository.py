"""The repository stands alone: no file points readers at documents that do not ship with it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Design notes kept beside the repository during development (a sibling folder and its design document) never
# ship; a Markdown link that climbs out of the repository root would break in every clone. The names are
# assembled so that this file does not itself name them.
_SIBLING = "shared"
_DESIGN_DOC = "DESIGN" + r"\.md"
OUTSIDE = re.compile(rf"\.\./{_SIBLING}|{_DESIGN_DOC}|\]\(\.\./")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if (ROOT / n).is_file() and not n.endswith((".png", ".tar", ".so"))]


def test_no_file_links_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    offenders = []
    for path in _tracked_text_files():
        if path.resolve() == me:
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                      for m in OUTSIDE.finditer(text)]
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_readme_cites_both_papers() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "arXiv:2112.06741" in readme
    assert "Meta-Prototype Decoupled Training for Long-tailed Learning" in readme
    assert "## How it works" in readme
