"""Losses: the AReAM affinity loss (front end and validation, the tiled torch backend, deferred per-layer
gradients) and the classification loss."""
