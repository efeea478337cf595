"""The official AReAM formulation, slow on purpose.

Every piece here materialises what the official code materialises (per-layer N x N attention, stacked logits, a
separate pseudo-label forward). It is the ground truth that tests and benchmarks compare the fast paths with;
nothing in the fast library imports it. The semantics it follows are written down in ``docs/semantics.md``.

* ``loss.py`` -- the affinity loss (``aream_loss_reference``, ``official_affinity_loss``) and ``seg_to_aff``.
* ``model.py`` -- ``OfficialMCTformerV2`` and the eager forward ``forward_with_logits`` of a ``WSSSViT``.
* ``pseudo_labels.py`` -- ``gen_msf_cam``, the inference CAM seeds, ``OfficialPAR``, ``official_cam_to_seg``.
* ``step.py`` -- ``official_training_step``.
* ``conformer.py`` -- the official Conformer-S and its pseudo-label branch and step.
"""
