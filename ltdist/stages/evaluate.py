"""The ``evaluate`` stage: every KT-derived classifier on the test features, by class group.

Rank 0 scores ``features/test.pt`` with the learned classifier (cosine, or the dot-product baseline),
prototypes, prototypes + classifier, w_h(k) for each k, their ensemble (eq. 8) and the continual
classifiers w_hc(k) with their ensemble (paper 1 Table 2: prototypes and w_hc(k) for every k but the
smallest). It writes ``report.json``, ``per_class_accuracy.json``, ``report.md`` and ``plots/*.png``
(:mod:`ltdist.evaluate`) and prints the tables and the report path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ltdist.distributed import barrier
from ltdist.evaluate import (
    TableSection,
    class_groups,
    format_table,
    group_accuracy,
    per_class_accuracy,
    plot_group_bars,
    plot_per_class_accuracy,
    write_report,
)
from ltdist.methods.kt import KTClassifiers, cosine_probabilities
from ltdist.stages import StageContext
from ltdist.stages.extract import load_features
from ltdist.stages.kt import load_kt_classifiers

CHUNK = 4096  # test samples scored at once: bounds memory to CHUNK × C probabilities per classifier


def classifier_names(kt: KTClassifiers) -> tuple[list[str], list[str]]:
    """(Table 1 rows, Table 2 rows): names of the classifiers :func:`predict` scores.

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


def _scores(kt: KTClassifiers, features: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, [B, C] scores) of every classifier, in the order of :func:`classifier_names`."""
    base = classifier_names(kt)[0][0]
    if kt.classifier_type == "cosine":
        yield base, cosine_probabilities(features, kt.weights, kt.scale)
    else:
        yield base, features @ kt.weights.T + kt.bias
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


def predict(kt: KTClassifiers, features: torch.Tensor,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Top-1 class ids [N] (CPU) of every classifier on ``features`` [N, F], scored in chunks on ``device``."""
    kt = KTClassifiers(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kt.state_dict().items()})
    predictions: dict[str, list[torch.Tensor]] = {}
    for start in range(0, features.shape[0], CHUNK):
        for name, scores in _scores(kt, features[start:start + CHUNK].to(device)):
            predictions.setdefault(name, []).append(scores.argmax(dim=1).cpu())
    return {name: torch.cat(parts) for name, parts in predictions.items()}


def evaluate_kt(kt: KTClassifiers, test: dict, *, dataset: str, out_dir: Path, many_threshold: int,
                few_threshold: int, device: torch.device | str = "cpu") -> tuple[Path, str]:
    """Score, write the report files and plots into ``out_dir``; return (report.md path, printed tables)."""
    num_classes = kt.weights.shape[0]
    counts = kt.train_counts.tolist()
    groups = class_groups(counts, many_threshold, few_threshold)
    predictions = predict(kt, test["features"], device)
    labels = test["labels"]
    results = {n: group_accuracy(p, labels, groups, num_classes) for n, p in predictions.items()}
    per_class = {n: per_class_accuracy(p, labels, num_classes).tolist() for n, p in predictions.items()}

    main, continual = classifier_names(kt)
    row_labels = table_labels(kt)
    untrained = (kt.backbone_counts == 0).nonzero().flatten().tolist()
    setting = f"Classes {untrained} excluded" if untrained else "Full training"
    tables = {"KT classifiers (paper 1 Table 1 layout)": [TableSection(setting, main)],
              "Continual classifiers w_hc (paper 1 Table 2 layout)": [TableSection(setting, continual)]}
    notes = [f"top-1 (%) on the test split ({labels.numel()} samples); many-shot n > {many_threshold}, "
             f"few-shot n < {few_threshold} training samples, medium otherwise; group = mean per-class "
             f"accuracy, Total = all test samples",
             f"KT: τ = {kt.tau:g}, k ∈ {kt.ks}, softmax scale s = {kt.scale:.3g} ({kt.classifier_type} head)"]
    if untrained:
        notes.append(f"classes {untrained} were withheld from backbone training: the learned classifier's rows "
                     f"for them are untrained, every other classifier uses their prototypes only")
        notes.append("in the Table 1 layout those classes get w_hc(k) (2 unit terms) while the others get w_h(k) "
                     "(3 terms, including ŵ, which lies farther from the features than p̂): the mix favours the "
                     "withheld classes; the Table 2 layout (w_hc for every class, paper 1 §4.3) is the comparable one")
    plot_dir = out_dir / "plots"
    shown = [main[0], "prototypes", "prototypes + classifier", "ensemble", "continual ensemble"]
    plots = [plot_per_class_accuracy(plot_dir / "per_class_accuracy.png", counts,
                                     {n: per_class[n] for n in shown}, many_threshold, few_threshold),
             plot_group_bars(plot_dir / "group_accuracy.png", results)]
    path = write_report(out_dir, dataset=dataset, groups=groups, results=results, per_class=per_class,
                        train_counts=counts, tables=tables, notes=notes, plots=plots, labels=row_labels)
    printed = "\n\n".join(f"{title}\n{format_table(results, sections, row_labels)}"
                          for title, sections in tables.items())
    return path, printed


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.dist.is_main:
        kt = load_kt_classifiers(ctx.run_dir)
        path, printed = evaluate_kt(kt, load_features(ctx.run_dir, "test"), dataset=cfg.data.name,
                                    out_dir=ctx.run_dir, many_threshold=cfg.evaluate.many_threshold,
                                    few_threshold=cfg.evaluate.few_threshold, device=ctx.dist.device)
        print(f"{printed}\n\nreport: {path}", flush=True)
    barrier()
