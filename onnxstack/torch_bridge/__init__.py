"""The torch bridge: ONNX graphs as torch modules, and fine-tuning of compressed models by distillation.

    from onnxstack.torch_bridge import FinetuneConfig, finetune
    result = finetune("model.stacked.onnx", "model.onnx", data, config=FinetuneConfig(epochs=3))
    result.save("model.ft.onnx")

Needs torch (`pip install 'onnxstack[torch]'`); `import onnxstack` alone never imports it.
"""

from ..errors import OnnxstackError

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    raise OnnxstackError("fine-tuning needs torch: pip install 'onnxstack[torch]'") from None

from .finetune import FinetuneConfig, FinetuneResult, finetune  # noqa: E402
from .graph import OnnxModule, UnsupportedOpError, build_module, layer_outputs, logit_names  # noqa: E402
from .layers import StackedBinaryConv2d  # noqa: E402
from .writeback import write_back  # noqa: E402

__all__ = [
    "FinetuneConfig", "FinetuneResult", "OnnxModule", "StackedBinaryConv2d", "UnsupportedOpError",
    "build_module", "finetune", "layer_outputs", "logit_names", "write_back",
]
