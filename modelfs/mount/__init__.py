"""The mount's data path: the file tree from the manifest, the fetcher and its workers, the
block cache, the FUSE filesystem and the daemon that serves it."""
