"""The KV connector: how KV comes from outside an instance's own compute, and where it goes.

The scheduler half (`KVConnector`) answers the scheduler's questions — how many of a
request's leading tokens come from outside, what to do once their blocks are allocated,
whether a finished request's blocks stay held for a save, whether a prompt is computed
whole by the prefill group — and never leaves state in the scheduler. The pool
connector (`kvd.connector.pool`) is the PD one: the local, Mooncake and Redis pools, and
prefix reuse from the pool, sit behind it; its worker half (`kvd.connector.transfers`)
starts each load and save on the cache messenger process and ends it on the engine, and
the PD roles decide when. docs/architecture.md, "The KV connector", has the contract.
"""
