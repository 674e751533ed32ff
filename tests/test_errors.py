"""shared/errors.py: one error type, its wire form and OpenAI body."""

from shared.errors import ApiError, aborted, internal, invalid, overloaded, unavailable


def test_constructors_and_retriable() -> None:
    assert (invalid("x", "temperature").status, invalid("x").retriable) == (400, False)
    assert overloaded("full").status == 429 and overloaded("full").retriable
    assert unavailable("gone").status == 503 and unavailable("gone").retriable
    assert internal("bug").status == 500 and not internal("bug").retriable
    assert aborted().status == 499


def test_wire_round_trip_and_openai_body() -> None:
    e = ApiError(400, "n must be >= 1", "invalid_request_error", "n", "invalid_value")
    assert ApiError.from_wire(e.to_wire()) == e
    assert e.body() == {
        "error": {"message": "n must be >= 1", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}
    }
    assert ApiError.from_wire(unavailable("x").to_wire(), retry_after=2).retry_after == 2
    assert ApiError.from_wire(invalid("x").to_wire(), retry_after=2).retry_after is None  # only 429 / 503


def test_a_malformed_wire_error_is_a_502_that_says_so() -> None:
    for wire in ({}, {"status": 200, "message": "ok"}, {"status": "400", "message": "x"}, {"status": 400}):
        e = ApiError.from_wire(wire)
        assert e.status == 502 and "malformed" in e.message
