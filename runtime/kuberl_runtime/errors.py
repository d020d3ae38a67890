"""Failures users understand: each names its cause and the config field to change.

The runtime raises `ConfigError`, `DataError` or `PeerLost` where it knows what went wrong; the
entry point catches everything, and then

    message = describe(exc)                   # one line: the cause and the field to change
    progress.finish("failed", message)        # the progress document's final state
    write_termination_message(message)        # what the operator shows in status and Events
    sys.exit(exit_code_for(exc))

The operator reads the exit code (see `contract`) to decide whether a gang restart can help:

    exception                                         exit code               retried
    ConfigError (bad config, paths, reward function)  78 EXIT_CONFIG_ERROR    no
    DataError (NaN/inf loss, unusable data)           65 EXIT_DATA_ERROR      no
    out of memory (torch.OutOfMemoryError, ...)       71 EXIT_OUT_OF_MEMORY   yes
    PeerLost, torch.distributed errors, lost peers,   75 EXIT_PEER_LOST       yes
    collective timeouts (gloo, NCCL's watchdog)
    KeyboardInterrupt                                 130                     yes
    anything else                                     1                       yes

    raise ConfigError(f"prompt file has no column {key!r}", field="runtime.data.promptKey")
    check_finite("train/policy_loss", loss.item(), field="runtime.training.lr")

This module imports no torch: torch's exceptions are recognised by class name and message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .contract import (
    ENV_COLLECTIVE_TIMEOUT,
    ENV_TERMINATION_LOG,
    EXIT_CONFIG_ERROR,
    EXIT_DATA_ERROR,
    EXIT_OUT_OF_MEMORY,
    EXIT_PEER_LOST,
)

EXIT_FAILURE = 1  # anything unforeseen: the operator retries it within backoffLimit
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

OOM_FIELDS = ("training.microBatchSize", "training.gradientCheckpointing", "rollout.gpuMemoryFraction")
MAX_MESSAGE = 600  # characters; the operator keeps at most 1024 of a termination message
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath

# torch.distributed.DistError and its subclasses (DistBackendError: NCCL; DistNetworkError:
# rendezvous; DistStoreError: TCPStore timeouts). gloo raises plain RuntimeErrors, and so did NCCL in
# older torch releases (std::runtime_error): their texts are recognised too, taken from gloo's and
# torch's sources.
_DIST_ERRORS = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer"  # gloo: the peer's process exited (pair.cc)
    r"|communicator was aborted"  # NCCL: "NCCL communicator was aborted on rank 3. Original reason ..."
    r"|remote process exited or there was a network error",  # NCCL: ncclRemoteError
    re.I,
)
# A collective that waited past the group's timeout (distributed.collective_timeout): a peer is gone,
# stuck, or only slower than the timeout allows.
_COLLECTIVE_TIMEOUT = re.compile(
    r"timed out waiting \d+ ?ms for (send|recv) operation"  # gloo: unbound_buffer.cc
    r"|application timeout caused pair closure"  # gloo: the group's other operations after a timeout
    r"|watchdog caught collective operation timeout",  # NCCL: ProcessGroupNCCL's watchdog
    re.I,
)
_OOM_TEXT = re.compile(r"out of memory", re.I)


class RuntimeFailure(Exception):
    """A failure the runtime diagnosed: a message, the exit code, the config field to change."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.message} (change {self.field})" if self.field else self.message


class ConfigError(RuntimeFailure):
    """Bad config: missing model or data path, wrong prompt key, a reward function that fails."""

    exit_code = EXIT_CONFIG_ERROR


class DataError(RuntimeFailure):
    """Unusable numbers or data: NaN/inf loss, an empty dataset. Retrying would repeat it."""

    exit_code = EXIT_DATA_ERROR


class PeerLost(RuntimeFailure):
    """A peer vanished or never arrived (rendezvous or collective timeout); a gang restart may help."""

    exit_code = EXIT_PEER_LOST

    def __init__(self, message: str, role: str | None = None, rank: int | None = None):
        who = " ".join(p for p in (role, None if rank is None else f"rank {rank}") if p)
        super().__init__(f"{message} (peer: {who})" if who else message)
        self.role = role
        self.rank = rank


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes (`raise ... from`) and contexts, innermost last, no cycles."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _is_oom(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError), host MemoryError, and the
    # RuntimeErrors CUDA/NCCL raise with "out of memory" in their text.
    return isinstance(exc, MemoryError) or "OutOfMemoryError" in _names(exc) or (
        isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)))
    )


def _is_collective_timeout(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_TIMEOUT.search(str(exc)))


def _is_peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, PeerLost) or bool(_names(exc) & _DIST_ERRORS) or _is_collective_timeout(exc) or (
        isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc)))
    )


def _classify(exc: BaseException) -> tuple[str, BaseException]:
    """("config"|"data"|"peer"|"oom"|"interrupt"|"other", the exception of the chain that decided)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupt", exc
    if isinstance(exc, (ConfigError, DataError)):
        return ("config" if isinstance(exc, ConfigError) else "data"), exc
    for e in _chain(exc):
        if _is_oom(e):
            return "oom", e
    for e in _chain(exc):
        if _is_peer_lost(e):
            return "peer", e
    return "other", exc


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended the run (the table in the docstring)."""
    kind, _ = _classify(exc)
    return {
        "config": EXIT_CONFIG_ERROR,
        "data": EXIT_DATA_ERROR,
        "oom": EXIT_OUT_OF_MEMORY,
        "peer": EXIT_PEER_LOST,
        "interrupt": EXIT_INTERRUPTED,
    }.get(kind, exc.exit_code if isinstance(exc, RuntimeFailure) else EXIT_FAILURE)


def describe(exc: BaseException) -> str:
    """One line for the log, the progress document and the operator: the cause, what to change."""
    kind, cause = _classify(exc)
    if kind == "oom":
        text = (
            f"out of memory ({_first_line(cause) or type(cause).__name__}); lower {OOM_FIELDS[0]}, "
            f"enable {OOM_FIELDS[1]}, or lower {OOM_FIELDS[2]}"
        )
    elif kind == "peer" and _is_collective_timeout(cause):
        text = (
            f"lost a peer process ({type(cause).__name__}: {_first_line(cause)}); a collective waited past "
            "its timeout: another pod of the job failed, hangs or is unreachable (its own failure is the "
            f"cause), or was only slow: then raise {ENV_COLLECTIVE_TIMEOUT}"
        )
    elif kind == "peer" and not isinstance(cause, PeerLost):
        text = (
            f"lost a peer process ({type(cause).__name__}: {_first_line(cause)}); another pod of the job "
            "failed or is unreachable, its own failure is the cause"
        )
    elif kind == "interrupt":
        text = "interrupted"
    elif isinstance(exc, RuntimeFailure):
        text = f"{type(exc).__name__}: {exc}"
    else:
        line = _first_line(exc)
        text = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    text = " ".join(text.split())  # one line, whatever the messages held
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def write_termination_message(message: str, path: str | None = None) -> bool:
    """Write `message` where Kubernetes reads a container's termination message.

    Only when the file exists (the kubelet creates it in every container); outside Kubernetes this
    does nothing and returns False. The path: `path`, else $KUBERL_TERMINATION_LOG, else
    /dev/termination-log. (contract.format_termination_message puts the final progress first.)
    """
    target = Path(path or os.environ.get(ENV_TERMINATION_LOG) or TERMINATION_LOG)
    if not target.is_file():
        return False
    target.write_text(message + "\n", encoding="utf-8")
    return True


def check_finite(name: str, value: float, field: str) -> None:
    """Raise DataError when a metric such as `train/policy_loss` is NaN or infinite."""
    if not math.isfinite(value):
        raise DataError(f"{name} is {value} (not finite)", field=field)
