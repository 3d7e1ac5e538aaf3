"""moemesh gateway: the client-facing gRPC front door.

Tokenizes and validates requests, picks a worker for each (data-parallel attention), relays token
streams from the workers' long-lived Serve streams, fans batches out concurrently.
Holds no model weights.
"""
