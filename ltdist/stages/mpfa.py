"""The ``mpfa`` stage: meta-prototype feature augmentation and the balanced classifier retrain.

After ``extract`` (any backbone). Every rank reads the frozen inputs
(:func:`ltdist.methods.classifier_set.load_frozen_inputs`) and, when an MPCL run wrote it,
``weights/prototypes.pt`` (``meta_prototypes`` [C, F] unit rows or None). The class centres are
chosen by ``method.mpfa.centres``: ``meta`` (the meta-prototypes; an error without them),
``empirical`` (normalised class means) or ``auto`` (meta when present, else empirical). Each centre
source is one retrain (:mod:`ltdist.methods.mpfa`, :mod:`ltdist.methods.mpfa_retrain`) and one row of
``classifiers/mpfa.pt``:

- "MPFA (meta-prototypes)": the paper's MPFA, centres = meta-prototypes;
- "TailCalibX-style (empirical centres)": the distribution-calibration family with the same α, M,
  β; with meta centres it is retrained too unless ``method.mpfa.baseline_row=false``;
- "MPFA + KT ensemble": mean softmax of the first row and the KT ensemble, when ``classifiers/kt.pt``
  exists (``stages=[train, extract, kt, mpfa, evaluate]``).

α (``method.mpfa.alpha``) is one number, default 0.2 (paper 2's initial value), or ``auto``: each
centre source is retrained once per α in :data:`ALPHA_GRID` and the row keeps the α with the best mean
per-class top-1 on val (:func:`ltdist.methods.classifier_set.select_on_val`; without a val split the
default 0.2). The test split is never read here.

A class with no training feature keeps no retrained row: its row is its meta-prototype (meta
centres) or zero (a zero cosine score; for a linear classifier also the smallest trained bias).
Retrain checkpoints live in ``mpfa/retrain-<centres>.pt`` (``retrain-<centres>-alpha<α>.pt`` under
``alpha=auto``): a re-run resumes (or, when complete,
returns at once) as long as settings and inputs are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ltdist.class_groups import GROUPS, class_groups
from ltdist.methods.classifier_set import ClassifierSet, FrozenInputs, LinearScorer, run_on_all_ranks, select_on_val
from ltdist.methods.mpfa import build_bank, empirical_centres, meta_centres, plan_augmentation
from ltdist.methods.mpfa_retrain import RetrainSettings, retrain
from ltdist.methods.objectives.mpcl import load_prototypes
from ltdist.stages import StageContext
from ltdist.stages.kt import classifiers_path as kt_path

log = logging.getLogger(__name__)

ROWS = {"meta": "MPFA (meta-prototypes)", "empirical": "TailCalibX-style (empirical centres)"}
ENSEMBLE = "MPFA + KT ensemble"
ALPHA_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)  # method.mpfa.alpha=auto (paper 2, Fig. 4b)
ALPHA_DEFAULT = 0.2  # paper 2's initial α; alpha=auto falls back to it without a val split


def retrain_checkpoint(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "mpfa" / f"retrain-{name}.pt"


def alpha_candidates(alpha) -> list[float]:
    """The α values to retrain with: ``ALPHA_GRID`` for ``auto``, else the one number."""
    return list(ALPHA_GRID) if alpha == "auto" else [float(alpha)]


def load_meta_prototypes(run_dir: Path) -> torch.Tensor | None:
    """``meta_prototypes`` [C, F] float32 of ``weights/prototypes.pt``, or None when absent."""
    meta = (load_prototypes(run_dir) or {}).get("meta_prototypes")
    return None if meta is None else meta.float()


def centre_sources(choice: str, has_meta: bool, baseline_row: bool) -> tuple[list[str], str]:
    """The centre sources to retrain with, the first one the main row, and a note for the report."""
    if choice == "empirical" or (choice == "auto" and not has_meta):
        reason = "method.mpfa.centres=empirical" if choice == "empirical" else "the run has no meta-prototypes"
        return ["empirical"], f"centres: empirical normalised class means ({reason})"
    if choice not in ("meta", "auto"):
        raise ValueError(f"mpfa: method.mpfa.centres must be meta, empirical or auto, got {choice!r}")
    if not has_meta:
        raise FileNotFoundError("mpfa: method.mpfa.centres=meta needs meta_prototypes in weights/prototypes.pt "
                                "(written by an MPCL train stage); use centres=empirical or auto")
    sources = ["meta", "empirical"] if baseline_row else ["meta"]
    note = "centres: meta-prototypes of the MPCL run" + (
        "; the TailCalibX-style row is a second retrain on empirical centres" if baseline_row else "")
    return sources, note


def settings_from(cfg) -> RetrainSettings:
    m = cfg.method.mpfa
    return RetrainSettings(classifier=m.classifier, scale=float(m.scale), epochs=int(m.epochs),
                           batch_size=int(m.batch_size), lr=float(m.lr), momentum=float(m.momentum),
                           weight_decay=float(m.weight_decay), alpha=alpha_candidates(m.alpha)[0],
                           beta=float(m.beta),
                           beta_form=m.beta_form, tukey=float(m.tukey), seed=int(cfg.trainer.seed),
                           draw_window=int(m.draw_window), precision=m.precision)


def apply_empty_class_fallback(scorer: LinearScorer, empty: torch.Tensor, centres: torch.Tensor | None) -> None:
    """Rows of classes without training features [C] bool: the centre when given, else zero."""
    if not bool(empty.any()):
        return
    scorer.weight[empty] = 0.0 if centres is None else centres.cpu()[empty]
    if scorer.bias is not None:
        scorer.bias[empty] = scorer.bias[~empty].min()


def input_notes(counts: torch.Tensor, negative: bool, settings: RetrainSettings, dim: int) -> list[str]:
    """Report lines about the inputs: tiny and empty classes, negative features under a Tukey power,
    an isotropic β larger than the unit-norm features."""
    notes = []
    for n, what in ((1, "no own scatter (spread from the neighbours and β only)"), (2, "a rank-1 own scatter")):
        classes = (counts == n).nonzero().flatten().tolist()
        if classes:
            notes.append(f"{len(classes)} classes with {n} training feature(s) {classes[:10]}: {what}")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        notes.append(f"classes {empty[:10]} have no training feature: nothing generated, fallback classifier row")
    if negative and settings.tukey != 1.0:
        notes.append(f"features have negative entries: Tukey power applied as sign(f)·|f|^{settings.tukey:g}")
    spread = (settings.beta * dim) ** 0.5  # expected norm of the β·I term, against unit-norm features
    if settings.beta_form == "identity" and spread > 1.0:
        notes.append(f"β·I adds noise of norm ≈ √(βd) = {spread:.1f} to unit-norm features (d = {dim}): "
                     f"the generated features are dominated by it; consider a smaller method.mpfa.beta")
    return notes


def centre_distance_note(centres: torch.Tensor, means: torch.Tensor, counts: torch.Tensor,
                         groups: dict[str, list[int]]) -> str:
    """How far the meta-prototype centres [C, d] lie from the class means [C, d] (MPFA space), per group."""
    cos = (centres * means).sum(1).cpu()
    parts = []
    for group in GROUPS:
        ids = [k for k in groups[group] if counts[k] > 0]
        if ids:
            parts.append(f"{group} {float(cos[ids].mean()):.3f} (min {float(cos[ids].min()):.3f})")
    return "meta-prototype centres vs the class means (MPFA space), mean cosine: " + ", ".join(parts)


def build(ctx: StageContext, inputs: FrozenInputs) -> ClassifierSet:
    cfg = ctx.cfg.method.mpfa
    settings = settings_from(ctx.cfg)
    meta = load_meta_prototypes(ctx.run_dir)
    sources, centre_note = centre_sources(cfg.centres, meta is not None, cfg.baseline_row)
    counts = inputs.train_counts
    raw = inputs.train.pop("features")  # released after the bank is built: one bank in memory, not two
    negative = raw.numel() > 0 and float(raw.min()) < 0
    notes = [centre_note, *input_notes(counts, negative, settings, raw.shape[1])]
    bank, offsets = build_bank(raw.to(ctx.dist.device), inputs.train["labels"], inputs.num_classes, settings.tukey,
                               in_place=True)
    del raw
    rows: dict[str, LinearScorer] = {}
    chosen: dict = {"centres": sources[0], "rows": {}}
    means = empirical_centres(bank, offsets)
    groups = class_groups(counts.tolist(), ctx.cfg.evaluate.many_threshold, ctx.cfg.evaluate.few_threshold)
    for source in sources:
        if source == "meta":
            centres = meta_centres(meta.to(bank.device), inputs.num_classes, bank.shape[1], settings.tukey)
            notes.append(centre_distance_note(centres, means, counts, groups))
        else:
            centres = means
        plan = plan_augmentation(bank, offsets, centres, num_neighbours=int(cfg.neighbours),
                                 literal_inv_m=bool(cfg.literal_inv_m), count=cfg.count)
        log.info("mpfa %s: %d real + %d generated features, %d steps per epoch", source, plan.num_real,
                 plan.generated, -(-plan.size // settings.batch_size))
        alphas = alpha_candidates(cfg.alpha)
        scorers: dict[float, LinearScorer] = {}
        for alpha in alphas:
            name = source if len(alphas) == 1 else f"{source}-alpha{alpha:g}"
            scorer = retrain(plan, replace(settings, alpha=alpha), rank=ctx.dist.rank,
                             world_size=ctx.dist.world_size, val=inputs.val,
                             checkpoint=retrain_checkpoint(ctx.run_dir, name), name=name)
            apply_empty_class_fallback(scorer, counts == 0, centres if source == "meta" else None)
            scorers[alpha] = scorer
        if len(alphas) > 1:
            alpha, on_val, note = select_on_val(scorers, inputs.val, ALPHA_DEFAULT, f"α ({source} centres)")
            notes.append(note)
        else:
            alpha, on_val = alphas[0], {}
        rows[ROWS[source]] = scorers[alpha]
        chosen["rows"][ROWS[source]] = {"centres": source, "generated": plan.generated, "alpha": alpha,
                                        "alpha_val_accuracy": on_val}
    ensembles = {}
    if kt_path(ctx.run_dir).is_file():
        ensembles[ENSEMBLE] = [ROWS[sources[0]], "kt/ensemble"]
    alpha_text = (f"α chosen on val from {list(ALPHA_GRID)}" if cfg.alpha == "auto"
                  else f"α = {settings.alpha:g} (fixed)")
    notes.append(f"{alpha_text}, β = {settings.beta:g} ({settings.beta_form}), "
                 f"M = {cfg.neighbours}, Tukey λ = {settings.tukey:g}, count = {cfg.count}, "
                 f"{settings.classifier} classifier retrained {settings.epochs} epochs")
    chosen.update(alpha=cfg.alpha if cfg.alpha == "auto" else settings.alpha, beta=settings.beta,
                  beta_form=settings.beta_form, neighbours=int(cfg.neighbours),
                  literal_inv_m=bool(cfg.literal_inv_m), count=cfg.count)
    return ClassifierSet("mpfa", rows, ensembles=ensembles, chosen=chosen, notes=notes)


def run(ctx: StageContext) -> None:
    run_on_all_ranks(ctx, "mpfa", lambda inputs: build(ctx, inputs))
