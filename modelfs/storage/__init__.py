"""The block cache on disk: blobs' blocks, checked where they land and re-checked where they rest."""
