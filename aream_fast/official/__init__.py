"""The official AReAM formulation, slow on purpose.

Every piece here materialises what the official code materialises (per-layer N x N attention, stacked logits, a
separate pseudo-label forward). It is the ground truth that tests and benchmarks compare the fast paths with;
nothing in the fast library imports it. The semantics it follows are written down in ``docs/semantics.md``.
"""
