"""The commands behind ``modelfs``, one module per group. :mod:`modelfs.cli` parses the
command line and imports only the module of the command that runs, so ``modelfs --help``,
``--version`` and light commands (``status``, ``ls``) never load the mount's data path, the
registry client or the CSI plugin's gRPC.

- :mod:`.base`: what every command shares (logging, one-line errors and exit statuses,
  settings resolved for a registry);
- :mod:`.output`: the progress bar and label columns;
- :mod:`.store`: ``build``, ``ls``, ``rm``, ``tag`` (the local OCI layout);
- :mod:`.registry`: ``login``, ``logout``, ``push``, ``index attach``;
- :mod:`.models`: ``inspect``, ``pull``, ``extract`` (a model resolved and read);
- :mod:`.signatures`: ``verify``, ``sign`` (a model's signatures, checked or attached);
- :mod:`.cache`: ``cache stats``, ``cache prune``;
- :mod:`.mount`: ``mount`` (and its daemon), ``umount``, ``status``, ``metrics``;
- :mod:`.csi`: ``csi``, the Kubernetes node plugin.

Parts are built by :mod:`modelfs.compose`, from the settings :mod:`.base` resolves.
"""
