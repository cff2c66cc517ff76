"""What every command shares: logging, how an error becomes one line and an exit status, and
the settings resolved for a registry.

Every failure a user can cause prints one line, ``modelfs: error: ...``, and exits non-zero;
tracebacks are for bugs only (and ``--log-level debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from ..config import ConfigError
from ..errors import (
    AuthenticationError,
    InvalidPattern,
    InvalidReferenceError,
    ManifestError,
    ModelfsError,
    NotAModelError,
    NotFoundError,
    SignatureError,
    TLSError,
    UnsafePathError,
    user_error,
)
from ..resolved import ResolvedSettings, resolve_settings
from ..settings import BY_NAME
from .stops import stopped

log = logging.getLogger("modelfs")


def setup_logging(level: str, log_file: str | None = None, log_max_size: int = BY_NAME["log_max_size"].default) -> None:
    if log_file:
        from ..logfile import DaemonLog  # only a mount daemon logs to a file

        handler: logging.Handler = DaemonLog(log_file, log_max_size)
    else:
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def settings_for(args: argparse.Namespace, registry: str | None = None, repository: str | None = None
                 ) -> ResolvedSettings:
    """Every setting for ``registry`` (None: the top level) and ``repository`` (which a
    signature policy's scope may name): the command's flags, then the config the command line
    read (``args.config``), then the defaults."""
    return resolve_settings(vars(args), args.config, registry, repository)


def warn_offline(offline: str | None) -> None:
    if offline is not None:
        print(f"warning: offline: {offline}", file=sys.stderr)


# The exit status of a mount daemon (``mount --foreground``, as systemd runs it) that failed in
# a way restarting cannot cure: a bad reference, refused credentials, not a model, a TLS or
# configuration mistake. The unit lists it in RestartPreventExitStatus= instead of restarting
# every few seconds for ever; an unreachable registry exits 1 and is restarted.
PERMANENT_FAILURE = 78  # EX_CONFIG
PERMANENT_ERRORS = (InvalidReferenceError, AuthenticationError, NotAModelError, ManifestError, NotFoundError, TLSError,
                    ConfigError, UnsafePathError, SignatureError, InvalidPattern)


def report_errors(run: Callable[[], int], permanent_status: int = 1, command: str | None = None,
                  target: str | None = None) -> int:
    """Run a command; an error the user can act on becomes one line on stderr and exit 1
    (``permanent_status`` for one that trying again cannot cure); Ctrl-C or SIGTERM, one line
    naming ``command`` of ``target`` and what it left (:mod:`modelfs.commands.stops`)."""
    try:
        return run()
    except (ModelfsError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None:
            return stopped(command, target)
        error = user_error(exc)
        if error is None:
            raise
        print(f"modelfs: error: {error}", file=sys.stderr)
        return permanent_status if isinstance(error, PERMANENT_ERRORS) else 1
    except KeyboardInterrupt:
        return stopped(command, target)
    except BrokenPipeError:  # `modelfs cache stats | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
