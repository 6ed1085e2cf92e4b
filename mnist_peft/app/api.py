"""The ``/predict`` endpoint (what ``gradio_client`` calls): one MNIST-style image and a stack spec in,
the base's and the stack's answer out (:meth:`~mnist_peft.serving.engine.Predictor.answer`), batched
through gradio's queue; and its unbatched twin, the load test's control. No gradio import here.

Example:
    >>> from gradio_client import Client
    >>> Client("http://127.0.0.1:7860/").predict(pixels, "digit-9@1:1.0", api_name="/predict")
    {'base': {'label': 9, 'probabilities': [...]}, 'stack': {'label': 9, ...}}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["API_NAME", "UNBATCHED_API_NAME", "api_function"]

API_NAME = "predict"  # the endpoint gradio_client calls: Client(url).predict(pixels, spec, api_name="/predict")
UNBATCHED_API_NAME = "predict_unbatched"  # the same, one request at a time (undocumented; the load test's control)


def api_function(handlers: Any, *, batched: bool) -> Callable[..., Any]:
    """``/predict`` as gradio sees it: its API page and ``gradio_client`` show one request's types
    (an image, a spec, a dict back), whether the queue hands the function a batch or not."""
    if batched:

        def predict(image, adapters):
            return handlers.api(image, adapters)

    else:

        def predict(image, adapters):
            return handlers.predictor.answer([image], [adapters])[0]

    predict.__doc__ = (
        "Classify one MNIST-style image through the base and through a weighted stack of registry adapters. "
        "image: 28 x 28 numbers in [0, 1] (ink 1.0 on black 0.0, centred as MNIST's are); adapters: e.g. "
        "'digit-9@1:1.0,digit-3:0.5' ('' or 'none': the base alone). Returns {'base': {'label', 'probabilities', 'logits'}, "
        "'stack': {..., 'adapters'} or None}, or {'error': message} for a bad request."
    )
    predict.__annotations__ = {"image": list[list[float]], "adapters": str, "return": dict[str, Any]}
    return predict
