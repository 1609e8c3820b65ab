"""EROFS images from eStargz TOCs: the metadata region written on the node, and the map of
where each file's data sits in the image's (virtual) data region.

This package encodes EROFS (superblock, inodes, dirents, xattrs) and lays a TOC out; it
knows nothing of eStargz compression or networks.
"""

from blockfs.erofs._errors import ErofsLayoutError
from blockfs.erofs._format import BLOCK_SIZE
from blockfs.erofs._layout import ErofsIndex, Extent, build_index

__all__ = [
    "BLOCK_SIZE",
    "ErofsIndex",
    "ErofsLayoutError",
    "Extent",
    "build_index",
]
