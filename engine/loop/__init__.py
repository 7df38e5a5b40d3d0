"""gali.engine.loop: the host side of training.

The ``[run]`` section and the whole config (``config``), the training loop and resume (``train``),
the checkpoint bundle (``checkpoint``), the clock, cadences and tick statistics (``ticks``), the
snapshots (``snapshots``), the run log (``run_log``), image grids (``grids``), device, seeds and run
folder (``runtime``) and ``gali profile`` (``profile``).
"""
