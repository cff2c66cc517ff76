"""modelfs: a lazy-loading filesystem for AI models stored as OCI (CNCF ModelPack) artifacts.

The data path reads top to bottom in the package listing:
reference -> registry -> spec -> index -> fetcher -> cache -> fs -> daemon -> cli.
"""

__version__ = "0.1.0"
