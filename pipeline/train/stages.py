"""Which training data a recipe runs on: one class per ``Recipe.mining`` value, each giving its
config checks (``check``), whether it reads stored tokens (``on_tokens``), its per-epoch batches
(``epoch``) and its validation (``validation``). A new recipe names a mining kind; a new kind of
data is a new class in this table, not a new branch in the loop.
"""
from __future__ import annotations

from ..config import ConfigError
from .hardest_negatives import HardestNegativesData
from .partial_mining import PartialMiningData
from .recipes import Recipe

DATA_KINDS: dict[str, type[PartialMiningData] | type[HardestNegativesData]] = {
    PartialMiningData.mining: PartialMiningData,
    HardestNegativesData.mining: HardestNegativesData,
}


def data_kind(recipe: Recipe) -> type[PartialMiningData] | type[HardestNegativesData]:
    try:
        return DATA_KINDS[recipe.mining]
    except KeyError:
        raise ConfigError(f"recipe {recipe.name}: mining must be one of {sorted(DATA_KINDS)}, "
                          f"got {recipe.mining!r}") from None
