"""Image, latent and model sizes given as an int (a square) or an (H, W) pair: the one reading of both."""
from __future__ import annotations

import operator


def size_pair(size, what: str = "size", error: type[Exception] = ValueError) -> tuple[int, int]:
    """``(H, W)`` as ints from an int ``n`` (meaning ``(n, n)``) or a pair (a tuple, or the list that JSON and
    YAML give back); both sides must be integers >= 1.

    Anything else (a bool, a float, a string, a sequence of another length, a side < 1) raises ``error``
    (ValueError unless the caller passes its own, e.g. a ``UserError`` subclass) with a message that starts
    with ``what``, the name of the value for the user (``"model.input_size"``, ``"<file>: image_size"``).
    """
    try:
        pair = (size, size) if _is_integer(size) else tuple(size)
        if len(pair) != 2 or not all(_is_integer(side) for side in pair):
            raise TypeError
        height, width = (operator.index(side) for side in pair)
    except TypeError:
        raise error(f"{what} must be an int or an (H, W) pair of ints, got {size!r}") from None
    if height < 1 or width < 1:
        raise error(f"{what} must be at least 1 on each side, got {size!r}")
    return height, width


def _is_integer(value) -> bool:
    """An int (a NumPy integer too), but not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
