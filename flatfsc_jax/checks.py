"""Argument checks shared by the library functions and the config validation.

Each check names what it was given: a library function passes its own argument name
(``sam_gradient(rho=-1)`` -> "rho must be ..."), ``config_lib.validate`` passes the
config key and its ``ConfigError`` (``config.sam.eps must be ...``). Configs are checked
once, at the boundary (``config_lib.validate``, before anything compiles); library
functions check only their own arguments, so they stay usable without a config.
"""

from __future__ import annotations

import math
import numbers


def is_int(x) -> bool:
    """A concrete integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A concrete (Python or NumPy) real number, not a bool or a traced array."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite(x) -> bool:
    return is_real(x) and math.isfinite(x)


def check_int(
    name: str,
    value,
    *,
    minimum: int = 1,
    none: str | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """``value`` is an integer >= ``minimum``; ``none`` (what None means) allows None."""
    if none is not None and value is None:
        return
    if not is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if none is not None:
            what = f"None ({none}) or {what}"
        raise error(f"{name} must be {what}, got {value!r}")


def check_number(
    name: str,
    value,
    *,
    minimum: float = 0.0,
    positive: bool = False,
    below: float | None = None,
    none: str | None = None,
    hint: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """``value`` is a finite number >= ``minimum`` (> it with ``positive``), < ``below``.

    ``none`` (what None means) allows None; ``hint`` is appended to the message.
    """
    if none is not None and value is None:
        return
    ok = is_finite(value) and (value > minimum if positive else value >= minimum)
    if below is not None:
        ok = ok and value < below
        what = f"in [{minimum:g}, {below:g})"
    else:
        what = f"a finite number {'>' if positive else '>='} {minimum:g}"
    if none is not None:
        what = f"None ({none}) or {what}"
    if not ok:
        raise error(f"{name} must be {what}{hint}, got {value!r}")
