"""The demo's path end to end: launcher → train → extract → kt → evaluate, on real Fashion-MNIST-LT shards."""

from __future__ import annotations

import importlib.util
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


def test_imagefolder_without_val_runs_the_demo_stages_on_two_ranks(tmp_path):
    """A user's ImageFolder tree with only train/ and test/: shards with a carved val split, then every stage
    of `make demo` through the local launcher; rank 0's log shows the per-epoch and per-step lines."""
    from data_fixtures import write_imagefolder

    src = write_imagefolder(tmp_path / "tree", {"train": [200, 60, 20, 8], "test": [6, 6, 6, 6]})
    root = tmp_path / "runs"
    args = ["--cluster", "local", "data.format=imagefolder", f"data.src={src}", f"data.shards={tmp_path / 'shards'}",
            "data.name=tiny", "data.image_size=8", "data.channels=1", "data.val_per_class=4", "data.num_workers=0",
            "data.shuffle_buffer=50", f"output.root={root}", "output.run_id=folder", "model.arch=resnet8",
            "trainer.epochs=2", "trainer.batch_size=16", "trainer.log_every=2", "trainer.progress=false",
            "launch.tasks_per_node=2", "evaluate.many_threshold=30", "evaluate.few_threshold=8",
            "method.kt.ks=[0,10]", "method.kt.prototypes_from=val"]
    result = subprocess.run([sys.executable, "-m", "ltdist.launch", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    # min(val_per_class, n // 2) per class moved from train to val
    assert index["splits"]["val"]["counts"] == [4, 4, 4, 4]
    assert index["splits"]["train"]["counts"] == [196, 56, 16, 4]
    assert len(index["splits"]["train"]["shards"]) >= 16  # small data, small shards: enough for ranks × workers
    assert index["build"]["val_carved_from_train"] is True
    run_dir = root / "default" / "folder"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["groups"] == {"many": [0, 1], "medium": [2], "few": [3]}
    rank0_log = next(p for p in (run_dir / "logs").glob("*_0_log.out"))
    text = rank0_log.read_text()
    for epoch in (1, 2):
        assert f"epoch {epoch}/2 done: step" in text, text[-3000:]
    assert "val many/medium/few/all" in text and "ETA" in text
    assert "step 2/" in text  # the short line every trainer.log_every steps
    assert "epoch 1/2 done" in result.stdout  # what --wait and the local launcher show
    assert (run_dir / "features" / "val.pt").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # the dev extra installs it
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
