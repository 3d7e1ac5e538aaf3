"""moemesh coordinator: membership, rendezvous, placement epochs and load statistics.

Layout: `settings` (one frozen dataclass), `membership` + `load` + `state` (the domain: pure
Python/asyncio, no gRPC), `wire` (domain <-> protos), `servicer` (thin gRPC adapter), `server`
(lifecycle), `cli` (the `coordinator` and `placement` commands).
"""
