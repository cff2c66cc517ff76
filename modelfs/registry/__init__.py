"""OCI distribution client on trio + httpx."""

from ..retry import RetryPolicy
from .client import RegistryClient
from .protocol import RegistryReader
from .session import tune_httpcore

__all__ = ["RegistryClient", "RegistryReader", "RetryPolicy", "tune_httpcore"]
