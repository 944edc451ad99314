"""The data layer: sources (synthetic, COCO, mask folders; local or S3), manifest, schema, quarantine.

Public helpers other stages build on (see docs/CONTRACTS.md):
`load_manifest(path)`, `decode_mask(rle_counts, height, width)`, `read_image(uri)`.
"""

from cpcsam.data.manifest import MANIFEST_COLUMNS, load_classes, load_manifest
from cpcsam.data.masks import decode_mask, encode_mask
from cpcsam.data.storage import read_image

__all__ = ["MANIFEST_COLUMNS", "decode_mask", "encode_mask", "load_classes", "load_manifest", "read_image"]
