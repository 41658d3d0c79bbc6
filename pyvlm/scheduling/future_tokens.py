"""The placeholder of a token not yet known on the host.

With overlap scheduling (pyvlm.scheduling.overlap) the scheduler launches
decode step N+1 while step N still runs: the token each request feeds to
N+1 is the one N samples, which only the device has. Such a chunk carries
FUTURE_TOKEN in token_ids; the runner reads the request's token from the
previous launched step's samples on the device (SGLang's future token map).
"""

FUTURE_TOKEN = -1
