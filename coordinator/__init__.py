"""moemesh coordinator: membership, rendezvous, placement epochs and load statistics.

Layout: `settings` (one frozen dataclass), `membership` + `routing_window` + `state` (the domain:
pure Python/asyncio, no gRPC), the balancing policies (`policies`, `gating`, `splitting`: pure),
`wire` (domain <-> protos), `servicer` (thin gRPC adapter), `server` (lifecycle), `placement_admin`
(the operator's client behind `moemesh placement`), `cli` (the `coordinator` and `placement` commands).
"""
