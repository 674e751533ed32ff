"""`xllm bench serve`: a load generator for any OpenAI-compatible server (ours, llama.cpp's, vLLM's).

Read in this order: workloads.py (what to send) -> arrivals.py (when) -> client.py (one streamed
request, timed) -> runner.py (a whole run) -> metrics.py (numbers) -> report.py / plots.py (output);
offline.py is the batch-job workload over NATS; serve.py holds the command line.
"""
