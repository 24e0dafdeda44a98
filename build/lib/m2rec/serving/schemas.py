"""Request and response bodies of the service, and the queries and results of its ranking core."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

MAX_ID_LENGTH = 256
MAX_HISTORY_ITEMS = 2000  # more than any model looks at (max_length); longer histories are refused, not cut

UserId = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LENGTH,
                              description="The user's id in the dataset (as in the feature store).")]
ItemId = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LENGTH,
                              description="An item id of the model's catalog.")]
TopK = Annotated[int, Field(strict=True, ge=1, description="How many items to return: 1 .. catalog size.")]
ExcludeSeen = Annotated[bool, Field(strict=True, description="Leave out items already in the history.")]
History = Annotated[list[ItemId], Field(max_length=MAX_HISTORY_ITEMS,
                                        description="Item ids the user interacted with, oldest first.")]
EventTime = Annotated[datetime | None, Field(description="When it happened (ISO 8601, UTC if no zone); now if "
                                                         "absent. Late events (within events.late_window_s) are "
                                                         "placed in time order.")]
EventId = Annotated[str | None, Field(min_length=1, max_length=MAX_ID_LENGTH, description=(
    "Client-chosen id of the event: a retried POST with the same id is applied once. Without one, (user, item, "
    "time) identifies the event."))]
MAX_BATCH_EVENTS = 500


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="Model score (logit), or a rank-based score for popularity lists.")


class RecommendResponse(BaseModel):
    """A ranked list and what explains it."""

    user_id: str | None = Field(description="The user asked about; null for /recommend_by_history.")
    strategy: Literal["model", "popularity"] = Field(
        description="`model`: ranked from the history; `popularity`: most popular items (no known history).")
    items: list[RecommendedItem]
    gates: dict[str, float] | None = Field(
        description="Weight the gate gave each branch (temporal, frequency, semantic) for this history; null for "
                    "popularity lists and models without a gate.")
    history_length: int = Field(description="Items of history the ranking used.")
    model_version: str = Field(description="Registered model name and version that ranked the items.")


class EventIn(BaseModel):
    """One event of a batch."""

    user_id: UserId
    item_id: ItemId
    timestamp: EventTime = None
    event_id: EventId = None


EventBatch = Annotated[list[EventIn], Field(min_length=1, max_length=MAX_BATCH_EVENTS,
                                            description="Events to record together: all are stored, or none.")]


class EventResponse(BaseModel):
    user_id: str
    item_id: str
    timestamp: datetime
    event_id: str = Field(description="The event's id (the client's, or one the log assigned).")
    seq: int = Field(description="The event's position in the event log.")
    duplicate: bool = Field(description="True when this event was already recorded (a retry): nothing changed.")
    sequence_length: int = Field(description="Length of the user's sequence after this event.")
    model_version: str = Field(description="The model version serving when the event was recorded.")


class EventsResponse(BaseModel):
    events: list[EventResponse]


class Failure(BaseModel):
    """A refused request: HTTP status, the field at fault and a message saying how to fix it."""

    status: int
    field: str
    message: str

    def body(self) -> dict:
        """The error body, shaped like BentoML's own validation errors (`error` + `detail[].loc`)."""
        return {"error": self.message, "detail": [{"loc": [self.field], "msg": self.message}]}


class RankQuery(BaseModel):
    """One ranking request: a user (history from the feature store) or an item history."""

    user_id: str | None = None
    item_ids: list[str] | None = None
    k: int
    exclude_seen: bool


class RankResult(BaseModel):
    response: RecommendResponse | None = None
    failure: Failure | None = None


class EventsResult(BaseModel):
    response: EventsResponse | None = None
    failure: Failure | None = None
