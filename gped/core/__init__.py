"""Pure parts of gped: data, models, samplers, expectations, estimators (no sockets, no processes)."""
