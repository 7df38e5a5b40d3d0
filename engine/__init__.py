"""gali.engine: the GALI training engine, in layers; each sub-package imports only the ones before it.

    errors, files, ranges   base modules: errors that name the fix, atomic writes, NVTX ranges
    config, method          the config machinery and the presets; tuple specs, chains, losses, noise schedule
    nets                    architectures, layers, the paper's and BigBiGAN-class G/E/D, feature models, inference
    step                    one update: eager, graphed, precision, optimizers, the paper baseline
    metrics                 evaluation metrics as pure functions
    loop                    the training loop, checkpoints, moving averages, logs, grids, gali profile and info
    eval, cli               ``gali eval`` and ``gali reproduce``; argument parsing and dispatch
docs/architecture.md draws the same layers and how data flows through them.
"""
