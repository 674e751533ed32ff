"""The `xllm` command (cli.py): `up` (up.py, with the embedded NATS of natsd.py), `serve`, `generate`,
`submit` (submit.py) and `bench` (bench/). Tools around the services, which none of them import."""
