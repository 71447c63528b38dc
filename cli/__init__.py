"""The onnxstack command line: a thin layer over the public API."""

from .app import main
from .evaluate_cmd import evaluate

main.add_command(evaluate)

__all__ = ["main"]
