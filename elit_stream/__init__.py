"""ELIT-stream, the service: real-time atom finding with ensemble uncertainty (no PyTorch).

Four rooms; imports point down this list only (checked by tests/test_architecture.py):

- `elit_stream.tools`    CLI, replay, demo, readers, launcher: the edge, uses anything below
- `elit_stream.service`  the running service: loop, control, selection policy, metrics, config
- `elit_stream.core`     inference without sockets: artifact reading, engine, post-processing,
                         the active member set
- `elit_stream.protocol` the contract: messages, wire format, client, CURVE keys; imports no
                         other room (what microscope software imports, via `elit_stream.client`)

`service` may import `core` and `protocol`; `core` and `protocol` import nothing of each other.
See docs/architecture.md.
"""
