"""The ``deepstrf demo`` main job: pool synthetic AA1/AA2/NS1-like sources,
stream them, fit one model and evaluate it per source (see :mod:`.run`)."""

# the demo's size and training defaults (a command-line option left out, or None, takes these)
DEFAULTS = {"scale": 0.5, "time_scale": 0.5, "epochs": 20, "workers": 0}
