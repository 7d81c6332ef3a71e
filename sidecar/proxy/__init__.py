"""The proxy: the request handler and the pieces it drives (docs/reference.md#failover-and-key-health).

`handler` runs one request; `upstream` makes one attempt; `relay` writes the answer;
`accounting` leaves metrics, spend and the access-log line; `exchange` is the state
one request carries across its attempts.
"""

from sidecar.proxy.handler import Proxy

__all__ = ["Proxy"]
