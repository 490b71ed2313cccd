"""What a value read from a checkpoint's JSON must be: JSON has no integer type of its own and Python's ``bool``
is an ``int``, so ``true`` must not pass as a count or a number."""
from __future__ import annotations


def is_count(value, least: int = 0) -> bool:
    """Whether ``value`` is an integer (not a bool) >= ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value) -> bool:
    """Whether ``value`` is an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_numbers(value) -> bool:
    """Whether ``value`` is a list of numbers (``is_number``)."""
    return isinstance(value, list) and all(is_number(v) for v in value)
