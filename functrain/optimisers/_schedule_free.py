"""TODO (in progress this session): filled in by its owner."""


def schedule_free_adamw(*args, **kwargs):
    raise NotImplementedError("schedule_free_adamw")


def schedule_free_eval_params(*args, **kwargs):
    raise NotImplementedError("schedule_free_eval_params")
