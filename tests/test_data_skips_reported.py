"""Data skips below ``data.max_skip_fraction`` are reported: in the epoch log line, metrics.jsonl and the report."""

import json
import os
import re
import subprocess
import sys

from test_data_faults import damaged_split

from ltdist.stages.evaluate import training_notes


def test_training_skips_reach_the_log_metrics_and_the_report_note(tmp_path):
    index, _, expected = damaged_split(tmp_path / "shards")
    args = ["stages=[train]", f"data.shards={index.parent}", f"output.root={tmp_path / 'runs'}", "experiment=skips",
            "output.run_id=r", "model.arch=resnet8", "data.image_size=8", "data.channels=1", "trainer.batch_size=8",
            "trainer.epochs=1", "trainer.checkpoint_every=1000", "data.num_workers=0",
            "data.max_skip_fraction=0.5", "data.shuffle_buffer=16", "evaluate.many_threshold=21",
            "evaluate.few_threshold=20", "trainer.device=cpu"]
    result = subprocess.run([sys.executable, "-m", "ltdist.launch", "--cluster", "local", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "skips" / "r"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if r.get("event") == "data_skips"]
    assert skips and skips[-1]["data_skips"] > 0  # counted per read: a shard read twice counts twice
    assert set(skips[-1]["by_reason"]) <= set(expected)
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*") if p.is_file() and p.suffix in (".out", ".err"))
    logged = [int(n) for n in re.findall(r"data skips (\d+)", logs)]
    assert logged and logged[-1] == skips[-1]["data_skips"], logs[-2000:]
    note = training_notes(run_dir)
    assert note and f"training skipped {skips[-1]['data_skips']} samples" in note[0]
