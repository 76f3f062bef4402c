"""The HTTP routes, one module per endpoint or endpoint group, each reading the shared state from
`request.app.state` (set by `gamestream.api.app.create_app`)."""
