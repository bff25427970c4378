"""A Tinker-style client API over the in-process engine (see `service.py`)."""

from cispo.client.futures import APIFuture
from cispo.client.service import SamplingClient, ServiceClient, TrainingClient
from cispo.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
    TensorData,
)

__all__ = [
    "APIFuture",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveWeightsResponse",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
]
