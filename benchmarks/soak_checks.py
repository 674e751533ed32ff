"""What the soak (benchmarks/soak.py) checks in every response: the body or the events, and `usage`."""

from typing import Any

FINISHES = ("stop", "length")


class BadResponse(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def check_usage(usage: Any, max_tokens: int, exact: bool) -> tuple[int, int]:
    """-> (prompt_tokens, completion_tokens); `exact`: completion_tokens must be max_tokens."""
    ct = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(ct, int) or not 1 <= ct <= max_tokens:
        raise BadResponse("bad_body", f"usage {usage} for max_tokens {max_tokens}")
    if exact and ct != max_tokens:
        raise BadResponse("short_output", f"completion_tokens {ct} != max_tokens {max_tokens}")
    return usage.get("prompt_tokens") or 0, ct


def check_chat(data: Any, n: int, max_tokens: int) -> tuple[int, int]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or sorted(c.get("index") for c in choices) != list(range(n)):
        raise BadResponse("bad_body", f"want {n} choices: {str(data)[:200]}")
    for c in choices:
        if not isinstance((c.get("message") or {}).get("content"), str) or c.get("finish_reason") not in FINISHES:
            raise BadResponse("bad_body", f"choice {str(c)[:200]}")
    return check_usage(data.get("usage"), n * max_tokens, all(c["finish_reason"] == "length" for c in choices))


def check_stream(events: list[dict], max_tokens: int, exact: bool) -> tuple[int, int]:
    finish = None
    for event in events[:-1]:
        for c in event["choices"]:
            if not isinstance(c.get("text"), str) and not isinstance(c.get("delta"), dict):
                raise BadResponse("bad_body", f"event {str(event)[:200]}")
            finish = c.get("finish_reason") or finish
    if finish not in FINISHES:
        raise BadResponse("bad_body", f"finish_reason {finish!r} after {len(events)} events")
    return check_usage(events[-1].get("usage"), max_tokens, exact or finish == "length")
