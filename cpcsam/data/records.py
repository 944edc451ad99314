"""Records a source yields, and the quarantine that collects what it refuses."""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Protocol

# Reasons an item is quarantined: the keys of the summary's per-reason counts.
REASONS = (
    "unreadable_image",
    "truncated_image",
    "image_too_large",
    "image_size_mismatch",
    "missing_image",
    "path_escapes_root",
    "mask_size_mismatch",
    "invalid_segmentation",
    "empty_mask",
    "bbox_outside_image",
    "unknown_class",
    "conflicting_id",  # one id, different contents: every party is quarantined, nothing is guessed
)

# Reasons of a note: something repaired without losing anything (not counted as quarantined).
NOTE_REASONS = ("duplicate_id",)  # one id listed again with the very same content: read once


@dataclasses.dataclass(frozen=True)
class EntityRecord:
    """One entity of an image: its class and mask (compressed RLE of the image's size)."""

    entity_id: str
    class_name: str
    rle_counts: str
    bbox: tuple[float, float, float, float]  # tight xywh from the mask
    area: int


@dataclasses.dataclass
class ImageRecord:
    """One usable image and its usable entities."""

    image_id: str
    image_uri: str
    width: int
    height: int
    group_id: str
    entities: list[EntityRecord] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class QuarantineItem:
    file: str  # the image or annotation file concerned
    reason: str  # one of REASONS
    detail: str  # what exactly is wrong
    kind: str  # "image" (the image and all its annotations dropped) or "annotation"
    item_id: str = ""  # image id / annotation id when known
    dropped_annotations: int = 0  # annotations that went with a quarantined image


@dataclasses.dataclass(frozen=True)
class QuarantineNote:
    """Something the source repaired without losing data (e.g. an exact duplicate read once)."""

    file: str
    reason: str  # one of NOTE_REASONS
    detail: str
    kind: str
    item_id: str = ""


class Quarantine:
    """Collects refused items; counts every item seen so the quarantined fraction is exact.

    `notes` list what was repaired without loss; they do not count towards the fraction.
    """

    def __init__(self) -> None:
        self.items: list[QuarantineItem] = []
        self.notes: list[QuarantineNote] = []
        self.seen = collections.Counter()  # kind -> number of items examined

    def saw(self, kind: str, n: int = 1) -> None:
        self.seen[kind] += n

    def add(self, file: str, reason: str, detail: str, kind: str, item_id: str = "", dropped_annotations: int = 0) -> None:
        assert reason in REASONS, reason
        self.items.append(QuarantineItem(str(file), reason, detail, kind, str(item_id), int(dropped_annotations)))

    def note(self, file: str, reason: str, detail: str, kind: str, item_id: str = "") -> None:
        assert reason in NOTE_REASONS, reason
        self.notes.append(QuarantineNote(str(file), reason, detail, kind, str(item_id)))

    def counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(i.reason for i in self.items).items()))

    def note_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(n.reason for n in self.notes).items()))

    def fraction(self) -> float:
        """Items lost / items examined, items = images + annotations.

        An annotation dropped because its image was quarantined counts as lost too.
        """
        total = sum(self.seen.values())
        lost = len(self.items) + sum(i.dropped_annotations for i in self.items)
        return min(1.0, lost / total) if total else 0.0

    def to_json(self) -> dict:
        return {
            "n_quarantined": len(self.items),
            "n_examined": dict(self.seen),
            "fraction": round(self.fraction(), 6),
            "counts_by_reason": self.counts(),
            "items": [dataclasses.asdict(i) for i in self.items],
            "n_notes": len(self.notes),
            "notes": [dataclasses.asdict(n) for n in self.notes],
        }


class DataSource(Protocol):
    """A data source: yields usable images with their entities, quarantining the rest.

    `classes` is the source's class list (order = class id), known before iteration.
    Sources never modify the raw data.
    """

    name: str

    def classes(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]: ...
