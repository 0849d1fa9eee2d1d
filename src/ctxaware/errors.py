"""Exceptions raised by ctxaware.

Every error a user can cause derives from :class:`CtxawareError`; the specific classes also
inherit the matching built-in (``ValueError``, ``FileNotFoundError`` ...) so callers can catch
either. Messages name the bad value and say how to fix it; the CLI prints them as one line.
"""

from __future__ import annotations


class CtxawareError(Exception):
    """Base class of every error ctxaware raises on purpose."""


class ConfigError(CtxawareError, ValueError):
    """A configuration value is invalid (out of range, wrong type, unknown name)."""


class InputError(CtxawareError, ValueError):
    """User data is malformed: bad messages, unknown role, invalid JSON, ..."""


class InputFileNotFoundError(CtxawareError, FileNotFoundError):
    """A file or directory named by the user does not exist."""


class TemplateError(CtxawareError, ValueError):
    """A chat template is missing, or cannot be split into role spans reliably."""


class ModelLoadError(CtxawareError, RuntimeError):
    """A model or tokenizer could not be loaded."""


class MissingDependencyError(CtxawareError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class SteeringError(CtxawareError, ValueError):
    """Steering could not be applied (no emphasised span, unsupported model, ...)."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install ctxaware[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module!r} is needed for this feature but is not installed; "
            f"run: pip install 'ctxaware[{extra}]'"
        ) from exc


class BusyError(CtxawareError, RuntimeError):
    """Another live process is writing the same results (an output directory's lock is held)."""
