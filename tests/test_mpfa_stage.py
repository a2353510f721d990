"""The mpfa stage on a synthetic run directory: rows and report, KT + MPFA, restart, two ranks, fallbacks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from stage_fixtures import FEATURE_DIM, make_run_dir, stage_context

from ltdist.config import ConfigError, load_config, validate_config
from ltdist.extension import extension_available
from ltdist.methods import mpfa_retrain
from ltdist.methods.classifier_set import LinearScorer, classifier_path, load_classifier_sets, power_normalise
from ltdist.methods.mpfa import build_bank, empirical_centres
from ltdist.methods.objectives.mpcl import prototypes_path
from ltdist.rundir import features_path
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage
from ltdist.stages import mpfa as mpfa_stage

pytestmark = pytest.mark.skipif(not extension_available(), reason="ltdist._C is not built")

FAST = ("method.mpfa.epochs=3", "method.mpfa.batch_size=256")
META, EMPIRICAL = mpfa_stage.ROWS["meta"], mpfa_stage.ROWS["empirical"]


def write_meta_prototypes(run_dir) -> torch.Tensor:
    """An MPCL-style prototypes file: unit rows in the normalised backbone feature space (val class means)."""
    val = torch.load(features_path(run_dir, "val"))
    means = torch.zeros(6, FEATURE_DIM).index_add_(0, val["labels"], F.normalize(val["features"], dim=1))
    meta = F.normalize(means, dim=1)
    torch.save({"prototypes": meta.clone(), "meta_prototypes": meta, "space": "l2-normalised backbone features"},
               prototypes_path(run_dir))
    return meta


def test_kt_and_mpfa_together_report_every_row(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path)
    meta = write_meta_prototypes(run_dir)
    ctx = stage_context(run_dir, "stages=[kt,mpfa,evaluate]", *FAST)
    kt_stage.run(ctx)
    mpfa_stage.run(ctx)
    result = load_classifier_sets(run_dir)["mpfa"]
    assert list(result.rows) == [META, EMPIRICAL]
    assert result.ensembles == {mpfa_stage.ENSEMBLE: [META, "kt/ensemble"]}
    assert result.chosen["centres"] == "meta" and result.chosen["rows"][META]["generated"] == 6 * 300 - 546
    assert result.notes[0].startswith("centres: meta-prototypes")
    assert any("negative entries" in n for n in result.notes)  # the fixture's Gaussian features
    assert any("β·I adds noise of norm ≈ √(βd) = 1.8" in n for n in result.notes)  # β = 0.05, d = 64
    assert all(s.feature_power == 0.5 for s in result.rows.values())
    evaluate_stage.run(ctx)
    report = json.loads((run_dir / "report.json").read_text())
    assert {"ensemble", META, EMPIRICAL, mpfa_stage.ENSEMBLE} <= set(report["classifiers"])
    # the reported number is the row scored directly (Tukey space included)
    test = torch.load(features_path(run_dir, "test"))
    row = result.rows[META]
    direct = row.scale * power_normalise(test["features"], 0.5) @ F.normalize(row.weight, dim=1).T
    accuracy = (direct.argmax(1) == test["labels"]).double().mean().item()
    assert report["classifiers"][META]["all"] == pytest.approx(accuracy)
    # well-separated clusters: the balanced retrain gets the few-shot classes right
    assert report["classifiers"][META]["few"] > 0.9 and report["classifiers"][EMPIRICAL]["few"] > 0.9
    md = (run_dir / "report.md").read_text()
    assert "mpfa: centres: meta-prototypes" in md and "α = 0.2 (fixed)" in md
    # which centres, how far from the class means; the prototype health of the (MPCL-style) prototypes file
    note = next(n for n in result.notes if n.startswith("meta-prototype centres vs the class means"))
    train = torch.load(features_path(run_dir, "train"))
    means = empirical_centres(*build_bank(train["features"], train["labels"], 6, 0.5))
    cos = (power_normalise(meta, 0.5) * means).sum(1)[4:]  # the few-shot classes 4 and 5, in the MPFA space
    assert f"few {float(cos.mean()):.3f} (min {float(cos.min()):.3f})" in note and note in md
    health = report["prototype_health"]
    class_mean = F.normalize(torch.zeros(6, FEATURE_DIM).index_add_(0, train["labels"],
                                                                    F.normalize(train["features"], dim=1)), dim=1)
    few = (meta * class_mean).sum(1)[4:].mean()
    assert health["groups"]["few"]["cos_meta_mean"] == pytest.approx(float(few), abs=1e-5)
    assert len(health["classes"]) == 6
    assert health["groups"]["all"]["updates"] is None  # a prototypes file without update counts
    assert "## Prototype health (MPCL)" in md
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups"]["few"] for r in records if r.get("event") == "prototype_health"] == [health["groups"]["few"]]
    assert "| Stage 2 |" in capsys.readouterr().out


def test_centres_choice_and_missing_meta_prototypes(tmp_path):
    run_dir = make_run_dir(tmp_path)
    mpfa_stage.run(stage_context(run_dir, "stages=[mpfa]", *FAST, "method.mpfa.classifier=linear"))
    result = load_classifier_sets(run_dir)["mpfa"]
    assert list(result.rows) == [EMPIRICAL] and result.ensembles == {}  # no kt file, no meta-prototypes
    assert "the run has no meta-prototypes" in result.notes[0] and result.rows[EMPIRICAL].bias is not None
    with pytest.raises(FileNotFoundError, match="centres=meta needs meta_prototypes"):
        mpfa_stage.run(stage_context(run_dir, "stages=[mpfa]", "method.mpfa.centres=meta"))
    write_meta_prototypes(run_dir)
    mpfa_stage.run(stage_context(run_dir, "stages=[mpfa]", *FAST, "method.mpfa.centres=meta",
                                 "method.mpfa.baseline_row=false"))
    assert list(load_classifier_sets(run_dir)["mpfa"].rows) == [META]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return {n: s.weight for n, s in load_classifier_sets(run_dir)["mpfa"].rows.items()}


def test_restart_mid_retrain_gives_the_same_classifier(tmp_path, monkeypatch):
    overrides = ("stages=[mpfa]", "method.mpfa.epochs=3", "method.mpfa.batch_size=128")
    reference = make_run_dir(tmp_path / "a")
    mpfa_stage.run(stage_context(reference, *overrides))

    interrupted = make_run_dir(tmp_path / "b")
    save = mpfa_retrain.torch_save_atomic

    def save_then_preempt(obj, path):
        save(obj, path)
        if obj["epoch"] == 2:
            raise KeyboardInterrupt("preempted after epoch 2")

    monkeypatch.setattr(mpfa_retrain, "torch_save_atomic", save_then_preempt)
    with pytest.raises(KeyboardInterrupt):
        mpfa_stage.run(stage_context(interrupted, *overrides))
    assert not classifier_path(interrupted, "mpfa").exists()
    monkeypatch.undo()
    mpfa_stage.run(stage_context(interrupted, *overrides))
    for name, weight in _weights(reference).items():
        assert torch.equal(weight, _weights(interrupted)[name])
    # other settings: the checkpoint is not resumed, the classifier changes
    mpfa_stage.run(stage_context(interrupted, *overrides, "method.mpfa.alpha=0.4"))
    assert not torch.equal(_weights(interrupted)[EMPIRICAL], _weights(reference)[EMPIRICAL])


def test_alpha_auto_is_chosen_on_val_and_never_reads_test(tmp_path):
    run_dir = make_run_dir(tmp_path)
    overrides = ("stages=[mpfa]", *FAST, "method.mpfa.alpha=auto")
    mpfa_stage.run(stage_context(run_dir, *overrides))
    first = load_classifier_sets(run_dir)["mpfa"]
    row = first.chosen["rows"][EMPIRICAL]
    on_val = row["alpha_val_accuracy"]
    assert list(on_val) == ["0.2", "0.4", "0.6", "0.8", "1.0"] and first.chosen["alpha"] == "auto"
    assert row["alpha"] == max(mpfa_stage.ALPHA_GRID, key=lambda a: on_val[str(a)])  # ties: the first
    assert any(n.startswith("α (empirical centres) = ") and "chosen on val" in n for n in first.notes)
    # poison the test split: noise features labelled by another α's classifier, which scores 100 % on them
    other = next(a for a in mpfa_stage.ALPHA_GRID if a != row["alpha"])
    state = torch.load(mpfa_stage.retrain_checkpoint(run_dir, f"empirical-alpha{other:g}"), weights_only=True)
    rival = LinearScorer("cosine", state["model"]["weight"], None, scale=16.0, feature_power=0.5)
    test = torch.load(features_path(run_dir, "test"))
    test["features"] = torch.randn(test["features"].shape, generator=torch.Generator().manual_seed(5))
    test["labels"] = rival.scores(test["features"]).argmax(1)
    torch.save(test, features_path(run_dir, "test"))
    chosen_on_test = (first.rows[EMPIRICAL].scores(test["features"]).argmax(1) == test["labels"]).double().mean()
    assert float(chosen_on_test) < 1.0  # a choice made on test would move to `other`
    mpfa_stage.run(stage_context(run_dir, *overrides))
    again = load_classifier_sets(run_dir)["mpfa"]
    assert again.chosen["rows"][EMPIRICAL]["alpha"] == row["alpha"]
    assert torch.equal(again.rows[EMPIRICAL].weight, first.rows[EMPIRICAL].weight)


def _rank(rank: int, world_size: int, init_file: str, run_dir: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from ltdist.distributed import DistEnv
    from ltdist.stages import StageContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    base = stage_context(Path(run_dir), "stages=[mpfa]", *FAST, "method.mpfa.draw_window=1024")
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, node_rank=0,
                  master_addr="127.0.0.1", master_port=0, backend="gloo", device=torch.device("cpu"),
                  hostname="localhost")
    mpfa_stage.run(StageContext(cfg=base.cfg, run_dir=Path(run_dir), dist=env))
    dist.destroy_process_group()


def test_two_ranks_train_the_same_classifier_as_one(tmp_path):
    one = make_run_dir(tmp_path / "one")
    mpfa_stage.run(stage_context(one, "stages=[mpfa]", *FAST, "method.mpfa.draw_window=1024"))
    two = make_run_dir(tmp_path / "two")
    torch.multiprocessing.spawn(_rank, args=(2, str(tmp_path / "pg"), str(two)), nprocs=2)
    # same features, same global batches; only the summation order of the gradients differs
    torch.testing.assert_close(_weights(two)[EMPIRICAL], _weights(one)[EMPIRICAL], atol=1e-4, rtol=1e-4)


def test_one_and_two_sample_classes_an_empty_class_and_a_nan_feature(tmp_path):
    splits = {"train": [200, 40, 2, 1, 0, 12], "val": [4] * 6, "test": [20] * 6}
    run_dir = make_run_dir(tmp_path, splits=splits)
    write_meta_prototypes(run_dir)
    mpfa_stage.run(stage_context(run_dir, "stages=[mpfa]", *FAST, "method.mpfa.count=paper"))
    result = load_classifier_sets(run_dir)["mpfa"]
    for scorer in result.rows.values():
        assert torch.isfinite(scorer.weight).all()
    # the empty class: its meta-prototype (in the MPFA space) on the meta row, zero on the empirical row
    assert result.rows[EMPIRICAL].weight[4].abs().max() == 0
    assert result.rows[META].weight[4].norm() == pytest.approx(1.0)
    notes = " ".join(result.notes)
    assert "with 1 training feature(s) [3]" in notes and "with 2 training feature(s) [2]" in notes
    assert "classes [4] have no training feature" in notes
    # paper count, max{⌈N_1/N_k − 1⌉, 1}: 200 → 200·1, 40 → 40·4, 2 → 2·99, 1 → 199, 12 → 12·16 generated
    assert result.chosen["rows"][META]["generated"] == 200 + 160 + 198 + 199 + 192

    train = torch.load(features_path(run_dir, "train"))
    train["features"][5, 1] = float("nan")
    torch.save(train, features_path(run_dir, "train"))
    with pytest.raises(ValueError, match=r"non-finite train features \(rows \[5\]"):
        mpfa_stage.run(stage_context(run_dir, "stages=[mpfa]", *FAST))


def test_config_rejects_bad_mpfa_values():
    bad = {"alpha": "often", "centres": "mean", "beta_form": "diagonal", "count": "more", "classifier": "mlp",
           "scale": "0", "batch_size": "0", "draw_window": "0", "precision": "fp16",
           "lr": "0", "momentum": "1.0", "weight_decay": "-1"}
    with pytest.raises(ConfigError) as info:
        validate_config(load_config(overrides=[f"method.mpfa.{k}={v}" for k, v in bad.items()]))
    for key in bad:
        assert f"method.mpfa.{key}:" in str(info.value)
    validate_config(load_config(overrides=["method.mpfa.centres=meta", "method.mpfa.count=paper"]))
    for alpha in ("auto", "0", "1", "0.6"):
        validate_config(load_config(overrides=[f"method.mpfa.alpha={alpha}"]))
    with pytest.raises(ConfigError, match=r"method\.mpfa\.alpha: must be a number in \[0, 1\] or 'auto'"):
        validate_config(load_config(overrides=["method.mpfa.alpha=1.5"]))
