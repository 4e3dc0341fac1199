"""Triton kernels, one file per op: kernel(s), launcher, torch.library custom op (fake impl, autograd,
FLOP formula) and a plain-torch reference used by tests."""
