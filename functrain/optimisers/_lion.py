"""TODO (in progress this session): filled in by its owner."""


def lion(*args, **kwargs):
    raise NotImplementedError("lion")
