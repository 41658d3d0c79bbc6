"""Which network addresses an image URL may reach (SSRF protection, no torch).

A URL's host is turned into IP addresses the way the fetcher will use them:
numeric spellings are parsed here (WHATWG URL rules: decimal, hex and octal
parts, short forms such as 127.1, a trailing dot, bracketed IPv6), names are
resolved with getaddrinfo, and every resulting address must be global. The
fetcher then connects to one of these checked addresses, never to the name,
so a second DNS answer cannot swap in a private address (DNS rebinding).
"""

import asyncio
import ipaddress
import socket
from typing import Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: embeds an IPv4 address
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: site-local translation
_MAX_IPV4 = 1 << 32


class AddressError(ValueError):
    """A URL host that is malformed, unresolvable, or not a global address."""


def is_public_address(address: IPAddress) -> bool:
    """True when `address` is a global unicast address; IPv6 forms that embed
    an IPv4 address (IPv4-mapped, 6to4, NAT64) are judged by that address."""
    embedded = embedded_ipv4(address)
    if embedded is not None:
        return is_public_address(embedded)
    if address.version == 6 and address in _NAT64_LOCAL_USE:
        return False
    return address.is_global and not _is_special(address)


def _is_special(address: IPAddress) -> bool:
    # is_global alone lets multicast (224/4, ff00::/8) and some reserved ranges through.
    return (address.is_multicast or address.is_reserved or address.is_unspecified
            or address.is_loopback or address.is_link_local or address.is_private)


def embedded_ipv4(address: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms
    that reach IPv4 hosts: ::ffff:a.b.c.d, 2002:AABB:CCDD::/48, 64:ff9b::/96."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & (_MAX_IPV4 - 1))
    return None


def parse_ip_literal(host: str) -> Optional[IPAddress]:
    """The address a URL host spells, or None for a domain name.

    `host` is as urllib.parse gives it (brackets removed). IPv4 follows the
    WHATWG URL host parser: 1 to 4 dot-separated numbers, each decimal, 0x-hex
    or 0-octal, the last filling the remaining bytes (so 2130706433,
    0x7f000001, 0177.0.0.1 and 127.1 all mean 127.0.0.1), one trailing dot allowed.
    """
    if ":" in host:
        return _parse_ipv6(host)
    parts = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not parts or not _is_number_part(parts[-1]):
        return None  # WHATWG: a host is IPv4 exactly when its last part is numeric
    return _ipv4_from_parts(parts)


def _parse_ipv6(host: str) -> IPAddress:
    try:
        return ipaddress.IPv6Address(host)
    except ValueError:
        raise AddressError("image URL host is not a valid IPv6 address") from None


def _is_number_part(part: str) -> bool:
    if part[:2].lower() == "0x":
        return all(char in "0123456789abcdefABCDEF" for char in part[2:])
    return part != "" and part.isascii() and part.isdigit()


def _parse_number(part: str) -> int:
    try:
        if part[:2].lower() == "0x":
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10)
    except ValueError:
        raise AddressError("image URL host is not a valid IPv4 address") from None


def _ipv4_from_parts(parts: list) -> ipaddress.IPv4Address:
    if len(parts) > 4:
        raise AddressError("image URL host is not a valid IPv4 address")
    numbers = [_parse_number(part) for part in parts]
    last_limit = 256 ** (5 - len(numbers))
    if any(number > 255 for number in numbers[:-1]) or numbers[-1] >= last_limit:
        raise AddressError("image URL host is not a valid IPv4 address")
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def is_localhost_name(host: str) -> bool:
    """RFC 6761: "localhost" and every name under it mean this machine."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


async def getaddrinfo(host: str, port: int) -> list:
    """The resolver (a module attribute so tests can replace it)."""
    loop = asyncio.get_running_loop()
    return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def resolve_checked(host: str, port: int, allow_private: bool) -> list:
    """The addresses to connect to for `host`, each one checked: refuses the
    whole host if any address it resolves to is not public (unless allowed)."""
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    elif is_localhost_name(host) and not allow_private:
        raise AddressError(_PRIVATE_MESSAGE)
    else:
        addresses = await _resolve(host, port)
    if not allow_private and not all(is_public_address(address) for address in addresses):
        raise AddressError(_PRIVATE_MESSAGE)
    return addresses


_PRIVATE_MESSAGE = ("image URL points to a loopback, private, link-local or otherwise non-public "
                    "address, which this server does not fetch (start it with "
                    "--allow-private-media-urls to allow them)")


async def _resolve(host: str, port: int) -> list:
    try:
        infos = await getaddrinfo(host, port)
    except (OSError, UnicodeError):
        raise AddressError("image URL host could not be resolved") from None
    addresses = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise AddressError("image URL host could not be resolved")
    return addresses
