"""MaskedAdamW: AdamW on selected rows only, with state for selected rows only.

Each parameter keeps a slot table: ``slot_of_row[r]`` is the state slot of row
``r`` (-1 until the row is first selected).  ``exp_avg``/``exp_avg_sq``
(float32, (capacity, C)) and ``step`` (float32, (capacity,)) hold one entry per
slot, so optimizer memory follows the rows ever selected, not the model.
Every slot keeps its own step count, so a row's bias correction counts the
steps in which that row was updated: after any sequence of steps each row
equals what a separate torch.optim.AdamW over that row alone, stepped only
when the row was selected, would give (within float32 rounding).
"""

from .masked_adamw import MaskedAdamW

__all__ = ["MaskedAdamW"]
