"""`xllm tune`: max_num_seqs, the token budget and the memory split from a fitted step-cost model
(model.py: pure), checked by a few real runs (measure.py), written as a file `xllm up --config` reads (cli.py)."""
