"""modelpar: plan and run tensor x pipeline x data parallel training."""

__version__ = "0.1.0"
