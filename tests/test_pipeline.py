"""The demo's path end to end: launcher → train → extract → kt → evaluate, on real Fashion-MNIST-LT shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from data_fixtures import FMNIST_LT_IF1000_TRAIN, fmnist_lt  # noqa: F401  (fixture)


def test_default_stages_run_end_to_end_on_two_ranks(fmnist_lt, tmp_path):  # noqa: F811
    root = tmp_path / "runs"
    args = ["--cluster", "local", f"data.shards={fmnist_lt.parent}", f"output.root={root}", "output.run_id=e2e",
            "model.arch=resnet8", "trainer.max_steps=6", "trainer.batch_size=64", "launch.tasks_per_node=2",
            "data.num_workers=0", "trainer.progress=false"]
    result = subprocess.run([sys.executable, "-m", "ltdist.launch", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run_dir = root / "default" / "e2e"
    assert f"report: {run_dir / 'report.md'}" in result.stdout  # the table and report path reach the user
    report = json.loads((run_dir / "report.json").read_text())
    counts = FMNIST_LT_IF1000_TRAIN
    assert report["groups"] == {"many": [c for c, n in enumerate(counts) if n > 100],
                                "medium": [c for c, n in enumerate(counts) if 20 <= n <= 100],
                                "few": [c for c, n in enumerate(counts) if n < 20]}
    for name in ("cosine", "prototypes", "w_h(0)", "w_h(20)", "w_h(100)", "ensemble"):
        scores = report["classifiers"][name]
        assert set(scores) == {"many", "medium", "few", "all"}
        assert all(0.0 <= v <= 100.0 for v in scores.values()), (name, scores)
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"per_class_accuracy.png", "group_accuracy.png"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics if m.get("stage") == "train") == 6
