"""A loopback HTTP(S) server for the media tests, serving /work/shared/data/images.

Routes: /images/<name> (the file, with a misleading Content-Type);
/chunked/<name> (the file in chunks, with a chunk extension and a trailer);
/redirect/<n>/<name> (n redirects, then the image); /redirect-to?url=<url>;
/big-length (claims a huge Content-Length, then stalls); /big-close and
/big-chunked (bodies over any small cap); /slow (drips bytes); /stall (never
answers); /garbage (not an image); /missing (404). Every request's path and
Host header are recorded in `server.seen`.
"""

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

IMAGE_DIR = Path("/work/shared/data/images")
IMAGE_NAMES = ["cat.jpeg", "dog.jpeg", "example_image.png", "logo.png"]
BIG_BYTES = 300_000


class MediaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        route, _, rest = urlsplit(self.path).path.lstrip("/").partition("/")
        handler = getattr(self, "route_" + route.replace("-", "_"), None)
        if handler is None:
            return self.send_sized(b"not found", status=404)
        handler(rest)

    def route_images(self, name):
        self.send_sized((IMAGE_DIR / name).read_bytes())

    def route_chunked(self, name):
        data = (IMAGE_DIR / name).read_bytes()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(data), 70_000):
            piece = data[start:start + 70_000]
            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")

    def route_redirect(self, rest):
        remaining, _, name = rest.partition("/")
        count = int(remaining)
        self.redirect(f"/images/{name}" if count <= 1 else f"/redirect/{count - 1}/{name}")

    def route_redirect_to(self, _rest):
        self.redirect(parse_qs(urlsplit(self.path).query)["url"][0])

    def route_big_length(self, _rest):
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.flush()
        time.sleep(3)  # the client must refuse from the header, not wait for the body

    def route_big_close(self, _rest):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(bytes(BIG_BYTES))
        self.close_connection = True

    def route_big_chunked(self, _rest):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(BIG_BYTES // 10_000):
            self.wfile.write(b"2710\r\n" + bytes(10_000) + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_slow(self, _rest):
        data = (IMAGE_DIR / "cat.jpeg").read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for byte in data[:60]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.05)

    def route_stall(self, _rest):
        time.sleep(3)

    def route_garbage(self, _rest):
        self.send_sized(b"this is not an image" * 10)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_sized(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")  # wrong on purpose
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class MediaServer:
    """Runs MediaHandler on 127.0.0.1 in a thread; optional TLS."""

    def __init__(self, ssl_context: ssl.SSLContext = None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
        self.httpd.daemon_threads = True
        self.httpd.seen = []
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def seen(self) -> list:
        return self.httpd.seen

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
