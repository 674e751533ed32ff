"""OpenAI-compatible HTTP gateway: validation, auth, limits, chat template + tokenization, metrics.

A request, in the order it visits these modules:
  app.py         routes, auth, in-flight limit (state.py: the per-app state), errors as OpenAI JSON
  serving.py     one generation request end to end
  body.py        HTTP body -> JSON object (size limit, UTF-8, JSON)
  chat.py        a chat body -> ParsedRequest: messages, chat template, token ids
  completion.py  a completions body -> ParsedRequest: prompt text or token ids
  protocol.py    what both share: field checks, SamplingParams, the context limit
  generation.py  the request's chunks across attempts: failover
  backend.py     attempts to the router over NATS; StreamChunks back; abort
  responses.py   StreamChunks -> OpenAI JSON / SSE chunks, usage, logprobs
Also: jobs.py (offline batch jobs: the same parsing and generation, no HTTP), telemetry.py (Prometheus
metrics), config.py (GatewayConfig). The model's tokenizer and config come from shared/model_files.py
(no torch). Entry point: `python -m services.gateway` (__main__.py -> server.py: GatewayService).
"""
