"""Attention and loss kernels with pure-torch references, free of transformers (patches/ plugs them in)."""

# The loss backends (linear_cross_entropy.py): named here, torch-free, so settings and patches read them without
# loading a kernel. reference: plain logits + cross-entropy.
LOSS_KERNELS = ("auto", "torch", "liger", "reference")
