"""The edge: the `elit-stream` CLI, replay of recorded movies and file readers, the demo and its
synthetic movie, and a launcher that starts the service as a subprocess. Uses the other rooms
like any client would; nothing imports `tools`."""
