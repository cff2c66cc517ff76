"""The mount's data path: the file tree from the manifest, the fetcher and its workers, the
FUSE filesystem and the daemon that serves it. The block cache it fills is
:mod:`modelfs.storage`."""
