"""Calibration of attention steering for one model (issue 12): heads from attention, α under a quality guard.

``calibrate(CalibrationConfig(model=..., out=DIR))`` scores every (layer, head) by the attention the
answer-predicting query pays to the needle on held-in NIH prompts (no generation, no ``T × T``
matrix), tries the candidate head sets × α values that keep the loss of reference answers within
a margin (:class:`Guard`), answers the held-in cells with each and writes ``DIR/steering.yaml``
(read back with :func:`ctxaware.steering.load_steering_file`), ``search.{csv,json}`` and a plot.
"""

from __future__ import annotations

from .config import CalibrationConfig
from .guard import Guard, response_losses
from .heads import head_set, needle_positions, rank_heads, retrieval_scores
from .search import Candidate, calibrate

__all__ = ["CalibrationConfig", "Candidate", "Guard", "calibrate", "head_set", "needle_positions", "rank_heads",
           "response_losses", "retrieval_scores"]
