"""Policy: the order in which the router tries its live instances for one request.

    policy = Policy("kv", load_weight=4.0)
    order = policy.order(["a", "b"], load={"a": 2, "b": 0}, matched={"a": 10})   # ["a", "b"]

Pure: no sockets, no clock. `load` is each instance's requests as the router sees them
(`Router.load`: its own in flight there, or the waiting and running the instance reports in
its KV events when more). `kv` scores an instance by the leading blocks of the prompt it
holds (`KVIndex.prefix_match`) less `load_weight` per request on it, so a conversation stays
where its KV is until that instance is `load_weight` requests per block busier than another;
less, too, one per block it is `short` of: blocks of the prompt it would have to compute but
has no room for (from the free and cached-only blocks it reports), as if each were a block
to compute more, since the request waits there for a running one to end or preempts it.
`least_loaded` takes the fewest requests; `round_robin` takes each in turn. Ties go to the
fewer requests, then by turns, so prompts no instance holds spread out. The rest of the
order is where a request goes when its first choice refuses the connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvd.config import ROUTE_POLICIES


class Policy:
    """One of ROUTE_POLICIES and its turn counter."""

    def __init__(self, name: str, load_weight: float = 4.0) -> None:
        if name not in ROUTE_POLICIES:
            raise ValueError(f"route.policy: expected {'|'.join(ROUTE_POLICIES)}, got {name!r}")
        self.name = name
        self.load_weight = load_weight
        self._turn = 0

    @property
    def uses_prefix(self) -> bool:
        return self.name == "kv"

    def order(self, live: Sequence[str], load: Mapping[str, int], matched: Mapping[str, int] | None = None,
              short: Mapping[str, int] | None = None) -> list[str]:  # fmt: skip
        """`live` instances, best first; `matched`: leading prompt blocks each holds; `short`:
        blocks each lacks room for (kv only)."""
        if not live:
            return []
        start = self._turn % len(live)
        self._turn += 1
        turns = {name: (i - start) % len(live) for i, name in enumerate(live)}
        if self.name == "round_robin":
            return sorted(live, key=turns.__getitem__)
        if self.name == "least_loaded":
            return sorted(live, key=lambda n: (load.get(n, 0), turns[n]))
        matched, short = matched or {}, short or {}
        return sorted(live, key=lambda n: (self.load_weight * load.get(n, 0) - matched.get(n, 0) + short.get(n, 0),
                                           load.get(n, 0), turns[n]))  # fmt: skip
