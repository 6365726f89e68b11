"""TODO (in progress this session): filled in by its owner."""


def scale_by_lion(*args, **kwargs):
    raise NotImplementedError("scale_by_lion")
