"""Losses as pure tensor functions: the equation, the paper and the shapes in each docstring.

Each returns ``(loss, metrics)`` where ``metrics`` is a dict of detached scalars, and never sees a config object.
"""

from __future__ import annotations
