"""gali.engine.nets: everything with parameters.

The ``[model]`` section (``config``), the paper's architecture tables (``arch``), layers with their
``ref`` twins and the weight init (``layers``), the paper's G, E and D (``paper``), D's pair head for the
adversarial cycle family (``pair_head``), frozen feature
models behind their input resize (``feature_models``), the networks of one run (``networks``) and
their inference chains: sampling, reconstruction, inpainting (``inference``).
"""
