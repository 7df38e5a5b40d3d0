"""The ``gali`` package itself: ``python -m gali`` (and ``torchrun -m gali``) runs the ``gali`` command.

Its modules live in the sub-packages ``gali.engine``, ``gali.kernels`` and ``gali.pipelines``; this
package holds only the module entry point (pyproject.toml maps it to ``engine/entry``).
"""
