"""Defaults that the library and the ``blockfs`` command share, in a module light enough
for the command's start."""

# The chunk size of the images blockfs makes (`image convert`, `image optimize`,
# `layer build`). A read waits for its whole chunk to arrive and verify, so the chunk is
# the least a page fault costs: at 1 MiB (about 0.4 MB compressed) that is about 1.6
# times the bandwidth-delay product of a 100 Mbit/s, 20 ms link, against 6 times for the
# 4 MiB of the reference builder (blockfs.estargz.BuildOptions keeps that default). The
# blob grows by under 0.1%: a gzip member restarts with an empty 32 KiB window.
CHUNK_SIZE = 1 << 20
