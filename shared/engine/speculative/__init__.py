"""Speculative decoding: a proposer (n-gram, suffix, or a draft model) drafts tokens for the sequences that
decode this step, the planner keeps the drafts that pay, the model scores them with the step's other tokens,
and the engine verifies them (verify.py, from llm_engine.py `_sample`)."""

from shared.engine.speculative.speculator import Speculator

__all__ = ["Speculator"]
