"""SSRF refusals: every spelling of a non-public address is refused before any
connection is attempted; public addresses and allow_private_urls go through;
redirects are re-checked; TLS verifies the URL's name while connecting to the IP."""

import asyncio
import ipaddress
import socket
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyvlm.multimodal import address_policy, http_fetch
from pyvlm.multimodal.address_policy import is_public_address, parse_ip_literal
from pyvlm.multimodal.media import MediaError, MediaPolicy, load_images

from .media_server import MediaServer

PRIVATE_HOSTS = [
    "127.0.0.1", "127.0.0.1.", "2130706433", "0x7f000001", "0X7F000001", "0177.0.0.1",
    "0177.0000.0.01", "127.1", "0x7f.1", "127.0.1", "017700000001", "[::1]", "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "[::127.0.0.1]",
    "[2002:7f00:1::]", "[2002:a00:1::1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::808:808]", "10.0.0.1", "012.0.0.1", "0xa.0.0.1", "172.16.0.1", "192.168.1.1",
    "3232235777", "169.254.169.254", "0xa9fea9fe", "[::ffff:169.254.169.254]", "100.64.0.1",
    "224.0.0.1", "239.255.255.250", "0.0.0.0", "0", "0x0", "[::]", "240.0.0.1",
    "255.255.255.255", "192.0.2.1", "198.18.0.1", "[fe80::1]", "[fe80::1%25eth0]", "[fc00::1]",
    "[fd12:3456::1]", "[ff02::1]", "[2001:db8::1]", "[2001::1]", "localhost", "LOCALHOST.",
    "api.localhost", "%31%32%37.0.0.1", "\uff11\uff12\uff17.0.0.1", "\u2460\u2461\u2466.0.0.1",
]
PUBLIC_HOSTS = ["8.8.8.8", "134744072", "0x8080808", "010.010.010.010", "8.8.8.8.",
                "[2606:4700:4700::1111]", "[::ffff:8.8.8.8]", "[2002:808:808::1]", "[64:ff9b::808:808]"]


class Connected(Exception):
    """Raised by the fake connect: the fetcher did try to connect."""


@pytest.fixture
def connections(monkeypatch):
    """Records every (ip, port) the fetcher connects to and stops there."""
    attempts = []

    async def fake_open_tcp(ip, port, ssl_context, server_hostname):
        attempts.append((ip, port))
        raise Connected(ip)

    async def no_dns(host, port):
        raise AssertionError(f"unexpected DNS lookup of {host!r}")

    monkeypatch.setattr(http_fetch, "open_tcp", fake_open_tcp)
    monkeypatch.setattr(address_policy, "getaddrinfo", no_dns)
    return attempts


def load_url(url, policy=MediaPolicy()):
    ref = SimpleNamespace(source=url, param="messages[0].content[0].image_url")
    return asyncio.run(load_images([ref], policy))


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_private_spellings_are_refused_without_connecting(connections, host):
    with pytest.raises(MediaError) as info:
        load_url(f"http://{host}:8080/cat.png")
    assert "non-public address" in info.value.message
    assert "--allow-private-media-urls" in info.value.message  # the refusal names its flag
    assert info.value.param == "messages[0].content[0].image_url"
    assert connections == []


@pytest.mark.parametrize("url", ["http:/127.0.0.1/x.png", "https:x.png", "HTTP:///x.png"])
def test_http_urls_without_a_host_are_refused_without_connecting(connections, url):
    with pytest.raises(MediaError) as info:
        load_url(url, MediaPolicy(allow_private_urls=True))
    assert "no valid host" in info.value.message and "http(s)://host/path" in info.value.message
    assert connections == []


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_public_addresses_are_connected_to_by_ip(connections, host):
    with pytest.raises(Connected):
        load_url(f"https://{host}/cat.png")
    expected = parse_ip_literal(host.strip("[]"))
    assert connections == [(str(expected), 443)] and is_public_address(expected)


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "[::1]", "10.1.2.3", "[fe80::1]"])
def test_allow_private_urls_lets_private_addresses_through(connections, host):
    with pytest.raises(Connected):
        load_url(f"http://{host}/x.png", MediaPolicy(allow_private_urls=True))
    assert len(connections) == 1


@pytest.mark.parametrize("answers", [["10.0.0.7"], ["93.184.216.34", "127.0.0.1"], ["::1"],
                                     ["::ffff:192.168.0.1"]])
def test_names_resolving_to_any_private_address_are_refused(connections, monkeypatch, answers):
    async def resolver(host, port):
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, 1, 6, "", (ip, port))
                for ip in answers]

    monkeypatch.setattr(address_policy, "getaddrinfo", resolver)
    with pytest.raises(MediaError, match="non-public.*--allow-private-media-urls"):
        load_url("http://internal.example./x.png")
    assert connections == []


@pytest.mark.parametrize("host", ["256.0.0.1", "1.2.3.4.5", "0x100000000", "1.2.3.09", "1..2.3",
                                  "[::ffff:999.0.0.1]", "[12345::]"])
def test_malformed_numeric_hosts_are_refused(connections, host):
    with pytest.raises(MediaError, match="not a valid|malformed"):
        load_url(f"http://{host}/x.png")
    assert connections == []


def numeric_spelling(value, draw):
    """A random WHATWG spelling of the IPv4 address `value` (1-4 parts, mixed radixes)."""
    num_parts = draw(st.integers(1, 4))
    numbers = list(value.to_bytes(4, "big")[:num_parts - 1])
    numbers.append(value & ((1 << (8 * (5 - num_parts))) - 1))
    radixes = draw(st.lists(st.sampled_from(["dec", "hex", "HEX", "oct"]), min_size=num_parts,
                            max_size=num_parts))
    formats = {"dec": "{}", "hex": "0x{:x}", "HEX": "0X{:X}", "oct": "0{:o}"}
    return ".".join(formats[radix].format(number) for radix, number in zip(radixes, numbers))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.data())
def test_ipv4_spellings_match_inet_aton(value, data):
    """Parity with the C library's inet_aton, which accepts the same spellings."""
    host = numeric_spelling(value, data.draw)
    assert parse_ip_literal(host) == ipaddress.IPv4Address(value)
    assert socket.inet_aton(host) == value.to_bytes(4, "big")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_embedded_ipv4_forms_are_judged_like_the_ipv4_address(value):
    ipv4 = ipaddress.IPv4Address(value)
    mapped = 0xFFFF << 32 | value
    six_to_four = 0x2002 << 112 | value << 80
    nat64 = 0x64FF9B << 96 | value
    for form in (mapped, six_to_four, nat64):
        assert is_public_address(ipaddress.IPv6Address(form)) == is_public_address(ipv4)


def test_redirect_from_a_public_host_to_a_private_one_is_refused(monkeypatch):
    """images.example stands for a public server (93.184.216.34, reached through
    a fake connect that forwards to the loopback server); its redirects to
    loopback in any spelling must be refused without connecting to them."""
    with MediaServer() as server:
        attempts = []

        async def resolver(host, port):
            assert host == "images.example"
            return [(socket.AF_INET, 1, 6, "", ("93.184.216.34", port))]

        async def forwarding_open_tcp(ip, port, ssl_context, server_hostname):
            attempts.append(ip)
            assert ip == "93.184.216.34", "connected to an unchecked address"
            return await asyncio.open_connection("127.0.0.1", port)

        monkeypatch.setattr(address_policy, "getaddrinfo", resolver)
        monkeypatch.setattr(http_fetch, "open_tcp", forwarding_open_tcp)
        base = f"http://images.example:{server.port}"
        [image] = load_url(f"{base}/redirect/2/cat.jpeg")
        assert image.size == (1000, 667)
        for target in ["127.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "localhost"]:
            with pytest.raises(MediaError, match="non-public"):
                load_url(f"{base}/redirect-to?url=http://{target}:{server.port}/images/cat.jpeg")
        assert set(attempts) == {"93.184.216.34"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for images.example (openssl CLI)."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=images.example",
                    "-addext", "subjectAltName=DNS:images.example", "-keyout", directory / "key.pem",
                    "-out", directory / "cert.pem"], check=True, capture_output=True)
    return directory / "cert.pem", directory / "key.pem"


@pytest.mark.parametrize("name,is_trusted", [("images.example", True), ("other.example", False)])
def test_https_verifies_the_url_name_while_connecting_to_the_ip(monkeypatch, tls_files, name,
                                                                is_trusted):
    import ssl
    cert, key = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)

    async def resolver(host, port):
        return [(socket.AF_INET, 1, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(address_policy, "getaddrinfo", resolver)
    monkeypatch.setattr(http_fetch, "default_ssl_context",
                        lambda: ssl.create_default_context(cafile=str(cert)))
    with MediaServer(server_context) as server:
        url = f"https://{name}:{server.port}/images/dog.jpeg"
        policy = MediaPolicy(allow_private_urls=True, total_timeout_s=5)
        if is_trusted:
            [image] = load_url(url, policy)
            assert np.asarray(image).shape == (714, 1000, 3)
        else:
            with pytest.raises(MediaError, match="TLS"):
                load_url(url, policy)
