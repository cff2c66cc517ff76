"""OCI distribution client on trio + httpx."""

from ..retry import RetryPolicy
from .client import RegistryClient, tune_httpcore
from .protocol import RegistryReader

__all__ = ["RegistryClient", "RegistryReader", "RetryPolicy", "tune_httpcore"]
