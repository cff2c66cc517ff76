"""In-process fakes of the data path's outside world, for tests that run in milliseconds.

- :mod:`.registry`: :class:`~.registry.FakeRegistry`, blobs and manifests in memory behind the
  same interfaces the registry client offers (the control plane, blob locations, ranged
  reads), answering ranges as HTTP would, through the same body checks.
- :mod:`.faults`: :class:`~.faults.FailingRegistry`, a failure layer around it: fail the n-th
  range, stall, cut a body after k blocks, flip a byte, answer 200 to a ``Range`` or 206 for
  other bytes than asked, with counters of what it did.

Nothing here is used by modelfs itself; it sits in the package so the type checker holds the
fakes to the interfaces they stand in for.
"""
