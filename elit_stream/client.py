"""The public client API, for microscope software: ``from elit_stream.client import …``.

A stable import path over the contract layer (`elit_stream.protocol`), which owns the code:
`FrameSender` (ingest), `ResultSubscriber` (results and events), `ControlClient` (commands) and
`ClientCurve` (CURVE keys for a secured service), and `LosslessSender` (keeps every frame until
it is answered and resends across service restarts; docs/protocol.md §3.1). See docs/protocol.md.
"""
from elit_stream.protocol.auth import ClientCurve
from elit_stream.protocol.client import (
    ControlClient,
    FrameSender,
    LosslessSender,
    ResultSubscriber,
)

__all__ = ["ClientCurve", "ControlClient", "FrameSender", "LosslessSender", "ResultSubscriber"]
