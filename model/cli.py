"""argparse types for the command lines' counts and amounts: one reading of "a number in this range" for every
CLI (train.prepare, train.unigram, train.download, quant, quant.generate, bench). Not on a run's import
path, so not in the submitted train_gpt.py."""
import math
from argparse import ArgumentTypeError


def _bounded(parse, what: str, positive: bool):
    """An argparse type: the number `parse` reads from the text if it is > 0 (positive) or >= 0, and finite;
    otherwise argparse exits 2 naming the flag, the range and the text."""
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = math.nan  # refused below, with the range in the message
        if not (value > 0 if positive else value >= 0) or value == math.inf:
            raise ArgumentTypeError(f"must be {what} {'>' if positive else '>='} 0, got {text!r}")
        return value
    return check


positive_int = _bounded(int, "an integer", positive=True)
nonnegative_int = _bounded(int, "an integer", positive=False)
positive_float = _bounded(float, "a finite number", positive=True)
nonnegative_float = _bounded(float, "a finite number", positive=False)
