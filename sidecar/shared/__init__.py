"""State shared by the replicas of a service through Redis (docs/reference.md#shared-state).

Key health (cooldowns and dead keys) and per-access-key rate-limit counters, on
the `shared_state` Redis. Redis is never in the way of traffic: every
operation has a short bound, and while Redis is unreachable each replica
keeps its own state.
"""


class SharedStateUnavailable(Exception):
    """Redis could not be reached or answered with an error. Never carries a password.

    Here, not in `sidecar.shared.base`, so that what only catches it imports no Redis client.
    """
