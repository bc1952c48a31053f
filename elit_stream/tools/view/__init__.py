"""`elit-stream view`: the operator's live view, a web page next to the microscope software.

A separate process and a client of the service like any other (results subscriber + control
client). `state` holds latest values, `render` turns messages into what the page draws,
`link` talks to the service, `server` serves the page (aiohttp; the optional extra `view`),
`static/` is the page itself (plain HTML/CSS/JS, shipped in the package). docs/view.md.
"""
