"""OpenAI-compatible HTTP gateway: validation, auth, limits, chat template + tokenization, metrics.

A request, in the order it visits these modules:
  app.py        routes, auth, in-flight limit, the middleware turning every error into OpenAI JSON
  serving.py    one generation request end to end
  body.py       HTTP body -> JSON object (size limit, UTF-8, JSON)
  protocol.py   OpenAI fields -> SamplingParams + prompt token ids (the one place that tokenizes)
  backend.py    GenerateRequest to the router over NATS; StreamChunks back; abort
  responses.py  StreamChunks -> OpenAI JSON / SSE chunks, usage, logprobs
Also: errors.py (ApiError), telemetry.py (Prometheus metrics), config.py (GatewayConfig).
Entry point: `python -m services.gateway` (__main__.py -> server.run(config)).
"""
