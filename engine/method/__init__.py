"""gali.engine.method: what GALI computes, whatever the speed.

Tuple specs as data (``tuple_spec``, ``tuples/*.toml``), the chain evaluator (``chains``), the loss
weights and statistics (``losses``), the instance-noise schedule (``noise``) and the ``[method]``
config section (``config``).
"""
