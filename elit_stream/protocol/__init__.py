"""The contract with microscope software: message models (`messages`), the one module that knows
the byte layout (`wire`), the Python client (`client`) and CURVE keys (`auth`). Imports no other
room of `elit_stream`; docs/protocol.md is its written spec."""
