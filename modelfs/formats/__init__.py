"""The formats a model is made of, pure: parsed, checked and written without the network, the
cache or the mount, so the artifact commands, ``resolve`` and the mount all share them.

The modules follow a request's path: :mod:`.spec` parses the manifest and config a reference
resolves to (ModelPack media types, layers, file annotations); :mod:`.blockindex` decodes the
block index its manifest names (a hash per block, so a block read lazily is checked before it
is served; fetched and attached by :mod:`modelfs.index`); :mod:`.tarindex` lists a tar
layer's members from their headers, through a read function it is given; :mod:`.paths` decides
whether each path from the artifact is safe, and :mod:`.tree_check` checks the whole tree across
layers (links, conflicts), the one check the mount and ``extract`` share; :mod:`.zstd` unpacks
tar+zstd layers in bounded steps.

Nothing here imports the registry client, the cache, the mount, the artifact commands,
``resolve`` or the CLI.
"""
