"""OCI distribution client on trio + httpx."""

from .client import RegistryClient, RetryPolicy, brief_retries, single_attempt, tune_httpcore
from .protocol import RegistryReader

__all__ = ["RegistryClient", "RegistryReader", "RetryPolicy", "brief_retries", "single_attempt", "tune_httpcore"]
