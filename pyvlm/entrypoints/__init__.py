"""User-facing entry points: the offline pyvlm.Engine (engine.py), how it
starts (startup.py) and the StepLoop thread that runs its scheduler steps
(step_loop.py). The server (pyvlm.server) drives the same Engine."""
