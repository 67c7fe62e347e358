"""The ``deepstrf demo`` main job: pool synthetic AA1/AA2/NS1-like sources,
stream them, fit one model and evaluate it per source (see :mod:`.run`)."""
