"""How often and how long modelfs tries again, declared in one place.

- :class:`RetryPolicy`: the policy of one client, passed in where the client is built (by
  the command: a mount daemon waits for its registry to come back; a command run by hand
  gives up at once on a host that refuses connections or does not resolve, ``fail_fast``).
- A request may be given a tighter policy by its caller (``retry=``), never a looser one:
  :data:`ONE_ATTEMPT` where the caller's own loop retries (the data path: a struggling
  registry sees one policy's attempts, not the product of two), :data:`BRIEF_RETRY` for data
  the caller copes without (the block index), :data:`FAIL_FAST` where a recorded copy can
  stand in for an unreachable registry.
- The rounds: how many times a loop of the data path goes round again, each bounded by what
  it waits for (a count, not a time; time is the policy's and the timeouts').
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0
    # seconds for all of one request: connect, auth (the token fetch), headers, a body read
    # whole, every retry. A cancel scope, not a socket timeout: a server answering a byte at a
    # time never trips a read timeout, and held a mount's request slots for as long as it went on.
    deadline: float = 60.0
    # a registry that refuses connections, or a host name that does not resolve, is said at once
    # (retrying those for a minute only hides a typo); slow or failing answers are still retried
    fail_fast: bool = False

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay * 4)
        backoff = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return backoff * (0.5 + random.random() / 2)

    def within(self, limit: RetryPolicy | None) -> RetryPolicy:
        """This policy, tightened by ``limit`` (fewer attempts, shorter delays and deadline,
        failing fast if either does); itself without one."""
        if limit is None:
            return self
        return RetryPolicy(min(self.attempts, limit.attempts), min(self.base_delay, limit.base_delay),
                           min(self.max_delay, limit.max_delay), min(self.deadline, limit.deadline),
                           self.fail_fast or limit.fail_fast)


_NO_LIMIT = RetryPolicy(attempts=sys.maxsize, base_delay=math.inf, max_delay=math.inf, deadline=math.inf)

ONE_ATTEMPT = dataclasses.replace(_NO_LIMIT, attempts=1)
BRIEF_RETRY = RetryPolicy(attempts=2, base_delay=0.1, max_delay=0.2, deadline=10.0)
FAIL_FAST = dataclasses.replace(_NO_LIMIT, fail_fast=True)
# A mirror is one source of several: a failing one is left out a while (PENALTY_SECONDS, in
# mirrors.py) rather than waited on, the next source is asked instead.
MIRROR_RETRY = RetryPolicy(attempts=2, base_delay=0.1, max_delay=0.5, deadline=10.0)

# -- rounds of the registry client ---------------------------------------------------------

# Redirects one control-plane request follows (registry -> CDN -> storage is two).
REQUEST_REDIRECTS = 6
# A small blob read whole (config, index) whose bytes do not match its digest or whose
# connection dropped is fetched again, this many times in all, within the policy's deadline.
SMALL_BLOB_ATTEMPTS = 3

# -- rounds of the data path --------------------------------------------------------------

# A read: a block held only in memory (full disk) may be dropped before it is read, and a
# cached block may not read back (damaged, cut short): either way it is fetched again, this
# many times before the read fails with EIO.
SERVE_ROUNDS = 6
# A reader of a blob served only once checked whole waits for at most this many passes
# (each ends checked, failed, or with its blocks dropped before they could be served).
PASS_WAIT_ROUNDS = 3
# ``pull``: read every block back, fetch what is missing, check the blob; this many times.
SETTLE_ROUNDS = 3
# Whole passes over a blob whose digest does not match before its reads fail (bytes flipped
# on the way are fetched again; a blob that is wrong at its source stays wrong).
WHOLE_ROUNDS = 3
# Passes started again because the blob's cache files were replaced under the check
# (``cache prune`` by another process), before the readers waiting on them fail: one prune
# costs one more pass; files replaced again and again mean something keeps clearing them.
REPLACED_ROUNDS = 3
# Redirects followed for one range.
RANGE_REDIRECTS = 5
