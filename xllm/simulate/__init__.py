"""`xllm simulate`: a discrete-event simulation of a cluster (instances, the router's own policy code, the
gateway's SLO accounting) driven by a profiled step-cost model, to compare serving policies at scales this
machine cannot run for real.

trace.py     synthetic request traces (arrivals, length mixes, diurnal swings)
instance.py  one engine instance: its scheduler's batching, priced by shared/cost_model.py, and its heartbeat
cluster.py   the event loop: arrivals, routing by services/router (imported, not copied), KV hand-offs, metrics
cli.py       the command: one run, or a goodput-vs-rate sweep per policy
"""
