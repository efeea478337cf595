"""Pseudo labels from image-level labels: CAMs, their refinement by shallow-layer attention, PAR, label fusion,
patch sampling and CAM seed files (the stage between the model and the AReAM loss)."""
