"""OCI distribution client on trio + httpx."""

from .client import RegistryClient, RetryPolicy, tune_httpcore

__all__ = ["RegistryClient", "RetryPolicy", "tune_httpcore"]
