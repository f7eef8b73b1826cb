"""The parameters an image data set takes for a transfer study: which classes, how many labels."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, NonNegativeInt, PositiveInt

ClassList = Annotated[list[NonNegativeInt] | None, Field(
    description="keep only these classes (indices), relabelled 0..k-1 in this order")]
LabelBudget = Annotated[PositiveInt | None, Field(
    description="labelled training samples per class (seeded, stratified); the rest train unlabelled or not at all")]
