"""Seeded synthetic interactions: the embedded default dataset (no download, no licence question).

Each branch of M2Rec has something to learn here:
- temporal: a user's next category depends on the recent ones (a routine over categories, slowly drifting);
- frequency: routines repeat with a per-user period (weekly by default), i.e. a periodic signal plus noise;
- semantic: item texts name the category and attributes, so text embeddings cluster related items.
Item popularity follows a power law inside every category.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from annotated_types import Ge, Gt, Interval

from m2rec.data.schema import RawDataset

CATEGORIES = (
    "running shoes", "espresso coffee", "science fiction novels", "board games", "yoga mats", "indie video games",
    "jazz vinyl records", "hiking backpacks", "green tea", "mechanical keyboards", "cookbooks", "watercolor paints",
    "camping tents", "detective novels", "wireless headphones", "houseplants", "chess sets", "protein snacks",
    "travel guides", "photography lenses",
)
ADJECTIVES = ("classic", "premium", "compact", "handmade", "lightweight", "vintage", "eco-friendly", "deluxe",
              "budget", "professional", "limited edition", "everyday")
BRANDS = ("Northwind", "Acme", "Bluebird", "Kestrel", "Orchid", "Summit", "Lumen", "Tidewater", "Ironwood", "Maple")


@dataclass
class SyntheticParams:
    """Sizes and behaviour of the synthetic dataset."""

    n_users: Annotated[int, Ge(1)] = 1000
    n_items: Annotated[int, Ge(1)] = 600
    n_categories: Annotated[int, Ge(1)] = 12
    min_length: Annotated[int, Ge(1)] = 12
    max_length: Annotated[int, Ge(1)] = 60
    period: Annotated[int, Ge(1)] = 7  # days in a user's routine
    routine_probability: Annotated[float, Interval(ge=0.0, le=1.0)] = 0.75  # next item follows the routine, else noise
    drift_probability: Annotated[float, Interval(ge=0.0, le=1.0)] = 0.03  # per event: one routine slot changes
    popularity_exponent: Annotated[float, Gt(0.0)] = 1.1  # Zipf exponent of item popularity inside a category
    seed: Annotated[int, Ge(0)] = 7


def _items(params: SyntheticParams, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    n_categories = min(params.n_categories, len(CATEGORIES))
    category = rng.integers(0, n_categories, size=params.n_items)
    adjective = rng.choice(ADJECTIVES, size=params.n_items)
    brand = rng.choice(BRANDS, size=params.n_items)
    price = rng.choice(["low", "mid-range", "high"], size=params.n_items, p=[0.4, 0.4, 0.2])
    names = [CATEGORIES[c] for c in category]
    texts = [
        f"{adj.capitalize()} {name} by {b}. Category: {name}. {p.capitalize()} price."
        for adj, name, b, p in zip(adjective, names, brand, price)
    ]
    items = pd.DataFrame(
        {
            "item_id": [f"i{i:05d}" for i in range(params.n_items)],
            "text": texts,
            "title": [f"{adj.capitalize()} {name} by {b}" for adj, name, b in zip(adjective, names, brand)],
            "category": names,
            "brand": brand,
            "price_tier": price,
        }
    )
    return items, category


def generate_synthetic(params: SyntheticParams | None = None) -> RawDataset:
    """Generate users with periodic, drifting category routines over power-law-popular items."""
    params = params or SyntheticParams()
    rng = np.random.default_rng(params.seed)
    items, item_category = _items(params, rng)
    n_categories = int(item_category.max()) + 1
    members = [np.flatnonzero(item_category == c) for c in range(n_categories)]
    # per-category popularity: Zipf weights over a random order of the category's items
    weights = []
    for group in members:
        w = 1.0 / np.arange(1, len(group) + 1) ** params.popularity_exponent
        weights.append(rng.permutation(w / w.sum()) if len(group) else w)

    users, item_rows, times = [], [], []
    start = pd.Timestamp("2024-01-01", tz="UTC").value // 10**9
    for user in range(params.n_users):
        length = int(rng.integers(params.min_length, params.max_length + 1))
        favourites = rng.choice(n_categories, size=min(4, n_categories), replace=False)
        routine = rng.choice(favourites, size=params.period)
        day0 = int(rng.integers(0, 365))
        previous = -1
        for step in range(length):
            if rng.random() < params.drift_probability:
                routine[rng.integers(params.period)] = rng.integers(n_categories)
            day = day0 + step
            category = routine[day % params.period] if rng.random() < params.routine_probability \
                else rng.integers(n_categories)
            group = members[category]
            if len(group) == 0:
                continue
            item = int(rng.choice(group, p=weights[category]))
            if item == previous and len(group) > 1:
                item = int(rng.choice(group, p=weights[category]))
            previous = item
            users.append(f"u{user:05d}")
            item_rows.append(item)
            times.append(start + day * 86400 + int(rng.integers(6 * 3600, 23 * 3600)))
    interactions = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items["item_id"].to_numpy()[np.asarray(item_rows)],
            "timestamp": pd.to_datetime(np.asarray(times), unit="s", utc=True),
        }
    )
    return RawDataset(interactions, items, source=f"synthetic(seed={params.seed})")
