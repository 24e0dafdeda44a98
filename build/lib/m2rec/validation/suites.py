"""Great Expectations 1.x suites for the canonical tables: interactions and the item catalog.

Some checks need a value GX cannot compute from one column, so they run on derived columns added by
`check_frames`: `timestamp_utc` (the timestamp parsed to UTC; NaT where it does not parse) and
`user_interactions` (the row's user's number of interactions).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import pandas as pd
from annotated_types import Ge, Interval

from m2rec.errors import ConfigError
from m2rec.data.schema import SPLITS

log = logging.getLogger(__name__)
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are import-time chatter

INTEGER_TYPES = ["int64", "int32", "Int64", "Int32"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "user_idx", "item_idx", "split"]
ITEM_COLUMNS = ["item_id", "item_idx", "text"]
# The context's project config, given as a mapping to the public `gx.get_context(project_config=...)` (the
# schema of great_expectations.yml): in-memory stores, no data docs (no temporary docs folder per run), and no
# progress bars (45 tiny metric bars per run are noise).
_IN_MEMORY = {"store_backend": {"class_name": "InMemoryStoreBackend"}}
CONTEXT_CONFIG = {
    "config_version": 4,
    "progress_bars": {"globally": False, "metric_calculations": False},
    "data_docs_sites": {},
    "expectations_store_name": "expectations_store",
    "validation_results_store_name": "validation_results_store",
    "checkpoint_store_name": "checkpoint_store",
    "stores": {
        "expectations_store": {"class_name": "ExpectationsStore", **_IN_MEMORY},
        "validation_results_store": {"class_name": "ValidationResultsStore", **_IN_MEMORY},
        "checkpoint_store": {"class_name": "CheckpointStore", **_IN_MEMORY},
        "validation_definition_store": {"class_name": "ValidationDefinitionStore", **_IN_MEMORY},
    },
}


@dataclass
class ValidationParams:
    """Thresholds of the data checks (params.yaml section `validation`)."""

    min_timestamp: str = "1995-01-01"  # floor of interaction times (UTC); earlier ones are clock or parsing errors
    max_timestamp: str | None = None  # ceiling (UTC); None: the time of validation
    min_interactions_per_user: Annotated[int, Ge(1)] = 5  # after k-core filtering, as `prepare.k_core_users`
    min_text_fraction: Annotated[float, Interval(ge=0.0, le=1.0)] = 1.0  # share of items with a non-empty text
    example_rows: Annotated[int, Ge(0)] = 5  # failing rows quoted per expectation in the report


def utc_timestamp(value: str | pd.Timestamp, name: str) -> pd.Timestamp:
    """Parse a threshold to a UTC timestamp (naive values are taken as UTC)."""
    try:
        stamp = pd.Timestamp(value)
    except ValueError as err:
        raise ConfigError(f"validation.{name}={value!r} is not a date ({err})",
                          f"set validation.{name} to an ISO date such as 1995-01-01") from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def check_frames(interactions: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of the tables, indexed 0..n-1, with the derived columns the suites check."""
    frame = interactions.reset_index(drop=True)
    if "timestamp" in frame:
        frame["timestamp_utc"] = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce", format="mixed")
    if "user_id" in frame:
        frame["user_interactions"] = frame.groupby("user_id")["user_id"].transform("size")
    return frame, items.reset_index(drop=True)


def interaction_expectations(params: ValidationParams, catalog_ids: list[str], now: pd.Timestamp) -> list:
    """The interactions suite: columns, types, no nulls, positive indices, time range, uniqueness, user length,
    split labels, and every item in the catalog."""
    import great_expectations.expectations as gxe

    floor = utc_timestamp(params.min_timestamp, "min_timestamp")
    ceiling = utc_timestamp(params.max_timestamp, "max_timestamp") if params.max_timestamp else now
    if floor >= ceiling:
        raise ConfigError(f"validation.min_timestamp {floor} is not before the ceiling {ceiling}",
                          "set validation.min_timestamp earlier (or max_timestamp later)")
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=INTERACTION_COLUMNS, exact_match=False,
                                         description=f"the table has the columns {', '.join(INTERACTION_COLUMNS)}"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is never null")
          for c in ("user_id", "item_id", "user_idx", "item_idx", "split")],
        *[gxe.ExpectColumnValuesToBeOfType(column=c, type_="str", description=f"{c} is a string")
          for c in ("user_id", "item_id")],
        *[gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=INTEGER_TYPES, description=f"{c} is an integer")
          for c in ("user_idx", "item_idx")],
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1, description=f"{c} >= 1 (0 is padding)")
          for c in ("user_idx", "item_idx")],
        gxe.ExpectColumnValuesToBeOfType(column="timestamp", type_="Timestamp",  # GX's name for tz-aware datetimes
                                         description="timestamp is a timezone-aware datetime"),
        gxe.ExpectColumnValuesToNotBeNull(column="timestamp_utc",
                                          description="every timestamp is present and parses as a date"),
        gxe.ExpectColumnValuesToBeBetween(column="timestamp_utc", min_value=floor, max_value=ceiling,
                                          description=f"timestamps lie between {floor} and {ceiling}"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp"],
                                            description="no duplicate (user_id, item_id, timestamp) rows"),
        gxe.ExpectColumnValuesToBeBetween(
            column="user_interactions", min_value=params.min_interactions_per_user,
            description=f"every user has at least {params.min_interactions_per_user} interactions"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        description=f"split is one of {', '.join(SPLITS)}"),
        gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=catalog_ids,
                                        description="every interacted item is in the item catalog"),
    ]


def item_expectations(params: ValidationParams) -> list:
    """The catalog suite: columns, unique non-null ids and indices, non-empty text."""
    import great_expectations.expectations as gxe

    text_share = f" ({params.min_text_fraction:.0%} of items)" if params.min_text_fraction < 1 else ""
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=ITEM_COLUMNS, exact_match=False,
                                         description=f"the table has the columns {', '.join(ITEM_COLUMNS)}"),
        gxe.ExpectColumnValuesToNotBeNull(column="item_id", description="item_id is never null"),
        gxe.ExpectColumnValuesToBeOfType(column="item_id", type_="str", description="item_id is a string"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id", description="item_id is unique"),
        gxe.ExpectColumnValuesToNotBeNull(column="item_idx", description="item_idx is never null"),
        gxe.ExpectColumnValuesToBeInTypeList(column="item_idx", type_list=INTEGER_TYPES,
                                             description="item_idx is an integer"),
        gxe.ExpectColumnValuesToBeBetween(column="item_idx", min_value=1, description="item_idx >= 1 (0 is padding)"),
        gxe.ExpectColumnValuesToBeUnique(column="item_idx", description="item_idx is unique"),
        gxe.ExpectColumnValuesToNotBeNull(column="text", mostly=params.min_text_fraction,
                                          description=f"text is never null{text_share}"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S", mostly=params.min_text_fraction,
                                           description=f"text is not empty{text_share}"),
    ]


def _outcome(suite: str, result: Any, frame: pd.DataFrame, example_rows: int) -> dict:
    """One expectation's result as plain data, with up to `example_rows` failing rows of `frame`."""
    config = result.expectation_config
    details = result.result or {}
    column = config.kwargs.get("column") or ", ".join(config.kwargs.get("column_list") or []) or None
    rows = details.get("partial_unexpected_index_list") or []
    error = result.exception_info.get("exception_message") if result.exception_info.get("raised_exception") else None
    return {
        "suite": suite,
        "expectation": config.type,
        "column": column,
        "description": config.description,
        "success": bool(result.success),
        "element_count": details.get("element_count"),
        "unexpected_count": details.get("unexpected_count"),
        "unexpected_percent": details.get("unexpected_percent"),
        "observed_value": details.get("observed_value"),
        "error": error,
        "examples": [] if result.success else
        frame.loc[rows[:example_rows]].rename_axis("row").reset_index().to_dict("records"),
    }


def run_suites(interactions: pd.DataFrame, items: pd.DataFrame, params: ValidationParams,
               now: pd.Timestamp | None = None) -> list[dict]:
    """Validate both tables with an ephemeral GX context; one outcome dict per expectation."""
    import great_expectations as gx

    now = now or pd.Timestamp.now(tz="UTC")
    frames = dict(zip(("interactions", "items"), check_frames(interactions, items)))
    catalog_ids = frames["items"]["item_id"].dropna().astype(str).tolist() if "item_id" in frames["items"] else []
    suites = {"interactions": interaction_expectations(params, catalog_ids, now), "items": item_expectations(params)}

    context = gx.get_context(mode="ephemeral", project_config=copy.deepcopy(CONTEXT_CONFIG))
    source = context.data_sources.add_pandas("canonical_tables")
    outcomes = []
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frames[name]},
                                result_format={"result_format": "SUMMARY",
                                               "partial_unexpected_count": max(params.example_rows, 1)})
        log.info("%s: %d of %d expectations met", name, sum(r.success for r in result.results), len(result.results))
        outcomes += [_outcome(name, r, frames[name], params.example_rows) for r in result.results]
    return outcomes
