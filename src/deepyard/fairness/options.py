"""A train job's ``fairness:`` block. No torch or fairlearn import here (spec loading stays fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Constraint = Literal["equalized_odds", "demographic_parity", "true_positive_rate_parity",
                     "false_positive_rate_parity"]


class FairnessSpec(BaseModel):
    """How a classifier treats groups of people: per-group metrics, disparities with bootstrap
    confidence intervals, and optionally a mitigated version (fairlearn's ThresholdOptimizer)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # positive_label: 1 -> "1"

    sensitive: list[str] = Field(min_length=1, description="table columns that define the groups (colour, sex...); "
                                                           "several: their combinations are the groups")
    include_sensitive: bool = Field(False, description="let the model read the sensitive columns too (default: "
                                                       "they are left out of the features)")
    positive_label: str | None = Field(None, description="the favourable outcome whose rates are compared "
                                                         "(default: the second class name in sorted order, e.g. "
                                                         "'Yes'); multi-class jobs without it get per-group "
                                                         "accuracies only")
    bootstrap: int = Field(200, ge=0, le=5000, description="resamples of the test split for 95% confidence "
                                                           "intervals (0: none)")
    mitigation: Literal["threshold_optimizer"] | None = Field(
        None, description="register a mitigated version too: per-group thresholds fitted on the validation "
                          "split's probabilities (binary classification; the endpoint then needs the "
                          "sensitive columns in each request)")
    constraint: Constraint = Field("equalized_odds", description="what the mitigation equalizes across groups")
    objective: Literal["accuracy_score", "balanced_accuracy_score"] = Field(
        "accuracy_score", description="what the mitigation maximizes under the constraint")
    alias: str | None = Field("fair", description="the registry alias the mitigated version gets (None: none)")
