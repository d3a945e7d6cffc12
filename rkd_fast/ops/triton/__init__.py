"""Triton kernels of the rkd_fast ops, one module per op.

Nothing here imports triton at package import: each op imports its kernel module lazily, inside the
torch.library.custom_op that launches it, so `import rkd_fast` works without triton installed. On CPU the
kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported).
"""
