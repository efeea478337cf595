"""Analysis of a trained model: layer attention entropy (and the entropy layer weights it gives) and the
over-smoothing diagnostics."""
