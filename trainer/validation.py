# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Numeric argument checks shared by every entry point (`train.py`, `predict.py`, `evaluate_model.py`, `prepare`).

Every number a user gives is checked once, when the arguments are parsed: finite, in range, whole where it counts
something, with an error naming the argument. No `value or default` on numbers anywhere (it turns 0 into the default).
"""

import argparse
import math


def check_number(name: str, value, *, minimum=None, maximum=None, above=None, below=None, integer: bool = False,
                 optional: bool = False) -> None:
    """Raise a `ValueError` naming `--name` unless `value` is a finite number in range (or `None` when `optional`).

    Args:
        name (`str`): the argument name, without the dashes.
        minimum, maximum: inclusive bounds; above, below: exclusive bounds.
        integer (`bool`): the value must be a whole number.
        optional (`bool`): `None` is allowed (not given).
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number, got {value!r}.")
    if integer and int(value) != value:
        raise ValueError(f"--{name} must be a whole number, got {value!r}.")
    for bound, holds, sign in (
        (minimum, lambda v, b: v >= b, ">="),
        (maximum, lambda v, b: v <= b, "<="),
        (above, lambda v, b: v > b, ">"),
        (below, lambda v, b: v < b, "<"),
    ):
        if bound is not None and not holds(value, bound):
            raise ValueError(f"--{name} must be {sign} {bound}, got {value!r}.")


def number_type(integer: bool = False, **bounds):
    """An argparse `type=` that parses a number and applies `check_number` (argparse names the argument)."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole' if integer else 'a'} number, got {text!r}") from None
        try:
            check_number("value", value, integer=integer, **bounds)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).replace("--value ", "")) from None
        return value

    parse.__name__ = "int" if integer else "float"
    return parse


__all__ = ["check_number", "number_type"]
