"""Adapters for the frameworks people train with, each a small module importing its framework
only when imported itself (install with the matching extra):

* :mod:`flatminima.integrations.lightning`: PyTorch Lightning (``flatminima[lightning]``);
* :mod:`flatminima.integrations.transformers`: the Hugging Face ``Trainer``
  (``flatminima[transformers]``);
* :mod:`flatminima.integrations.accelerate`: Hugging Face accelerate (``flatminima[accelerate]``).

Plain PyTorch needs none of them: mixed precision is :mod:`flatminima.amp`, gradient
accumulation :mod:`flatminima.accumulation`.
"""


def require(module: str, extra: str) -> None:
    """Raises a one-line ``ImportError`` naming the extra when ``module`` is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"this integration needs {module}, which is not installed: "
            f"pip install 'flatminima[{extra}]'"
        )
