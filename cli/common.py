"""What every command shares: one-line errors and their exit codes, API words turned into flags, the lazy
progress bar. Commands import from here (never from each other's modules)."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys

import click

from onnxstack.errors import ConfigError, OnnxstackError

# API words in error messages -> the command line's (the API's own messages stay in API words)
API_WORDS = {"overwrite=True": "--overwrite"}
# CompressConfig fields -> the compress options that set them
CONFIG_FLAGS = {
    "slice_dim": "-d/--slice-dim",
    "codebook_size": "-m/--codebook-size",
    "max_codebook_size": "--max-codebook-size",
    "terms": "-k/--terms",
    "scale": "--scale",
    "execution": "--execution",
    "iterations": "--iterations",
    "seed": "--seed",
}


def fail(message: str, code: int = 1) -> None:
    message = " ".join(str(message).split())  # always one line
    click.echo(f"onnxstack: error: {message}", err=True)
    sys.exit(code)


def cli_words(message: str) -> str:
    """An API error message in the command line's words."""
    for api, flag in API_WORDS.items():
        message = message.replace(api, flag)
    return message


class UsageError(OnnxstackError):
    """Option values the command line rejects: exit code 2, like click's own usage errors."""


def option_error(error: ConfigError, flags: dict[str, str] = CONFIG_FLAGS) -> UsageError:
    """A ConfigError about config fields, as a usage error that names the flags instead."""
    text = str(error)
    for field in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){field}(?![\w-])", flags[field], text)
    return UsageError(text)


def handle_errors(fn):
    """onnxstack errors become one line on stderr and exit 1 (usage errors 2); never a traceback for a user
    mistake."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        show_warnings()
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            fail(str(e), 2)
        except OnnxstackError as e:
            fail(cli_words(str(e)))
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except MemoryError:
            fail("out of memory")
        except (SystemExit, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - a bug: still one line, never a traceback
            if os.environ.get("ONNXSTACK_DEBUG"):
                raise
            fail(f"internal error ({type(e).__name__}: {e}); please report it (ONNXSTACK_DEBUG=1 shows the traceback)")

    return wrapper


class LazyBar:
    """A progress callback whose bar appears with the first update (so early errors stay one line); a phase
    that ends (done == total) closes its bar, and the next phase opens its own."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int, item: str = "") -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, item_show_func=lambda x: x)
            self.bar.__enter__()
        self.bar.update(1, item)
        if done == total:
            self.bar.__exit__(None, None, None)
            self.bar = None


class EchoHandler(logging.Handler):
    """onnxstack's log records as one `onnxstack: warning: ...` line on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "note"
        click.echo(f"onnxstack: {level}: {' '.join(self.format(record).split())}", err=True)


def show_warnings() -> None:
    """Route the library's warnings (logger 'onnxstack') to stderr, once."""
    logger = logging.getLogger("onnxstack")
    if not any(isinstance(h, EchoHandler) for h in logger.handlers):
        logger.addHandler(EchoHandler(logging.WARNING))
        logger.propagate = False
