"""The ``vera`` command line: ``demo``, ``inspect``, ``merge`` and ``convert``.

Run ``vera --help`` (or ``python -m vera_cli --help``).
"""
