"""The router's side of kvd: where each instance's KV blocks are (index.py), kept current
from the instances' KV events (subscriber.py). docs/architecture.md, "KV events"."""
