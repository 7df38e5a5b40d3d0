"""gali.kernels: GALI's fused Triton ops, one op per file, each with its plain-PyTorch ``_ref`` twin beside it.

- ``kway_head``: D's last linear layer fused with the K-way losses and their gradients (also grouped; ``kway_losses``);
- ``mask_composite``: masks, the masked input and the GALI-mix composite in one pass (and the mask parameter samplers);
- ``_launch``: the shared optional triton import, ``impl`` resolution (``use_triton``) and CUDA device guard.
Each op file reads: a docstring (what it fuses, bytes moved, limits), the reference twin, the Triton kernels, their
launchers, the custom ops and their autograd, the public op with its input checks. Import an op from its module; this
package imports nothing. ``impl="auto"`` runs Triton on CUDA tensors of a supported dtype and the reference elsewhere;
``"triton"`` where it cannot run is an error that says what to do. TRITON_INTERPRET=1, set before an op module is first
imported, runs CPU tensors in Triton's interpreter. Without Triton the twins and samplers still run.
"""
