"""Methods built on a trained backbone: KT classifiers (paper 1)."""
