"""Time series bundled with statsmodels, as next-value forecasting windows: no download, ever.

Each sample is the last ``lookback`` observations, shape (lookback, 1); its target is the next
one. With ``difference``, observations are week-to-week (or year-to-year) changes and the target is
the next change: a trending series (CO2) becomes one a model can learn without extrapolating past
the levels it was trained on; the next level is the last one plus the predicted change, with the
same error. Samples stay in time order (``RawData.ordered``): the splits are the earliest span for
training, then validation, then the most recent span for test, so nothing from the future is
learned from, and the standardization is fitted on the training span only.
"""

from __future__ import annotations

import numpy as np
from pydantic import PositiveInt

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData
from deepyard.errors import DataError


def windows(series: np.ndarray, lookback: int, differenced: bool = False) -> RawData:
    if len(series) <= lookback + 2:
        raise DataError(f"the series has {len(series)} points; lookback {lookback} leaves no windows")
    steps = np.lib.stride_tricks.sliding_window_view(series[:-1], lookback)
    return RawData(steps[..., None].astype(np.float32), series[lookback:].astype(np.float32), "regression",
                   ordered=True, persistence="zero" if differenced else "last")


def _statsmodels():
    try:
        import statsmodels.api as sm
    except ImportError:
        raise DataError("this data set ships with statsmodels: pip install statsmodels") from None
    return sm


@DATASETS.register("sunspots")
def sunspots(lookback: PositiveInt = 24) -> RawData:
    """309 yearly sunspot numbers, 1700-2008 (an ~11-year cycle); forecast the next year."""
    data = _statsmodels().datasets.sunspots.load_pandas().data
    return windows(data["SUNACTIVITY"].to_numpy(dtype=np.float64), lookback)


@DATASETS.register("co2")
def co2(lookback: PositiveInt = 52, difference: bool = True) -> RawData:
    """2,284 weekly CO2 readings at Mauna Loa, 1958-2001 (gaps interpolated): a trend plus a yearly
    cycle; forecast next week's change (``difference``) or level."""
    data = _statsmodels().datasets.co2.load_pandas().data["co2"].interpolate().bfill()
    series = data.to_numpy(dtype=np.float64)
    return windows(np.diff(series) if difference else series, lookback, differenced=difference)
