"""zstd for tar+zstd layers: the standard library's ``compression.zstd`` (Python 3.14+), or
its backport on older Pythons.

Chosen over the ``zstandard`` package because its decompressor takes ``max_length``: a few
KiB of hostile zstd expand to gigabytes in a single call otherwise, and the daemon must
bound what one step of a layer stream can allocate.
"""

try:
    from compression.zstd import ZstdCompressor, ZstdDecompressor, ZstdError, ZstdFile, compress
except ImportError:  # Python < 3.14
    from backports.zstd import ZstdCompressor, ZstdDecompressor, ZstdError, ZstdFile, compress

__all__ = ["ZstdCompressor", "ZstdDecompressor", "ZstdError", "ZstdFile", "compress"]
