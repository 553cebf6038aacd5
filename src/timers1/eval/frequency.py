"""Frequencies as GIFT-Eval (gluonts) sees them: base code, multiple, seasonality, horizon.

gluonts names frequencies with the old pandas codes (H, T, S, M, Q, A); pandas >= 2.2 renamed
several (h, min, s, ME, QE, YE). We accept either spelling and normalise to the gluonts code,
because the GIFT-Eval rules (seasonality, base horizon, configuration names) are keyed on it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import pandas as pd

from timers1.errors import InputError


class FrequencyError(InputError):
    """A frequency string that pandas cannot parse or that the protocol has no rule for."""


# pandas offset name (without its anchor suffix such as "-SUN" or "-DEC") -> gluonts base code.
_PANDAS_TO_GLUONTS = {
    "S": "S", "s": "S",
    "T": "T", "min": "T",
    "H": "H", "h": "H",
    "D": "D",
    "B": "B",
    "W": "W",
    "M": "M", "ME": "M", "MS": "M", "BM": "M", "BME": "M", "BMS": "M", "SM": "M", "SME": "M", "SMS": "M",
    "Q": "Q", "QE": "Q", "QS": "Q", "BQ": "Q", "BQE": "Q", "BQS": "Q",
    "A": "A", "Y": "A", "YE": "A", "YS": "A", "AS": "A", "BA": "A", "BY": "A", "BYE": "A", "BYS": "A",
}

# gluonts.time_feature.get_seasonality defaults; anything else is 1.
_DEFAULT_SEASONALITY = {"S": 3600, "T": 1440, "H": 24, "D": 1, "W": 1, "M": 12, "B": 5, "Q": 4}

# GIFT-Eval base prediction lengths; terms multiply them.
_BASE_HORIZON = {"M": 12, "W": 8, "D": 30, "H": 48, "T": 48, "S": 60}
_M4_HORIZON = {"A": 6, "Q": 8, "M": 18, "W": 13, "D": 14, "H": 48}
TERM_MULTIPLIER = {"short": 1, "medium": 10, "long": 15}

# gluonts' code -> the alias pandas (>= 2.2) wants for building date ranges.
_GLUONTS_TO_PANDAS_ALIAS = {"S": "s", "T": "min", "H": "h", "D": "D", "B": "B", "W": "W",
                            "M": "MS", "Q": "QS", "A": "YS"}


@dataclass(frozen=True)
class Frequency:
    """A parsed frequency: ``multiple`` x ``base`` (gluonts code), e.g. 15 x T."""

    base: str
    multiple: int = 1
    pandas_alias: str | None = field(default=None, compare=False)
    """The exact pandas offset alias when known (keeps 'ME' vs 'MS', 'W-SUN' vs 'W-MON')."""

    @property
    def code(self) -> str:
        """gluonts-style name, as used in configuration names: 'H', '15T', 'M'."""
        return self.base if self.multiple == 1 else f"{self.multiple}{self.base}"

    @property
    def seasonality(self) -> int:
        """gluonts get_seasonality: default for the base, divided by the multiple when it divides."""
        season = _DEFAULT_SEASONALITY.get(self.base, 1)
        return season // self.multiple if season % self.multiple == 0 else 1

    def base_horizon(self, m4: bool = False) -> int:
        table = _M4_HORIZON if m4 else _BASE_HORIZON
        if self.base not in table:
            kind = "M4 " if m4 else ""
            raise FrequencyError(
                f"frequency {self.code!r} has no GIFT-Eval {kind}base horizon "
                f"(known: {', '.join(table)}); give the horizon explicitly")
        return table[self.base]

    @property
    def pandas_offset(self) -> pd.DateOffset:
        """Offset for continuing timestamps; without a pandas alias, period steps start their period."""
        if self.pandas_alias is not None:
            return pd.tseries.frequencies.to_offset(self.pandas_alias)
        return pd.tseries.frequencies.to_offset(f"{self.multiple}{_GLUONTS_TO_PANDAS_ALIAS[self.base]}")


def parse_frequency(freq: str, where: str = "frequency") -> Frequency:
    """Parse a pandas or gluonts frequency string ('H', 'h', '15min', 'ME', 'W-SUN', 'A').

    ``where`` names the origin (file and field) for the error message.
    """
    if not isinstance(freq, str) or not freq.strip():
        raise FrequencyError(f"{where}: expected a frequency string such as 'H', 'D', 'W', 'M', got {freq!r}")
    text = freq.strip()
    match = re.fullmatch(r"(\d*)([A-Za-z]+)(-[A-Za-z]+)?", text)
    if match is None:
        raise FrequencyError(f"{where}: unknown frequency {freq!r}")
    multiple = int(match.group(1)) if match.group(1) else 1
    name = match.group(2)
    if name not in _PANDAS_TO_GLUONTS:
        # Let pandas have the last word on aliases we do not list (it knows many spellings).
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                offset = pd.tseries.frequencies.to_offset(text)
        except (ValueError, TypeError):
            raise FrequencyError(f"{where}: unknown frequency {freq!r}") from None
        name = offset.name.split("-")[0].lstrip("0123456789")
        multiple = offset.n
        if name not in _PANDAS_TO_GLUONTS:
            raise FrequencyError(f"{where}: frequency {freq!r} (pandas {offset.name!r}) is not supported")
    if multiple < 1:
        raise FrequencyError(f"{where}: frequency {freq!r} must have a positive multiple")
    return Frequency(base=_PANDAS_TO_GLUONTS[name], multiple=multiple, pandas_alias=_pandas_alias(text))


def _pandas_alias(text: str) -> str | None:
    """The alias as pandas spells it today, or None for gluonts-only names (e.g. 'M', 'A')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # deprecated spellings ('H', 'T') fall back to our map
            return pd.tseries.frequencies.to_offset(text).freqstr
    except (ValueError, TypeError, FutureWarning, DeprecationWarning):
        return None


def infer_frequency(timestamps: pd.DatetimeIndex, where: str) -> Frequency:
    """Infer a series' frequency from its (sorted) timestamps; error naming ``where`` if irregular."""
    if len(timestamps) < 3:
        raise FrequencyError(f"{where}: cannot infer a frequency from {len(timestamps)} timestamp(s); pass --freq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = pd.infer_freq(timestamps)
    if inferred is None:
        raise FrequencyError(
            f"{where}: timestamps are irregular ({timestamps[0]} .. {timestamps[-1]}), "
            "cannot infer a frequency; pass --freq")
    return parse_frequency(inferred, where)
