"""Long-tail methods, at the two places they plug in.

- Stage 1, the training objective of the backbone (``method.loss``): :mod:`ltdist.methods.objectives`
  (cross-entropy, balanced softmax, logit-adjusted loss, MPCL).
- Stage 2, classifiers on the frozen backbone, one stage each, sharing :mod:`ltdist.methods.classifier_set`:
  KT (:mod:`ltdist.methods.kt`, :mod:`ltdist.methods.kt_select`), MPFA (:mod:`ltdist.methods.mpfa`,
  :mod:`ltdist.methods.mpfa_retrain`) and the decoupling baselines (:mod:`ltdist.methods.decoupling`).
"""
