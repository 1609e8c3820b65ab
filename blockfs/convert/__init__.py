"""Image conversion: rebuild an image's layers as eStargz and store it in a layout or a
registry, so that blockfs can mount it lazily.
"""

from blockfs.convert._convert import (
    ConvertOptions,
    ConvertResult,
    LayerConversion,
    convert_image,
    converted_annotations,
)
from blockfs.convert._errors import ConvertError
from blockfs.convert._locations import (
    ImageLocation,
    LayoutLocation,
    RegistryLocation,
    ResolvedImage,
    Transfer,
    open_location,
    resolve_image,
)
from blockfs.convert._optimize import rewrite_with_profile
from blockfs.convert._profile import (
    LayerProfile,
    Profile,
    ProfileError,
    profile_from_traces,
    read_trace,
)
from blockfs.convert._progress import Progress, ProgressTask, SilentProgress

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "ImageLocation",
    "LayerConversion",
    "LayerProfile",
    "LayoutLocation",
    "Profile",
    "ProfileError",
    "Progress",
    "ProgressTask",
    "RegistryLocation",
    "ResolvedImage",
    "SilentProgress",
    "Transfer",
    "convert_image",
    "converted_annotations",
    "open_location",
    "profile_from_traces",
    "read_trace",
    "resolve_image",
    "rewrite_with_profile",
]
