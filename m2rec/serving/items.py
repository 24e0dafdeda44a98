"""Items added while serving: placed by their text, recommendable at once, kept for the next retraining.

`ServedCatalog.add` embeds an item's text with the model's own text encoder, stores the item in the event log's
items table (durable before the reply; an id is added once, whichever worker tries) and puts it into the served
catalog: the model's item matrix (the ID embedding the text predicts, `TextToId`, plus the projected text; see
`Recommender.add_items`), the id maps of the model and of the feature build (so events on it reach users' sequences).

Every worker sees every added item: a worker reads the items it has not seen (`seq` greater than the last it
applied, one indexed query) when a request names an item id it does not know, and before ranking at most every
`inference.CATALOG_SYNC_INTERVAL_S`. Items are applied in `seq` order, so every worker serving a model version
gives an added item the same item index.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import BaseModel, Field

from m2rec.data.errors import DataError
from m2rec.events.log import EventLog, ItemConflict, LoggedItem
from m2rec.inference import Recommender, TextUnsupported
from m2rec.serving.schemas import Failure

if TYPE_CHECKING:
    from m2rec.features.store import FeatureClient
    from m2rec.text.embeddings import TextEncoder

log = logging.getLogger(__name__)
MAX_TEXT_LENGTH = 10_000  # characters; the encoder reads its first text.max_length tokens anyway
ItemText = Annotated[str, Field(max_length=MAX_TEXT_LENGTH, description=(
    "The item's text (title, description, ...): what places it among the trained items."))]
ItemTitle = Annotated[str | None, Field(max_length=1000, description="Shown in recommendations; the text if absent.")]


class ItemAdded(BaseModel):
    item_id: str
    title: str
    seq: int = Field(description="The item's position in the event log's items table.")
    item_count: int = Field(description="Items in the served catalog after this one.")
    model_version: str = Field(description="The model version serving when the item was added.")


class ItemResult(BaseModel):
    response: ItemAdded | None = None
    failure: Failure | None = None


class ServedCatalog:
    """The items table of one event log applied to one `Recommender` (and its feature build's id map)."""

    def __init__(self, recommender: Recommender, events: EventLog, features: FeatureClient | None = None):
        self.recommender, self.events, self.features = recommender, events, features
        self.after_seq = 0  # every logged item up to here is in the catalog
        self._encoder: TextEncoder | None = None
        self._embedded: dict[str, np.ndarray] = {}  # texts of this worker's adds, embedded before logging
        recommender.sync_catalog = self.sync

    def _embed(self, texts: list[str]) -> np.ndarray:
        """(N, T) text embeddings from the encoder the model was trained with (loaded on first use, offline)."""
        vectors = {text: self._embedded.pop(text) for text in set(texts) if text in self._embedded}
        todo = sorted(set(texts) - set(vectors))
        if todo:
            if self._encoder is None:
                from m2rec.text.embeddings import TextEncoder, TextEncoderParams

                text_model = self.recommender.text_model
                assert text_model is not None  # callers check the text branch first
                self._encoder = TextEncoder(TextEncoderParams(model=text_model))
            vectors.update(zip(todo, self._encoder.encode(todo, progress=False)))
        return np.stack([vectors[text] for text in texts])

    def sync(self) -> int:
        """Apply the logged items this worker has not seen, in seq order; return how many were new here."""
        logged = self.events.items_after(self.after_seq)
        if not logged:
            return 0
        new = [item for item in logged if item.item_id not in self.recommender.index_of]  # retrained ones known
        if new and self.recommender.text_model is not None:
            indices = self.recommender.add_items([i.item_id for i in new], self._embed([i.text for i in new]),
                                                 [i.title for i in new])
            if self.features is not None:
                self.features.item_index.update({i.item_id: idx for i, idx in zip(new, indices)})
            log.info("catalog: %d added item(s) through seq %d", len(new), logged[-1].seq)
        self.after_seq = logged[-1].seq
        return len(new)

    def add(self, item_id: str, text: str, title: str | None = None) -> LoggedItem:
        """Validate, log (durable) and apply one new item. Raises DataError (its field in the message) or
        `TextUnsupported`/`ItemConflict`."""
        self.recommender.require_text_branch()
        if not text.strip():
            raise DataError("text is empty", "send the item's title or description as `text`")
        self.sync()  # an id another worker added is a conflict too
        if item_id in self.recommender.index_of:
            raise ItemConflict(f"item_id {item_id!r} is in the catalog already", "add each new item once, with a "
                               "new id; events on known items go to /events")
        self._embedded[text] = self._embed([text])[0]  # an encoder failure stops the add before it is logged
        try:
            item = self.events.add_item(item_id, text, title or text)
        finally:
            self.sync()  # applies it (and any added elsewhere meanwhile) in seq order
            self._embedded.pop(text, None)
        return item


def failure_of(err: DataError) -> Failure:
    """The HTTP failure of a refused add: 409 for a duplicate id or a model without text, else 400."""
    if isinstance(err, ItemConflict):
        return Failure(status=409, field="item_id", message=str(err))
    if isinstance(err, TextUnsupported):
        return Failure(status=409, field="text", message=str(err))
    return Failure(status=400, field="text", message=str(err))
