"""Helpers shared by the tests (importable as ``helpers``: pytest puts ``tests/`` on ``sys.path`` for
``tests/conftest.py``, which has no package above it)."""
