"""Pair manifests: the parquet schema, its validation and loading, and builders (ScanNet layout, image
folders, synthetic RGB-D demo scenes)."""
