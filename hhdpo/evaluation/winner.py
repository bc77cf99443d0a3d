"""From the judge's A/B verdict to model / chosen / tie.

A pairwise record holds the model's response and the HH chosen one in slots A and B
(swapped or not, see :mod:`hhdpo.evaluation.pairwise`); a verdict names a slot. Summaries read
only the mapped outcome, so shuffled and unshuffled files of the same judgements agree.
"""

from __future__ import annotations

from typing import Optional

from hhdpo.evaluation.pairwise import CHOSEN_ID

FLIP = {"a": "b", "b": "a", "tie": "tie"}  # a verdict given with A and B exchanged, read back


def model_side(a_id: str, b_id: str, is_swapped: bool, chosen_id: str = CHOSEN_ID) -> str:
    """Which slot holds the model response: the one whose id is not ``chosen_id``; for files
    with other labels, the pairwise convention (A is the model unless swapped)."""
    if b_id == chosen_id and a_id != chosen_id:
        return "a"
    if a_id == chosen_id and b_id != chosen_id:
        return "b"
    return "b" if is_swapped else "a"


def map_winner(winner: Optional[str], a_id: str, b_id: str, is_swapped: bool,
               chosen_id: str = CHOSEN_ID) -> tuple[Optional[str], str, str]:
    """Map an A/B verdict to ``(winner_model_vs_chosen, model_id, chosen_id)``."""
    side = model_side(a_id, b_id, is_swapped, chosen_id)
    model_id, chosen = (a_id, b_id) if side == "a" else (b_id, a_id)
    if winner is None or winner == "tie":
        return winner, model_id, chosen
    return ("model" if winner == side else "chosen"), model_id, chosen


def reconcile(w_ab: str, w_ba: str) -> str:
    """Both-orders verdicts (both in the record's A/B space): agreement wins, else tie."""
    return w_ab if w_ab == w_ba else "tie"
