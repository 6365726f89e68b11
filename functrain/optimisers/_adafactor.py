"""TODO (in progress this session): filled in by its owner."""


def adafactor(*args, **kwargs):
    raise NotImplementedError("adafactor")
