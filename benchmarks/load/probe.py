"""A /health prober in its own process, so the load generator's event loop
never delays a probe: every `interval` seconds (on a fixed schedule) it
opens a connection to the loopback server, sends GET /health and times the
whole answer; one JSON line per probe goes to the output file:
[monotonic time sent, seconds to the answer or null, status or 0].

  python -m benchmarks.load.probe --port 30000 --seconds 90 --out probes.jsonl
"""

import argparse
import json
import signal
import socket
import sys
import time
from typing import Optional, Tuple

PROBE_TIMEOUT_S = 2.0


def probe(host: str, port: int, timeout: float) -> Tuple[Optional[float], int]:
    """(seconds to the whole answer, status); (None, 0) on timeout or error."""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = b""
            while True:  # /health's body is empty: the answer ends with the head or at EOF
                chunk = sock.recv(4096)
                data += chunk
                if not chunk or b"\r\n\r\n" in data:
                    break
        return time.monotonic() - start, int(data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None, 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--seconds", type=float, required=True, help="stop after this long")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    end = time.monotonic() + args.seconds
    next_at = time.monotonic()
    with open(args.out, "w", buffering=1) as out:
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            sent = time.monotonic()
            latency, status = probe(args.host, args.port, PROBE_TIMEOUT_S)
            out.write(json.dumps([sent, latency, status]) + "\n")
            next_at += args.interval
            while next_at < time.monotonic():  # a slow probe: skip the missed slots
                next_at += args.interval
    return 0


if __name__ == "__main__":
    sys.exit(main())
