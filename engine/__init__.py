"""gali.engine: config, models, tuple specs, losses, the training step and loop, and the CLI.

Kept import-light on purpose: ``gali.pipelines`` and ``gali.kernels`` import
``gali.engine.errors`` without pulling the models or the training loop.
"""
