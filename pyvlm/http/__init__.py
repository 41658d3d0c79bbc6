"""HTTP/1.1 on asyncio + uvloop, written by hand: a sans-IO parser, SSE
framing, and an asyncio.Protocol with flow control and timeouts. No torch."""
