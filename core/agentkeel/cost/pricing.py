"""Model prices: ``[prices."MODEL"]`` from the config first, then the genai-prices table.

genai-prices ships its price table inside the package, so lookups work offline.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.types import ModelPrice

_MTOK = 1_000_000


@hookimpl(tryfirst=True)
def agentkeel_model_price(model: str, config: Config) -> ModelPrice | None:
    """A price configured by the operator wins over the table."""
    override = config.prices.get(model)
    if override is None:
        return None
    cached = override.get("cached_input_per_mtok")
    return ModelPrice(float(override["input_per_mtok"]), float(override["output_per_mtok"]),
                      None if cached is None else float(cached))


@hookimpl(trylast=True, specname="agentkeel_model_price")
def price_from_table(model: str) -> ModelPrice | None:
    """Look the model up in the genai-prices table; None when it is not listed."""
    from genai_prices import Usage as PriceUsage  # imported on first use: it loads the whole table
    from genai_prices import calc_price

    try:
        per_input = calc_price(PriceUsage(input_tokens=_MTOK, output_tokens=0), model_ref=model)
        per_output = calc_price(PriceUsage(input_tokens=0, output_tokens=_MTOK), model_ref=model)
    except LookupError:
        return None
    try:  # cache_read_tokens count within input_tokens: here the whole million was read from the cache
        cached: float | None = float(
            calc_price(PriceUsage(input_tokens=_MTOK, cache_read_tokens=_MTOK), model_ref=model).total_price)
    except (LookupError, ValueError):
        cached = None  # no cache price listed: cached input is priced as input (an upper bound)
    return ModelPrice(float(per_input.total_price), float(per_output.total_price), cached)
