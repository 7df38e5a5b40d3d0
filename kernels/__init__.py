"""gali.kernels: GALI's fused Triton ops, one op per file, each with its plain-PyTorch ``_ref`` twin beside it.

- ``kway_head``: the discriminator's last linear layer fused with the K-way D and G/E losses and their
  gradients: :func:`kway_head`, :func:`kway_head_grouped` (G groups of K logits in the same launch), their
  twins ``kway_head_ref`` and ``kway_head_grouped_ref``, and ``kway_losses``, the loss math every path matches.
- ``mask_composite``: inpainting masks drawn from per-sample parameters, the encoder's masked input and the
  GALI-mix composite in one pass: :func:`mask_composite`, its twin ``mask_composite_ref``, and the parameter
  samplers ``sample_box_params`` and ``sample_stroke_params``.
- ``_launch``: the launch helpers both op files share: the optional triton import, the ``impl`` names and
  their one resolution (``use_triton``), and the CUDA device guard around launches.

Each op file reads in the same order: a docstring (what it fuses, bytes moved, limits), the reference twin,
the Triton kernels, their launchers, the custom ops and their autograd, and the public op with its input
checks. Import an op from its module (``from gali.kernels.kway_head import kway_head``); this package
imports nothing.

Every public op takes ``impl="auto"|"triton"|"ref"``: 'auto' runs Triton on CUDA tensors of a dtype it
supports and the reference elsewhere; 'triton' where Triton cannot run is an error that says what to do.
CPU tensors run through Triton's interpreter when TRITON_INTERPRET=1 is set before the op module is first
imported. Triton is optional: without it the reference twins (and the samplers) still run.
"""
