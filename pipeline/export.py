"""`geod export-targets`: the command's body, so that the command line only parses and calls this."""

from __future__ import annotations

from pathlib import Path

from geod.pipeline.errors import ConfigError
from geod.pipeline.export_common import ExportSummary

EXPORT_FORMATS = ("webdataset", "hdf5")


def export_command(dataset: str, out: str | Path, fmt: str, *, split: str | None = None,
                   include_failed: bool = False, samples_per_tar: int | None = None,
                   compression: str | None = None, overwrite: bool = False, progress: bool = True
                   ) -> ExportSummary:
    """Export `dataset` to `out` in format `fmt` ("webdataset": `out` is a directory of tars; "hdf5": `out`
    is the file). `samples_per_tar` (default 1000) applies to webdataset only; `compression` ("gzip", the
    default, "lzf" or "none") to hdf5 only. An option given to the other format is a ConfigError, not
    silently ignored."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "webdataset":
        from geod.pipeline.export_webdataset import DEFAULT_SAMPLES_PER_TAR, export_webdataset

        if compression is not None:
            raise ConfigError("--compression applies to hdf5 exports only (webdataset tars are not compressed)")
        per_tar = DEFAULT_SAMPLES_PER_TAR if samples_per_tar is None else samples_per_tar
        return export_webdataset(dataset, out, samples_per_tar=per_tar, split=split,
                                 include_failed=include_failed, overwrite=overwrite, progress=progress)
    from geod.pipeline.export_hdf5 import export_hdf5

    if samples_per_tar is not None:
        raise ConfigError("--samples-per-tar applies to webdataset exports only")
    if compression is None:
        compression = "gzip"
    elif compression.lower() == "none":
        compression = None
    return export_hdf5(dataset, out, split=split, include_failed=include_failed, compression=compression,
                       overwrite=overwrite, progress=progress)
