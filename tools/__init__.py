"""Offline tools of the repository, not part of the installed package.

A package (like ``configs``) so that tests import them as ``from tools import X`` from the
repository root, and they run as ``python -m tools.X``.
"""
