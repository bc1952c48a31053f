"""The running service: the frame loop (`loop`), control commands (`control`), the drift /
outlier policy (`selection`), Prometheus metrics (`metrics`) and the validated config (`config`).
Imports `core` and `protocol`; never `tools`."""
