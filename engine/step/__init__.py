"""gali.engine.step: how one update runs.

The ``[optim]`` and ``[compute]`` sections (``config``), mixed precision (``precision``), the two
optimizers (``optim``), gradient averaging over ranks (``reduce``), the eager step (``eager``), the
graph-ready runner (``graphed``), the runner ``compute`` asks for (``build``) and the paper-structured
baseline every benchmark beats (``paper``). NVTX ranges are ``gali.engine.ranges``: the chains mark
them too.
"""
