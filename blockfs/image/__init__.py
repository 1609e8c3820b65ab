"""A layer's block image: EROFS metadata from the TOC plus lazily fetched, verified file data."""

from blockfs.image._control import (
    ControlError,
    ControlServer,
    fetch_ahead,
    forget_export,
    open_export,
    preload_export,
    query_stats,
)
from blockfs.image._elf import LoaderNeeds
from blockfs.image._exports import ExportTable, SourceOpener
from blockfs.image._extents import ExtentMap, ExtentMapError
from blockfs.image._layer import (
    MAX_FETCH_ATTEMPTS,
    PREFETCH_BATCH,
    ChunkReader,
    FetchPolicy,
    ImageReadError,
    LayerImage,
    LayerStats,
)
from blockfs.image._reader import BlobChunkReader
from blockfs.image._record import (
    EXTENTS_FILE,
    INDEX_FILE,
    LAYER_JSON,
    LayerRecord,
    LayerStateError,
    check_export_name,
    index_layer,
)
from blockfs.image._server import ServedLayers, ServerConfig, ServerConfigError, parse_size
from blockfs.image._sources import (
    BlobSourceError,
    BlobSources,
    SourceSpec,
    blob_source_spec,
    docker_config_path,
    file_source_spec,
    open_blob,
    registry_source_spec,
)
from blockfs.image._stack import (
    FoundFile,
    find_arguments,
    find_commands,
    find_file,
    find_loaded,
)

__all__ = [
    "EXTENTS_FILE",
    "INDEX_FILE",
    "LAYER_JSON",
    "MAX_FETCH_ATTEMPTS",
    "PREFETCH_BATCH",
    "BlobChunkReader",
    "BlobSourceError",
    "BlobSources",
    "ChunkReader",
    "ControlError",
    "ControlServer",
    "ExportTable",
    "ExtentMap",
    "ExtentMapError",
    "FetchPolicy",
    "FoundFile",
    "ImageReadError",
    "LayerImage",
    "LayerRecord",
    "LayerStateError",
    "LayerStats",
    "LoaderNeeds",
    "ServedLayers",
    "ServerConfig",
    "ServerConfigError",
    "SourceOpener",
    "SourceSpec",
    "blob_source_spec",
    "check_export_name",
    "docker_config_path",
    "fetch_ahead",
    "file_source_spec",
    "find_arguments",
    "find_commands",
    "find_file",
    "find_loaded",
    "forget_export",
    "index_layer",
    "open_blob",
    "open_export",
    "parse_size",
    "preload_export",
    "query_stats",
    "registry_source_spec",
]
