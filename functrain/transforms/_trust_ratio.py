"""TODO (in progress this session): filled in by its owner."""


def scale_by_trust_ratio(*args, **kwargs):
    raise NotImplementedError("scale_by_trust_ratio")
