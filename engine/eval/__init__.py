"""gali.engine.eval: the evaluation protocol on checkpoints (``protocol``: ``gali eval``) and the
method comparison at one budget (``reproduce``: ``gali reproduce``). The metrics themselves are
``gali.engine.metrics``.
"""
