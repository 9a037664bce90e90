"""What the command-line tools (``gmsa-rag``, ``python -m gmsa_rag.cache``) do with errors: one line on
stderr naming the path and the fix, and an exit status per kind of fault.

Standard library only at import time: ``--help`` must not pay for torch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK = 0
EXIT_DECLINED = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3
EXIT_CACHE = 4
EXIT_MODEL = 5
EXIT_DEVICE = 6
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = f"""exit status:
  {EXIT_OK}    success
  {EXIT_DECLINED}    declined at a confirmation prompt
  {EXIT_USAGE}    invalid argument or input path (checked before any model loads)
  {EXIT_CHECKPOINT}    GMSA checkpoint missing, corrupted, or trained on other base-model weights
  {EXIT_CACHE}    soft-token cache damaged or not writable
  {EXIT_MODEL}    base or embedding model not available on this machine (offline)
  {EXIT_DEVICE}    torch device not available
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); entries already stored in the cache are kept"""


# CheckpointError messages (gmsa_rag.checkpoint) say what is wrong with the folder; this says what to do.
_CHECKPOINT_FIX = "pass --checkpoint with a complete GMSA checkpoint folder (as written by save_pretrained)"


class UsageError(ValueError):
    """An invalid argument or input path."""


class BackboneUnavailableError(RuntimeError):
    """A base or embedding model cannot be found on this machine (offline, not cached, package missing)."""


class DeviceUnavailableError(RuntimeError):
    """The requested torch device does not exist on this machine or in this torch build."""


def exit_status(exc: BaseException) -> int | None:
    """The exit status of a known error; ``None`` for anything else (a bug keeps its traceback)."""
    from .cache.store import CacheDatabaseError

    known: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = [
        (CacheDatabaseError, EXIT_CACHE),
        (BackboneUnavailableError, EXIT_MODEL),
        (DeviceUnavailableError, EXIT_DEVICE),
        ((ValueError, TypeError, FileNotFoundError, NotADirectoryError, FileExistsError), EXIT_USAGE),
    ]
    for kinds, status in known:
        if isinstance(exc, kinds):
            return status
    from .checkpoint import CheckpointError  # imported last: it imports torch
    from .markers import GMSAPromptError

    if isinstance(exc, GMSAPromptError):  # e.g. retrieved documents beyond the decoder's window
        return EXIT_USAGE
    return EXIT_CHECKPOINT if isinstance(exc, CheckpointError) else None


def report_errors(command: Callable[[], int]) -> int:
    """Run ``command``; a known error or Ctrl-C becomes one line on stderr and its exit status."""
    try:
        return command()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); soft tokens already stored in the cache are kept: run the command "
              "again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - unknown errors are re-raised just below
        status = exit_status(exc)
        if status is None:
            raise
        fix = f"; {_CHECKPOINT_FIX}" if status == EXIT_CHECKPOINT else ""
        print(f"error: {' '.join(str(exc).split())}{fix}", file=sys.stderr)
        return status


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def check_device(device: str) -> None:
    """Raise :class:`DeviceUnavailableError` unless torch can allocate on ``device`` here."""
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeviceUnavailableError(
            f"torch device {device!r} is not available on this machine ({reason}); pass --device cpu"
        ) from err
