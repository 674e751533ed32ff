"""Speculative decoding: a proposer drafts tokens for the sequences that decode this step, the planner
keeps the drafts that pay, the model scores them with the step's other tokens, and the engine accepts
them by sampling (llm_engine.py `_sample`)."""

from shared.engine.speculative.speculator import Speculator

__all__ = ["Speculator"]
