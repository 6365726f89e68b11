"""TODO (in progress this session): filled in by its owner."""


def muon(*args, **kwargs):
    raise NotImplementedError("muon")
