"""Torch backend tests: make the helper modules importable (also by the DDP test's spawned processes).

The folder is deliberately not a package: as ``tests/torch/__init__.py`` it would be named
``torch`` by pytest's package-root rule and shadow PyTorch.
"""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.append(HERE)  # appended: never shadows installed packages
