"""Router service: picks worker instances per request and forwards it, with failover (see service.py)."""
