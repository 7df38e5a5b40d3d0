"""gali.engine.loop: the host side of training.

The ``[run]`` section and the whole config (``config``), the training loop and resume (``train``),
the checkpoint bundle (``checkpoint``), torchrun's ranks and what they agree on (``distributed``),
stop signals and exit codes (``signals``), the clock, cadences and tick statistics (``ticks``), the
snapshots (``snapshots``), the run log (``run_log``), image grids (``grids``), device, seeds and run
folder (``runtime``) and ``gali profile`` (``profile``).
"""
