"""The OpenAI-compatible application over pyvlm.Engine (no torch here):
`App` (the HTTP handler), `ServerArgs` (the command line) and `run_server`
(`python -m pyvlm`)."""
