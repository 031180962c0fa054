"""Certificate subjects in one comparable form: an RFC 4514 string from the settings
(``"CN=PACS1,O=Hospital"``) and the subject of a peer's certificate as :mod:`ssl` gives it."""

from __future__ import annotations

import re

#: The attribute names :meth:`ssl.SSLSocket.getpeercert` uses, by their RFC 4514 short names.
SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAILADDRESS", "serialNumber": "SERIALNUMBER",
}
# A separator (',' between RDNs, '+' inside one) not escaped by a backslash.
_SEPARATOR = re.compile(r"(?<!\\)([,+])")
_ESCAPED = re.compile(r"\\(.)")

Subject = tuple[tuple[tuple[str, str], ...], ...]


def _attribute(name: str, value: str) -> tuple[str, str]:
    return SHORT_NAMES.get(name.strip(), name.strip()).upper(), " ".join(value.split()).casefold()


def parse_subject(text: str) -> Subject:
    """Return the RFC 4514 subject ``text`` in comparable form (most specific RDN first,
    attribute names upper case, values case-folded with spaces collapsed).

    Raises ``ValueError`` when a part is not ``NAME=value``.
    """
    rdns: list[list[tuple[str, str]]] = [[]]
    parts = _SEPARATOR.split(text)
    for index, part in enumerate(parts):
        if index % 2:  # a separator
            if part == ",":
                rdns.append([])
            continue
        name, equals, value = part.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise ValueError(f"{text!r} is not an RFC 4514 subject such as 'CN=PACS1,O=Hospital'")
        rdns[-1].append(_attribute(name, _ESCAPED.sub(r"\1", value)))
    return tuple(tuple(sorted(rdn)) for rdn in rdns)


def certificate_subject(peer_certificate: dict | None) -> Subject | None:
    """Return the subject of ``peer_certificate`` (``SSLSocket.getpeercert()``) in the form of
    :func:`parse_subject`, or None when there is no validated certificate."""
    rdns = (peer_certificate or {}).get("subject")
    if not rdns:
        return None
    # The certificate lists its RDNs most general first; RFC 4514 strings, most specific first.
    return tuple(tuple(sorted(_attribute(name, value) for name, value in rdn)) for rdn in reversed(rdns))
