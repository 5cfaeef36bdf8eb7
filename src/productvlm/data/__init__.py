"""Catalog data: synthetic catalogs, importing real ones, the dataset folder format, and stats.

Kept import-light: the heavy pieces (aiohttp, matplotlib, datasets) load only in the verbs that use them.
"""

from productvlm.data.folder import CATALOG_COLUMNS, SPLITS, read_split

__all__ = ["CATALOG_COLUMNS", "SPLITS", "read_split"]
