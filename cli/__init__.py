"""The onnxstack command line: a thin layer over the public API."""

from .app import main
from .evaluate_cmd import evaluate
from .finetune_cmd import finetune

main.add_command(evaluate)
main.add_command(finetune)

__all__ = ["main"]
