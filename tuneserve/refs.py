"""Model and dataset references: a local path or a Hub id. The one place that decides which a string is."""

from __future__ import annotations

import os

TEXT_EXTENSIONS = (".jsonl", ".json", ".csv")
DATA_EXTENSIONS = TEXT_EXTENSIONS + (".parquet",)
COMPRESSIONS = (".gz", ".bz2", ".xz")  # what `datasets` decompresses and the data checks read
DATA_FILE_SUFFIXES = DATA_EXTENSIONS + tuple(e + c for e in TEXT_EXTENSIONS for c in COMPRESSIONS)


def data_extension(name: str) -> str | None:
    """The data format of a file name, its compression aside: 'train.jsonl.gz' -> '.jsonl'."""
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return next((e for e in DATA_EXTENSIONS if name.endswith(e)), None)


def looks_local(ref: str) -> bool:
    """A model or dataset reference meant as a local path rather than a Hub id (`org/name`)."""
    return (
        ref.startswith(("/", "./", "../", "~"))
        or ref.endswith(DATA_FILE_SUFFIXES)
        or os.path.exists(ref)
        or ref.count("/") > 1
    )


def hub_id(ref: str | None) -> str | None:
    """`ref` when it names a Hub repository (`org/name`), else None."""
    return ref if ref and "/" in ref and not looks_local(ref) else None
