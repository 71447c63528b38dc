"""One error hierarchy. The CLI turns each into one line and exit code 1."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, at most `limit` characters (its type name when it has none)."""
    text = " ".join(str(e).split())
    return text[:limit] if text else type(e).__name__


class OnnxstackError(Exception):
    """Base class of every error onnxstack raises on purpose."""


class ModelError(OnnxstackError):
    """The input is not a usable ONNX model (missing, not ONNX, truncated, malformed)."""


class ConfigError(OnnxstackError, ValueError):
    """Options that are out of range or contradict each other."""


class NothingToCompressError(OnnxstackError):
    """The model has no Conv layer that qualifies for compression."""


class DataError(OnnxstackError):
    """Calibration or evaluation data that does not fit the model."""


class OutputError(OnnxstackError):
    """The output cannot be written (exists, equals the input, unwritable folder)."""
