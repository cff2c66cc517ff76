"""Every bound on how often the data path tries something again, named once.

Each is a count of rounds of one loop, not a time: time is bounded by the policy (the retry
policy's attempts and backoff, the read deadline, the stall window; see ``settings.py``).
"""

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
# (``cache prune`` by another process), before the readers waiting on them fail.
REPLACED_ROUNDS = 3
# Redirects followed for one range (registry -> CDN -> storage is two).
MAX_REDIRECTS = 5
