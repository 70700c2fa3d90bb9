"""Image-text matching pairs and per-image caption groups for retrieval. Torch-free.

Pairs are deterministic for a seed: inputs are sorted first and all choices come from one
`random.Random(seed)`, so a validation set is the same on every run and machine.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from edgemm.data.records import Record
from edgemm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Attempts at drawing a random caption of another image before scanning all captions in order.
_RANDOM_DRAW_ATTEMPTS = 64


def normalize_text(text: str) -> str:
    """Return the lower-case text with single spaces and no final period, for comparing captions."""
    return " ".join(text.lower().split()).rstrip(" .")


def _sort_key(record: Record) -> tuple[str, str, str, int]:
    return (str(record.image), record.text, record.split or "", -1 if record.label is None else record.label)


def group_by_image(records: Iterable[Record]) -> dict[Path, list[str]]:
    """Map each image to its true captions, for retrieval evaluation.

    Records labelled 0 (mismatches) are left out. Images appear in sorted path order and each
    image's captions in input order.
    """
    groups: dict[Path, list[str]] = {}
    for record in records:
        if record.label == 0:
            continue
        groups.setdefault(record.image, []).append(record.text)
    return {image: groups[image] for image in sorted(groups, key=str)}


def make_matching_pairs(
    records: Iterable[Record],
    *,
    seed: int = 0,
    negatives_per_positive: int = 1,
    hard_negative_fraction: float = 0.5,
    is_false: Callable[[Sequence[str], str], bool] | None = None,
) -> list[Record]:
    """Build labelled pairs: each caption with its own image (label 1) and mismatched captions (label 0).

    A negative for an image is a caption of another image in the same split, or one of the
    record's own hard negatives (`record.negatives`). Hard negatives fill `hard_negative_fraction`
    of the negative slots they can fill (at most `len(record.negatives)` per record). A negative never equals a caption of the same image
    (compared by image path and by lower-cased text). `is_false(own_captions, candidate)` can
    reject more candidates: a caption of another image may describe this one too. When every
    text is a synthetic scene caption and `is_false` is None, `synthetic.is_false_for` is used.
    Output order: each positive followed by its negatives, positives in sorted (image, text) order.
    Raises `DataError` when there are labelled mismatches in the input or fewer than two images,
    and `ConfigError` for invalid options.
    """
    if negatives_per_positive < 1:
        raise ConfigError(
            f"negatives_per_positive must be at least 1, got {negatives_per_positive}.",
            "Use 1 for balanced pairs.",
        )
    if not 0.0 <= hard_negative_fraction <= 1.0:
        raise ConfigError(
            f"hard_negative_fraction must be between 0 and 1, got {hard_negative_fraction}.",
            "Use 0 for captions of other images only, 1 for hard negatives whenever a record has them.",
        )

    positives = sorted(records, key=_sort_key)
    if any(record.label == 0 for record in positives):
        raise DataError(
            "The records already contain mismatched pairs (label 0).",
            "Build pairs from captions only: pass records without labels or with label 1.",
        )
    if len({record.image for record in positives}) < 2:
        raise DataError(
            f"Matching pairs need captions of at least two images; got {len(positives)} records of one image.",
            "Add captions of other images.",
        )

    if is_false is None:
        from edgemm.data import synthetic

        if all(synthetic.is_synthetic_caption(record.text) for record in positives):
            is_false = synthetic.is_false_for

    rng = random.Random(seed)
    own_captions = _own_captions(positives)
    own_texts = _own_texts(positives) if is_false is not None else {}

    def acceptable(record: Record, text: str) -> bool:
        return is_false is None or is_false(own_texts[record.image], text)

    pools = _negative_pools(positives)
    usable_hard = [_usable_hard_negatives(record, own_captions, acceptable) for record in positives]

    # Decide up front which negative slots use a hard negative, so the fraction is exact.
    hard_slots = [
        (index, slot)
        for index, choices in enumerate(usable_hard)
        for slot in range(min(negatives_per_positive, len(choices)))
    ]
    chosen_hard = set(rng.sample(hard_slots, round(hard_negative_fraction * len(hard_slots))))

    pairs: list[Record] = []
    for index, record in enumerate(positives):
        pairs.append(replace(record, label=1))
        own = own_captions[record.image]
        hard_choices = list(usable_hard[index])
        rng.shuffle(hard_choices)
        used: set[str] = set()
        for slot in range(negatives_per_positive):
            text = None
            if (index, slot) in chosen_hard:
                # Skip hard negatives that an earlier slot already drew as another image's caption.
                while hard_choices and text is None:
                    candidate = hard_choices.pop()
                    text = None if normalize_text(candidate) in used else candidate
            if text is None:
                text = _draw_other_caption(record, pools[record.split], own, used, rng, acceptable)
            used.add(normalize_text(text))
            pairs.append(Record(image=record.image, text=text, label=0, split=record.split))

    logger.debug(
        "Built %d matching pairs from %d captions (%d hard negatives, seed %d)",
        len(pairs), len(positives), len(chosen_hard), seed,
    )
    return pairs


def _own_captions(records: list[Record]) -> dict[Path, set[str]]:
    own: dict[Path, set[str]] = {}
    for record in records:
        own.setdefault(record.image, set()).add(normalize_text(record.text))
    return own


def _own_texts(records: list[Record]) -> dict[Path, list[str]]:
    texts: dict[Path, list[str]] = {}
    for record in records:
        texts.setdefault(record.image, []).append(record.text)
    return texts


def _usable_hard_negatives(
    record: Record, own_captions: dict[Path, set[str]], acceptable: Callable[[Record, str], bool]
) -> list[str]:
    own = own_captions[record.image]
    return [
        text for text in dict.fromkeys(record.negatives) if normalize_text(text) not in own and acceptable(record, text)
    ]


def _negative_pools(records: list[Record]) -> dict[str | None, list[Record]]:
    """Return, per split, the records whose captions may serve as negatives.

    A split with captions of a single image borrows from all records, so it still gets negatives.
    """
    by_split: dict[str | None, list[Record]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    pools = {}
    for split, members in by_split.items():
        if len({record.image for record in members}) >= 2:
            pools[split] = members
        else:
            logger.warning("Split %r has captions of one image only; drawing its negatives from all splits", split)
            pools[split] = records
    return pools


def _draw_other_caption(
    record: Record,
    pool: list[Record],
    own: set[str],
    used: set[str],
    rng: random.Random,
    acceptable: Callable[[Record, str], bool],
) -> str:
    """Pick a random caption of another image that is not one of this image's captions."""

    def fits(candidate: Record) -> bool:
        key = normalize_text(candidate.text)
        return (
            candidate.image != record.image
            and key not in own
            and key not in used
            and acceptable(record, candidate.text)
        )

    for _ in range(_RANDOM_DRAW_ATTEMPTS):
        candidate = pool[rng.randrange(len(pool))]
        if fits(candidate):
            return candidate.text

    # Rare: most of the pool describes this image. Scan from a random start instead.
    start = rng.randrange(len(pool))
    for offset in range(len(pool)):
        candidate = pool[(start + offset) % len(pool)]
        if fits(candidate):
            return candidate.text
    raise DataError(
        f"No caption of another image differs from the captions of {record.image}.",
        "Add captions of other images or lower negatives_per_positive.",
    )
