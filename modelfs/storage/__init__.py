"""The block cache on disk, shared by every mount of a host and by ``pull``: each blob's
blocks checked where they land and re-checked where they rest.

A read the kernel cannot serve from its pages meets the modules in this order:
:mod:`.cache` hands out the blob's entry (one per blob, within a budget of open files);
:mod:`.entry` decides what of it may be served: the block's checksum, its trust (checked whole
with its blob, or matched against a block index), and :mod:`.window`, the blocks lately read
back and checked, kept in memory. :mod:`.store` is what the entry asks of the place where
blocks rest: :mod:`.disk`, the blob's files (:mod:`.files`: opened, locked, replaced, never
emptied in place), or :mod:`.memory` when those cannot be set up; :mod:`.mapformat` is the
map's bytes and the lz4 policy. A block that is not there is fetched by the mount:
:mod:`.claims` says whether another process is fetching it already, and :mod:`.direct` gives
the aligned buffer it lands in, written to disk with O_DIRECT.

Beside the blocks: :mod:`.records`, what makes up each model (``cache stats``, offline
mounts), and :func:`.cache.prune`, the one eviction of ``cache prune`` and of a mount's size
limit. Nothing here imports the mount, the registry or the CLI.
"""
