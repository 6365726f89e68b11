"""Finding a wrapper's state inside nested states."""

from __future__ import annotations

from typing import Any

from .. import _tree


def find_one_state(state: Any, cls: type, owner: str, what: str) -> Any:
    """The single ``cls`` instance inside ``state``; a ValueError saying what to do when there are none or several."""
    found = _tree.find_states(state, cls)
    if len(found) != 1:
        raise ValueError(
            f"{owner}: expected opt_state to hold exactly one {cls.__name__} (from {what}), found {len(found)}; "
            f"pass the state of the optimiser that contains it (or the {cls.__name__} itself)"
        )
    return found[0]
