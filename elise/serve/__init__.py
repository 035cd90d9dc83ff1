"""The OpenAI-compatible speech server (``python serve.py``): ``app`` (routes, limits, errors),
``batcher`` (the continuous-batching model worker), ``voices``, ``formats``, ``metrics`` and the page
in ``static/``. It generates through the synthesis engine's prompts, settings, model and codec."""
