"""How an explanation is asked for: the same fields in a request body (``POST .../explain``), in
``deepyard explain``'s flags and in a train job's ``explain:`` block. No torch import here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["integrated_gradients", "saliency", "gradient_shap"]
Baseline = Literal["auto", "zeros", "mean", "unk"]

# What a request may ask for at most: an explanation costs `steps` forward and backward passes.
MAX_STEPS = 512


class ExplainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = Field("integrated_gradients", description="Captum's attribution method")
    steps: int = Field(50, ge=2, le=MAX_STEPS, description="integrated gradients: points on the path from the "
                                                          "baseline to start with (x4, up to 512, while the "
                                                          "attributions miss completeness by over 1%); gradient "
                                                          "SHAP: samples")
    baseline: Baseline = Field("auto", description="the input an attribution is measured from: zeros (a black "
                                                   "image), mean (the training split's mean input), unk (text: "
                                                   "every word <unk>, padding kept); auto: unk for text, "
                                                   "else mean (zeros where the model keeps no mean)")
    target: str | int | None = Field(None, description="classification: the class explained (name or index; "
                                                       "default: the predicted one); a forecast of several "
                                                       "steps: the step (default 0)")
    top_attributions: int = Field(5, ge=1, le=100, description="the most-attributed inputs listed per instance")
    heatmap: bool = Field(False, description="images: add a heatmap PNG (base64) to each explanation")


class ExplainJob(ExplainOptions):
    """A train job's ``explain:``: attribution pictures of the first test examples, in its MLflow run."""

    examples: int = Field(8, ge=1, le=64, description="test examples explained")

