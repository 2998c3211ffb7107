"""Counts as bigpt writes them for people, one precision everywhere: 30.7K, 8.03B, 126M."""

import math

_SCALES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def short(number: float) -> str:
    """Three significant digits and a K/M/B/T suffix (an integer below a thousand)."""
    for scale, suffix in _SCALES:
        if abs(number) >= scale:
            scaled = number / scale
            return f"{scaled:.{max(0, 2 - int(math.log10(abs(scaled))))}f}{suffix}"
    return f"{number:.0f}"
