"""Counts per split of a dataset, for `edgemm data info` and reports. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from edgemm.data.records import Record


@dataclass
class SplitSummary:
    """Counts of one split (or of the whole dataset, with `split` "all")."""

    split: str
    records: int = 0
    images: int = 0
    matches: int = 0
    mismatches: int = 0
    unlabelled: int = 0
    with_negatives: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(records: Iterable[Record]) -> list[SplitSummary]:
    """Count records, distinct images, labels and hard negatives per split, then for all records.

    Splits appear in sorted order, and records without a split are counted under "(none)".
    Labels other than 0 and 1 count as neither match nor mismatch, so
    `matches + mismatches + unlabelled` can be below `records`.
    """
    groups: dict[str, list[Record]] = {}
    records = list(records)
    for record in records:
        groups.setdefault(record.split if record.split is not None else "(none)", []).append(record)

    summaries = [_count(name, groups[name]) for name in sorted(groups)]
    summaries.append(_count("all", records))
    return summaries


def _count(name: str, records: list[Record]) -> SplitSummary:
    return SplitSummary(
        split=name,
        records=len(records),
        images=len({record.image for record in records}),
        matches=sum(record.label == 1 for record in records),
        mismatches=sum(record.label == 0 for record in records),
        unlabelled=sum(record.label is None for record in records),
        with_negatives=sum(bool(record.negatives) for record in records),
    )
