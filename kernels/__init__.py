"""gali.kernels: fused ops, one per file, each with its plain-PyTorch ``_ref`` twin.

Every public op takes ``impl="auto"|"triton"|"ref"``: 'auto' runs Triton on CUDA tensors and the
reference elsewhere; 'triton' on a tensor Triton cannot run on is an error (CPU tensors run through
Triton's interpreter when TRITON_INTERPRET=1 is set).
"""
