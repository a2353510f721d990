"""The ``evaluate`` stage: every classifier in ``classifiers/`` on the test features, by class group.

Rank 0 scores ``features/test.pt`` with the KT file's classifiers when ``classifiers/kt.pt`` exists —
the learned classifier (cosine, or the dot-product baseline), prototypes, prototypes + classifier,
w_h(k) for each k, their ensemble (eq. 8) and the continual classifiers w_hc(k) with their ensemble
(paper 1 Table 2: prototypes and w_hc(k) for every k but the smallest) — and every row of every other
stage-2 file (:class:`ltdist.methods.classifier_set.ClassifierSet`: crt, tau_norm, mpfa, ...). It
writes ``report.json``, ``per_class_accuracy.json`` / ``.csv``, ``report.md`` and ``plots/*.png``
(:mod:`ltdist.evaluate`) and prints the tables and the report path. After an MPCL train stage
(``weights/prototypes.pt``) it also reports the prototype health
(:mod:`ltdist.evaluate.prototype_health`) in report.json / report.md and as a metrics.jsonl record
``{"stage": "evaluate", "event": "prototype_health", ...}``. With more than
``evaluate.per_class_rows_max`` classes, report.md and the per-class plot bin the classes by training
count, and ``plots/accuracy_histogram.png`` shows the spread of per-class top-1 within each group.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ltdist.class_groups import class_groups, group_accuracy, per_class_accuracy
from ltdist.distributed import barrier
from ltdist.evaluate import (
    TableSection,
    format_table,
    plot_accuracy_histogram,
    plot_binned_accuracy,
    plot_group_bars,
    plot_per_class_accuracy,
    write_report,
)
from ltdist.evaluate.prototype_health import prototype_health
from ltdist.methods.classifier_set import KT_FILE, ClassifierSet, head_scorer, load_classifier_sets
from ltdist.methods.kt import KTClassifiers, cosine_probabilities
from ltdist.methods.objectives.mpcl import load_prototypes
from ltdist.models.weights import read_weights_record
from ltdist.rundir import features_path, load_features
from ltdist.stages import StageContext
from ltdist.stages.kt import classifiers_path, load_kt_classifiers

# Probabilities held per classifier and chunk (elements, 32 MiB in float32): a chunk has 2^23 / C test samples, so
# the memory of scoring stays the same at 10 or 8142 classes (every classifier's chunk is alive at once).
CHUNK_ELEMENTS = 2**23


def classifier_names(kt: KTClassifiers) -> tuple[list[str], list[str]]:
    """(Table 1 rows, Table 2 rows): names of the KT-file classifiers :func:`predict_all` scores.

    "cosine" (or "dot product" for a linear head), "prototypes", "prototypes + classifier", "w_h(k)",
    "ensemble" (eq. 8 over every w_h(k)), "w_hc(k)" and "continual ensemble" (prototypes and w_hc(k)
    for every k but the smallest, as paper 1 Table 2).
    """
    base = "cosine" if kt.classifier_type == "cosine" else "dot product"
    main = [base, "prototypes", "prototypes + classifier", *(f"w_h({k})" for k in kt.ks), "ensemble"]
    continual = [base, "prototypes", *(f"w_hc({k})" for k in kt.ks), "continual ensemble"]
    return main, continual


def _ensemble_members(kt: KTClassifiers) -> dict[str, list[str]]:
    return {"ensemble": [f"w_h({k})" for k in kt.ks],
            "continual ensemble": ["prototypes", *(f"w_hc({k})" for k in (kt.ks[1:] or kt.ks))]}


def table_labels(kt: KTClassifiers) -> dict[str, str]:
    """Classifier name → the "Classifier type" cell of the Markdown tables (paper 1 wording)."""
    labels = {name: f"{name} ({', '.join(parts)})" for name, parts in _ensemble_members(kt).items()}
    labels["cosine"] = "cosine classifier"
    return labels


def _kt_probabilities(kt: KTClassifiers, features: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, [B, C] probabilities) of every KT-file classifier, in the order of :func:`classifier_names`."""
    base = classifier_names(kt)[0][0]
    if kt.classifier_type == "cosine":
        yield base, cosine_probabilities(features, kt.weights, kt.scale)
    else:
        yield base, torch.softmax(features @ kt.weights.T + kt.bias, dim=1)
    trained = (kt.backbone_counts > 0).float()[:, None]
    # An untrained class has no learned weight: its "prototypes + classifier" row is its prototype.
    vectors = {"prototypes": kt.prototypes,
               "prototypes + classifier": kt.prototypes + trained * F.normalize(kt.weights, dim=1)}
    vectors.update({f"w_h({k})": kt.w_h[i] for i, k in enumerate(kt.ks)})
    vectors.update({f"w_hc({k})": kt.w_hc[i] for i, k in enumerate(kt.ks)})
    probs = {name: cosine_probabilities(features, v, kt.scale) for name, v in vectors.items()}
    for name, parts in _ensemble_members(kt).items():  # eq. 8 from the members' probabilities already computed
        probs[name] = torch.stack([probs[p] for p in parts]).mean(dim=0)
    yield from probs.items()


def _set_probabilities(sets: dict[str, ClassifierSet], known: dict[str, torch.Tensor],
                       features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Probabilities of every row of every set; ensemble members "<file>/<row>" are looked up in ``known``
    (keys "<file>/<row>", e.g. "kt/ensemble") and in the sets' own rows."""
    probs: dict[str, torch.Tensor] = {}
    for method, result in sets.items():
        for name, scorer in result.rows.items():
            probs[f"{method}/{name}"] = torch.softmax(scorer.scores(features), dim=1)
    for method, result in sets.items():
        for name, members in result.ensembles.items():
            refs = [m if "/" in m else f"{method}/{m}" for m in members]
            missing = [r for r in refs if r not in probs and r not in known]
            if missing:
                raise FileNotFoundError(f"evaluate: ensemble {name!r} of {method} needs {missing}: run the stage "
                                        f"that writes classifiers/{missing[0].split('/')[0]}.pt first")
            probs[f"{method}/{name}"] = torch.stack([probs.get(r, known.get(r)) for r in refs]).mean(dim=0)
    return probs


def _chunk_top1(kt: KTClassifiers | None, sets: dict[str, ClassifierSet], chunk: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """"<file>/<row>" → top-1 class ids [B] (CPU) of one chunk; its probabilities are freed on return, before
    the next chunk's are made."""
    known = {f"{KT_FILE}/{name}": p for name, p in _kt_probabilities(kt, chunk)} if kt is not None else {}
    probs = {**known, **_set_probabilities(sets, known, chunk)}
    return {ref: p.argmax(dim=1).cpu() for ref, p in probs.items()}


def predict_all(kt: KTClassifiers | None, sets: dict[str, ClassifierSet], features: torch.Tensor,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Top-1 class ids [N] (CPU) of every classifier, scored in chunks on ``device``.

    Keys: the KT file's classifier names as they are ("cosine", "ensemble", ...), then every row of the
    other classifier files by its own row name. Two files may not use the same row name.
    """
    if kt is not None:
        kt = KTClassifiers(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                              for k, v in kt.state_dict().items()})
    num_classes = kt.weights.shape[0] if kt is not None else next(iter(sets.values())).num_classes
    rows = max(1, CHUNK_ELEMENTS // num_classes)
    # One [N] result per classifier, allocated once: small per-chunk results kept between the chunks' large
    # probability matrices fragmented the heap (peak RSS grew with every chunk: 3.7 GiB at 8142 classes).
    predictions: dict[str, torch.Tensor] = {}
    for start in range(0, features.shape[0], rows):
        for ref, top1 in _chunk_top1(kt, sets, features[start:start + rows].to(device)).items():
            if ref not in predictions:
                predictions[ref] = torch.empty(features.shape[0], dtype=torch.long)
            predictions[ref][start:start + top1.numel()] = top1
    by_name: dict[str, torch.Tensor] = {}
    for ref, top1 in predictions.items():
        name = ref.split("/", 1)[1]
        if name in by_name:
            raise ValueError(f"evaluate: two classifier files report a row named {name!r}")
        by_name[name] = top1
    return by_name


def head_classifier_set(run_dir: Path) -> ClassifierSet:
    """The stage-1 head alone, for runs without a KT file: one row "cosine" or "dot product"."""
    from ltdist.models import load_exported_model
    from ltdist.rundir import model_path

    scorer = head_scorer(load_exported_model(model_path(run_dir)).classifier)
    return ClassifierSet("head", {"cosine" if scorer.kind == "cosine" else "dot product": scorer})


def evaluate_run(kt: KTClassifiers | None, sets: dict[str, ClassifierSet], test: dict, train_counts: list[int], *,
                 dataset: str, out_dir: Path, many_threshold: int, few_threshold: int, per_class_rows_max: int,
                 device: torch.device | str = "cpu", health: dict | None = None,
                 run_notes: list[str] | None = None,
                 weights: dict | None = None, val: dict | None = None) -> tuple[Path, str]:
    """Score every classifier, write the report files and plots into ``out_dir``; return (report.md, tables).

    Past ``per_class_rows_max`` classes the per-class table and plot are binned by training count.
    ``run_notes``: lines about the run itself (e.g. :func:`training_notes`), listed with the report's notes.
    ``weights``: where the backbone's weights came from (``weights/source.json``), kept in report.json and
    named in report.md's notes. ``health``: the run's prototype health for the report, or None.
    ``val``: the val features ({"features", "labels"}) or None: every classifier is scored on them too, with
    the same groups, into report.json's ``"val"`` (what a choice of budget or method may read; test may not).
    """
    num_classes = len(train_counts)
    groups = class_groups(train_counts, many_threshold, few_threshold)
    predictions = predict_all(kt, sets, test["features"], device)
    labels = test["labels"]
    results = {n: group_accuracy(p, labels, groups, num_classes) for n, p in predictions.items()}
    per_class = {n: per_class_accuracy(p, labels, num_classes).tolist() for n, p in predictions.items()}

    tables: dict[str, list[TableSection]] = {}
    notes = [f"top-1 (%) on the test split ({labels.numel()} samples); many-shot n > {many_threshold}, "
             f"few-shot n < {few_threshold} training samples, medium otherwise; group = mean per-class "
             f"accuracy, Total = all test samples", *(run_notes or [])]
    if weights is not None:
        notes.append(f"backbone started from {weights['path'] or weights.get('pretrained')}"
                     + (f" (sha256 {weights['sha256']})" if weights.get("sha256") else " (the library's weights)"))
    row_labels: dict[str, str] = {}
    untrained: list[int] = []
    if kt is not None:
        main, continual = classifier_names(kt)
        row_labels = table_labels(kt)
        untrained = (kt.backbone_counts == 0).nonzero().flatten().tolist()
        setting = f"Classes {untrained} excluded" if untrained else "Full training"
        tables["KT classifiers (paper 1 Table 1 layout)"] = [TableSection(setting, main)]
        tables["Continual classifiers w_hc (paper 1 Table 2 layout)"] = [TableSection(setting, continual)]
        notes.append(f"KT: τ = {kt.tau:g}, k ∈ {kt.ks}, softmax scale s = {kt.scale:.3g} ({kt.classifier_type} head)")
        if untrained:
            notes.append(f"classes {untrained} were withheld from backbone training: the learned classifier's "
                         f"rows for them are untrained, every other classifier uses their prototypes only")
            notes.append("in the Table 1 layout those classes get w_hc(k) (2 unit terms) while the others get "
                         "w_h(k) (3 terms, including ŵ, which lies farther from the features than p̂): the mix "
                         "favours the withheld classes; the Table 2 layout (w_hc for every class, paper 1 §4.3) "
                         "is the comparable one")
    if sets:
        # The head and KT's fixed ensemble sit beside the stage-2 rows (kt_val's choice is read against the latter).
        base = [classifier_names(kt)[0][0], "ensemble"] if kt is not None else []
        rows = base + [name for result in sets.values() for name in (*result.rows, *result.ensembles)]
        tables["Classifiers on the frozen backbone"] = [TableSection("Stage 2", rows)]
        notes += [f"{result.method}: {note}" for result in sets.values() for note in result.notes]
    plot_dir = out_dir / "plots"
    shown = [n for n in (*(classifier_names(kt)[0][:3] if kt is not None else ()), "ensemble",
                         "continual ensemble", *(n for r in sets.values() for n in (*r.rows, *r.ensembles)))
             if n in per_class][:8]
    if num_classes > per_class_rows_max:
        main = {n: per_class[n] for n in shown[:4]}  # more overlaid spread bands or step lines blur into one
        plots = [plot_binned_accuracy(plot_dir / "per_class_accuracy.png", train_counts, main, many_threshold,
                                      few_threshold),
                 plot_group_bars(plot_dir / "group_accuracy.png", results),
                 plot_accuracy_histogram(plot_dir / "accuracy_histogram.png", groups, main)]
    else:
        plots = [plot_per_class_accuracy(plot_dir / "per_class_accuracy.png", train_counts,
                                         {n: per_class[n] for n in shown}, many_threshold, few_threshold),
                 plot_group_bars(plot_dir / "group_accuracy.png", results)]
    extra = {"weights": weights} if weights else {}
    chosen = {method: result.chosen for method, result in sets.items() if result.chosen}
    if chosen:  # what each stage-2 file chose on val (τ, k set, their val accuracies), for compare
        extra["chosen_on_val"] = chosen
    if val is not None:
        val_predictions = predict_all(kt, sets, val["features"], device)
        extra["val"] = {"samples": int(val["labels"].numel()),
                        "classifiers": {n: group_accuracy(p, val["labels"], groups, num_classes)
                                        for n, p in val_predictions.items()}}
        notes.append(f"report.json's \"val\" holds the same rows on the val split ({val['labels'].numel()} "
                     "samples), for choices that must not read test")
    path = write_report(out_dir, dataset=dataset, groups=groups, results=results, per_class=per_class,
                        train_counts=train_counts, tables=tables, notes=notes, plots=plots, labels=row_labels,
                        per_class_rows_max=per_class_rows_max, prototype_health=health, extra=extra or None)
    printed = "\n\n".join(f"{title}\n{format_table(results, sections, row_labels)}"
                           for title, sections in tables.items())
    return path, printed


def training_notes(run_dir: Path) -> list[str]:
    """The train stage's data skips (its last ``data_skips`` record in metrics.jsonl), as a report note."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    skips = [r for r in records if r.get("event") == "data_skips"]
    if not skips:
        return []
    last = skips[-1]
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(last["by_reason"].items()) if n)
    return [f"training skipped {last['data_skips']} samples of the train stream (corrupt or invalid; "
            f"data.max_skip_fraction bounds them){f' — {reasons}' if reasons else ''}"]


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.dist.is_main:
        kt = load_kt_classifiers(ctx.run_dir) if classifiers_path(ctx.run_dir).is_file() else None
        sets = load_classifier_sets(ctx.run_dir)
        if kt is None and not sets:
            raise FileNotFoundError(f"{ctx.run_dir / 'classifiers'} holds no classifier: run the kt stage first "
                                    f"(or another stage-2 stage: stages=[kt,evaluate])")
        if kt is None:
            sets = {"head": head_classifier_set(ctx.run_dir), **sets}
        test = load_features(ctx.run_dir, "test")
        val = load_features(ctx.run_dir, "val") if features_path(ctx.run_dir, "val").is_file() else None
        if kt is not None:
            counts = kt.train_counts.tolist()
        else:
            num_classes = next(iter(sets.values())).num_classes
            counts = torch.bincount(load_features(ctx.run_dir, "train")["labels"], minlength=num_classes).tolist()
        health = None
        protos = load_prototypes(ctx.run_dir)
        if protos is not None:
            train = load_features(ctx.run_dir, "train")
            groups = class_groups(counts, cfg.evaluate.many_threshold, cfg.evaluate.few_threshold)
            health = prototype_health(protos["prototypes"], protos.get("meta_prototypes"), protos.get("updates"),
                                      train["features"], train["labels"], test, groups,
                                      cfg.evaluate.per_class_rows_max)
            ctx.append_metrics({"stage": "evaluate", "event": "prototype_health", **health})
        path, printed = evaluate_run(kt, sets, test, counts, dataset=cfg.data.name, out_dir=ctx.run_dir,
                                     many_threshold=cfg.evaluate.many_threshold,
                                     few_threshold=cfg.evaluate.few_threshold,
                                     per_class_rows_max=cfg.evaluate.per_class_rows_max, device=ctx.dist.device,
                                     health=health, run_notes=training_notes(ctx.run_dir),
                                     weights=read_weights_record(ctx.run_dir / "weights"),
                                     val=val)
        print(f"{printed}\n\nreport: {path}", flush=True)
    barrier()
