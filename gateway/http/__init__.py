"""The gateway's OpenAI-compatible HTTP API, served in the gateway's own event loop next to gRPC.

The handlers (app.py) parse an OpenAI request body (params.py) into the same
`gateway_pb2.GenerateRequest` the gRPC API takes, and then walk the same path: `ServedModel.prepare`
(tokenize and validate), `generation.generate_one` over the one `WorkerPool` (admission, placement,
migration, the one token count, the one failure rule). Only the shapes differ: JSON and server-sent
events out (sse.py), errors in OpenAI's shape with statuses derived from the one status table
(errors.py), text-level stop strings (stops.py), chat templates (chat.py). server.py runs uvicorn
inside the gateway's loop.
"""
