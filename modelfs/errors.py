"""One small exception hierarchy.

Every error a user can meet derives from :class:`ModelfsError`; its ``str()`` is a single
line that says what happened and what to do, and the CLI prints exactly that (no traceback).

Each class declares whether another attempt may cure it (``retryable``): bytes damaged on
the way, a registry that did not answer, a connection lost, a fetch that stalled may; a
refusal, a missing blob, a TLS or disk problem, a malformed manifest may not. The data path
retries by that declaration (:mod:`modelfs.mount.context`), never by an "everything but" list.
"""

from typing import TYPE_CHECKING, ClassVar


class ModelfsError(Exception):
    """Root of every error modelfs reports to a user."""

    retryable: ClassVar[bool] = False  # another attempt may cure it (see the module docstring)
    retry_after: float | None = None  # seconds the server asked to wait before that attempt


class InvalidReferenceError(ModelfsError):
    """A model reference (``host/repo:tag@digest``) could not be parsed."""


class ModelfileError(ModelfsError):
    """A Modelfile is malformed; the message names the line."""


class NotAModelError(ModelfsError):
    """The manifest is valid OCI but not a ModelPack model (e.g. a container image)."""


class ManifestError(ModelfsError):
    """A manifest or config is malformed or lies about sizes/digests."""


class DamagedStreamError(ManifestError):
    """A compressed layer's body does not decompress, or ends early: damaged or cut on the way
    as likely as malformed at its source (the layer digest, checked at its end, decides)."""

    retryable = True


class UnsafePathError(ModelfsError):
    """A layer or tar member would escape the model tree (``..``, absolute, links out)."""


class InvalidPattern(ModelfsError):
    """An ``--include`` / ``--exclude`` pattern that is no gitignore line, or a view that keeps
    no file of the model (modelfs/formats/view.py)."""


class IntegrityError(ModelfsError):
    """Bytes do not match the digest that names them."""

    retryable = True  # damaged on the way: fetched again (from the registry itself, if a mirror sent them)


class RegistryError(ModelfsError):
    """The registry answered with an error or could not be reached."""


class UnavailableError(RegistryError):
    """The registry could not be reached, or kept failing (5xx, 429), after every retry."""

    retryable = True  # the client's own attempts are over; the data path's loop may try again later


class ConnectionLostError(UnavailableError):
    """The connection dropped in the middle of a body (reset, short read); worth a retry."""


class FetchError(RegistryError):
    """Bytes could not be fetched; the read that needed them fails (EIO)."""

    retryable = True  # a stalled stream, a cached copy that did not read back: the next pass may get them


class AuthenticationError(RegistryError):
    """The registry refused our credentials (or we had none and it wants some)."""


class NotFoundError(RegistryError):
    """The registry has no such repository, tag or blob."""


class TLSError(RegistryError):
    """TLS verification failed."""


class SignatureError(ModelfsError):
    """The publisher's signatures do not meet the signature policy (see modelfs/signing/)."""


class CacheError(ModelfsError):
    """The local block cache cannot be used (full disk, permissions, corruption)."""


class MountError(ModelfsError):
    """Mounting or unmounting failed."""


def user_error(exc: BaseException) -> ModelfsError | None:
    """The ModelfsError behind ``exc``, looking inside trio's exception groups.

    Concurrent work (parallel uploads, prefetch) fails as an ExceptionGroup; the user still
    deserves the one line that says what went wrong.
    """
    if isinstance(exc, ModelfsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error(inner)
            if found is not None:
                return found
    return None


def error_named(name: str) -> type[ModelfsError]:
    """The error class called ``name`` (a mount daemon reports its failure by class name to the
    process waiting for it, which raises the same kind); ModelfsError for a name not known."""
    pending: list[type[ModelfsError]] = [ModelfsError]
    while pending:
        kind = pending.pop()
        if kind.__name__ == name:
            return kind
        pending.extend(kind.__subclasses__())
    return ModelfsError


def ready_failure(exc: BaseException) -> str:
    """The line a mount daemon writes to its ready pipe when it fails: ``ERROR Kind: message``."""
    error = user_error(exc)
    if error is None:
        return f"ERROR ModelfsError: unexpected {type(exc).__name__}: {exc}"
    return f"ERROR {type(error).__name__}: {error}"


def parse_ready_failure(line: str) -> ModelfsError:
    """The error a ``ready_failure`` line reports, of the same class where it is known."""
    kind, _, message = line.removeprefix("ERROR ").partition(": ")
    if not message or not kind.isidentifier():
        return MountError(line.removeprefix("ERROR "))
    return error_named(kind)(message)


def permanent(exc: BaseException) -> bool:
    """An error no other attempt cures, as its class declares. Anything else is worth another
    attempt while the retry policy allows: the OS's and the network's errors, and whatever
    killed a worker (a bug included: the next attempt replaces it)."""
    return isinstance(exc, ModelfsError) and not exc.retryable


# Errors that say what went wrong: ours, the OS's, and httpx's (the control plane and
# compressed-layer streams run on it). Logged in one line; anything else is a bug, logged with
# its traceback. Made on first use: every command imports this module, and importing httpx for
# it cost `modelfs --help` about 75 ms.
if TYPE_CHECKING:
    EXPECTED: tuple[type[BaseException], ...]
else:
    def __getattr__(name: str) -> object:
        if name == "EXPECTED":
            import httpx

            return (httpx.HTTPError, ModelfsError, OSError)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
