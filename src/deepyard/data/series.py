"""Time series bundled with statsmodels, as next-value forecasting windows: no download, ever.

Each sample is the last ``lookback`` observations, shape (lookback, 1); its target is the next
one, or the next ``horizon`` ones (a direct multi-step forecast: one output per step ahead). With
``difference``, observations are week-to-week (or year-to-year) changes and the target is
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


def windows(series: np.ndarray, lookback: int, differenced: bool = False, season: int | None = None,
            horizon: int = 1) -> RawData:
    """Samples of ``lookback`` steps, (lookback, 1); targets the next value, or with ``horizon`` > 1
    the next ``horizon`` values, (horizon,)."""
    if len(series) <= lookback + horizon + 1:
        raise DataError(f"the series has {len(series)} points; lookback {lookback} and horizon {horizon} "
                        "leave no windows")
    spans = np.lib.stride_tricks.sliding_window_view(series, lookback + horizon)
    x, y = spans[:, :lookback, None], spans[:, lookback:]
    return RawData(x.astype(np.float32), (y[:, 0] if horizon == 1 else y).astype(np.float32), "regression",
                   ordered=True, persistence="zero" if differenced else "last", season=season)


def _statsmodels():
    try:
        import statsmodels.api as sm
    except ImportError:
        raise DataError("this data set ships with statsmodels: pip install statsmodels") from None
    return sm


@DATASETS.register("sunspots")
def sunspots(lookback: PositiveInt = 24, horizon: PositiveInt = 1) -> RawData:
    """309 yearly sunspot numbers, 1700-2008 (an ~11-year cycle); forecast the next year (or ``horizon`` years)."""
    data = _statsmodels().datasets.sunspots.load_pandas().data
    return windows(data["SUNACTIVITY"].to_numpy(dtype=np.float64), lookback, season=11, horizon=horizon)


@DATASETS.register("co2")
def co2(lookback: PositiveInt = 52, difference: bool = True, horizon: PositiveInt = 1) -> RawData:
    """2,284 weekly CO2 readings at Mauna Loa, 1958-2001 (gaps interpolated): a trend plus a yearly
    cycle; forecast next week's change (``difference``) or level."""
    data = _statsmodels().datasets.co2.load_pandas().data["co2"].interpolate().bfill()
    series = data.to_numpy(dtype=np.float64)
    return windows(np.diff(series) if difference else series, lookback, differenced=difference, season=52,
                   horizon=horizon)


@DATASETS.register("csv_series")
def csv_series(path: str, column: str, lookback: PositiveInt = 24, horizon: PositiveInt = 1,
               difference: bool = False, season: PositiveInt | None = None,
               time_column: str | None = None) -> RawData:
    """The user's own series: one numeric ``column`` of a CSV file, in file order (or sorted by
    ``time_column``); gaps are interpolated. ``season`` (steps) adds the seasonal naive baseline."""
    import pandas as pd

    from deepyard.data.table_files import read_table

    table = read_table(path, [column] + ([time_column] if time_column else []))
    if time_column:
        table = table.sort_values(time_column, kind="stable")
    values = pd.to_numeric(table[column], errors="coerce")
    if values.notna().sum() < 3:
        raise DataError(f"{path}: column {column!r} holds fewer than 3 numbers")
    if season and season > lookback:
        raise DataError(f"data.params.season {season} is longer than lookback {lookback}: the seasonal naive "
                        "forecast needs the value one season back in each window; raise lookback")
    series = values.interpolate().bfill().ffill().to_numpy(dtype=np.float64)
    return windows(np.diff(series) if difference else series, lookback, differenced=difference, season=season,
                   horizon=horizon)
