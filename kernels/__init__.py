"""Triton kernels (installed as aream_fast.kernels). Each file: kernels + launcher + torch.library op."""
