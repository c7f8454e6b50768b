"""Building blocks shared by every model: resizing math, attention, MLP, stochastic depth, norms."""
