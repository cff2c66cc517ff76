"""The mount's data path: the file tree from the manifest, the fetcher and its workers, the
block cache, the FUSE filesystem and the daemon that serves it.

The data path's modules, in the order a read meets them (:mod:`.fetcher` draws the graph):

- :mod:`.fs` (FUSE) -> :mod:`.blobreader`, made of :mod:`.blob`, :mod:`.flights`,
  :mod:`.passes`, :mod:`.wholecheck` and :mod:`.readersink`;
- the sources, behind :mod:`.sink`: :mod:`.rangesource` (:mod:`.rangeruns`,
  :mod:`.wholepass`) over :mod:`.transfers` (request slots: :mod:`.slots`); :mod:`.layerstream`
  (:mod:`.stream`, :mod:`.layerpeers`);
- ahead of readers: :mod:`.metadata` (headers first), then :mod:`.prefetch`;
- what they share: :mod:`.context`, :mod:`.policy`, :mod:`.trust`, :mod:`.readahead`,
  :mod:`.recent`, :mod:`.buffers`, :mod:`.stats`; where blocks rest: :mod:`.cache`,
  :mod:`.window`, :mod:`.claims`.
"""
