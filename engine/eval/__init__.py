"""gali.engine.eval: the evaluation protocol on checkpoints (``protocol``: ``gali eval``, on one process or over
torchrun's ranks, ``ranks``), one module per metric (listed in ``registry``, shaped by ``metric``) and the method
comparison at one budget (``reproduce``: ``gali reproduce``). The metrics' arithmetic is ``gali.engine.metrics``.
"""
