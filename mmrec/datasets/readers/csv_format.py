"""Comma-separated files: the canonical layout with ``.csv`` instead of ``.tsv``.

What most exports look like (a database dump, a spreadsheet, ``pandas.to_csv``):
``interactions.csv`` (``user``, ``item``; optional ``behavior``, ``timestamp``,
``rating``, ``scenario``, ``label``), optional ``test.csv`` / ``valid.csv``, ``items.csv``
(``item``, text columns, ``image`` / ``audio`` paths; standard CSV quoting), ``exposures.csv``,
``dataset.yaml`` and ``features/``. Every rule of the canonical reader holds (ids are
strings, behaviors, cold items, media, errors naming file, line and field);
``mmrec data convert DIR --out CANONICAL`` writes the tab-separated directory.
"""

from __future__ import annotations

from pathlib import Path

from mmrec.datasets.canonical import read_layout
from mmrec.datasets.readers import register_reader
from mmrec.datasets.schema import Dataset


def _detect(path: Path) -> bool:
    return (path / "interactions.csv").is_file()


@register_reader("csv", detect=_detect, priority=5,
                 looks_for="interactions.csv (plus optional test.csv, valid.csv, items.csv, dataset.yaml, features/)")
def read_csv_dir(path: str | Path, *, on_unseen: str = "drop", verify_media: bool = False,
                 text_columns: list[str] | None = None) -> Dataset:
    """Read a directory of comma-separated files laid out as the canonical directory."""
    return read_layout(path, ".csv", on_unseen=on_unseen, verify_media=verify_media, text_columns=text_columns)


__all__ = ["read_csv_dir"]
