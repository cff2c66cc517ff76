"""OCI distribution client on trio + httpx."""

from .client import RegistryClient, RetryPolicy, brief_retries, tune_httpcore

__all__ = ["RegistryClient", "RetryPolicy", "brief_retries", "tune_httpcore"]
