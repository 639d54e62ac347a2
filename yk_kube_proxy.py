#!/usr/bin/env python3
"""yubikey-kube-proxy: keep the key that opens a Kubernetes cluster on a YubiKey.

The client key of a kubeconfig moves into a slot of the YubiKey's PIV applet.
A proxy on localhost then relays each kubectl request over a fresh mutual-TLS
connection whose handshake the card signs, so pulling the key out stops access
at the next request.

Commands:
    setup   import the client key and certificate of a kubeconfig into a slot
            and write proxy.yml (for the proxy) and client.yml (for kubectl)
    proxy   relay kubectl's requests, a fresh card-signed TLS connection each
    shell   a subshell whose kubectl goes through a proxy of its own
    enroll  generate a key on the card; its certificate comes from the CSR API
    renew   a new certificate for the same on-card key
    status  show the cards, their slots, certificates and PIN tries left

Layers, each calling only the ones above it in this file: constants, errors,
value types, TLV/APDU encoding, the PC/SC transport, the PIV session, card
access, kubeconfig, card-backed TLS keys, upstream TLS, the HTTP relay, the
commands, and main().
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import enum
import errno
import getpass
import gzip
import hashlib
import hmac
import http
import http.client
import http.server
import io
import json
import logging
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:  # imported lazily where used
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificatePublicKeyTypes,
        PrivateKeyTypes,
    )

__version__ = "0.1.0"
__all__ = [
    "Card",
    "PivSession",
    "ProxyError",
    "ProxyServer",
    "Upstream",
    "main",
    "open_card",
]

log = logging.getLogger("yk_kube_proxy")

# =============================================================================
# Constants
# =============================================================================

PROG = "yubikey-kube-proxy"
EXTENSION_NAME = "yubikey-kube-proxy"
DEFAULT_PORT = 8080
DEFAULT_MANAGEMENT_KEY = bytes.fromhex(
    "010203040506070801020304050607080102030405060708"
)
EXPIRY_WARNING_DAYS = 30
CHUNK = 64 * 1024  # largest write on either side of the relay
HANDSHAKE_TIMEOUT = 30.0  # seconds: longer than a YubiKey's 15 s touch window
LOCAL_PKI_DAYS = 3650  # the local hop's certificates; setup makes new ones
TOUCH_REMINDER_SECONDS = 0.2
INSECURE_WARNING = (
    "insecure-skip-tls-verify is set: the API server's certificate is NOT "
    "checked, so anyone on the network path can impersonate it and use "
    "your card's signatures; remove it and set certificate-authority-data"
)
SHELL_ENV = "YUBIKEY_KUBE_PROXY_SHELL"  # set inside a shell, to refuse nesting
SHUTDOWN_GRACE_SECONDS = 10.0  # in-flight requests may finish after SIGTERM
# The local hop's limits (README, "Security model").
MAX_CONNECTIONS = 256  # local connections at once; further ones are closed at once
LOCAL_HANDSHAKE_TIMEOUT = 10.0  # seconds for a local client's TLS handshake
IDLE_TIMEOUT = 60.0  # seconds a local connection may wait before its next request
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its last header
BODY_TIMEOUT = 60.0  # seconds of silence allowed while a request body arrives
MAX_HEAD_BYTES = 65536  # request line and header fields, and again for trailers
MAX_HEADER_FIELDS = 100
MAX_CHUNKED_BODY = 8 * 1024 * 1024  # chunked request bodies are read whole first
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions
LINGER_SECONDS = 2.0  # after an error answer, read what the client still sends,
LINGER_BYTES = 1024 * 1024  # so that the answer arrives instead of a reset
REUSE_IDLE_SECONDS = 30.0  # pooled connections: below common server idle timeouts
CERTIFICATE_REFRESH_SECONDS = 60.0  # the slot's certificate is read again this often
MONITOR_WAKE_MS = 500  # the presence monitor follows a card to another reader
MONITOR_RETRY_SECONDS = 0.5  # after pcscd went away
LOOK_AGAIN_SECONDS = 1.0  # a pulled card shows as absent after pcscd's next poll
CLIENT_WATCH_MS = 250  # a stream's client watcher notices the stream's own end
PLAIN_HTTP_WARNING = (
    "the local hop is plain HTTP: any local user or program on this machine can "
    "send requests to the proxy and act as the card's identity; run setup again "
    "without --plain-http for mutual TLS"
)
MANAGEMENT_KEY_ENV = "YKP_MANAGEMENT_KEY"
MANAGEMENT_KEY_LENGTHS = (16, 24, 32)  # bytes: AES-128, 3DES or AES-192, AES-256
MAX_FILE_BYTES = 4 * 1024 * 1024  # a kubeconfig, certificate or key file
MAX_SECRET_FILE_BYTES = 4096  # a PIN or management-key file
# What the commands need, as pip names it: (distribution, module, minimum,
# exact version or None). Checked at start so that a missing one is named.
REQUIREMENTS = (
    ("pyscard", "smartcard", "2.0", None),
    ("tlslite-ng", "tlslite", "0.8.2", "0.8.2"),
    ("PyYAML", "yaml", "5.4", None),
    ("cryptography", "cryptography", "45", None),
)
PIN_RELOAD_HINTS = {  # how to make a running proxy read the PIN again
    "linux": "reload the proxy with kill -HUP or "
    f"'systemctl --user reload {PROG}', or restart it",
    "darwin": "reload the proxy with kill -HUP, or restart it",
    "win32": "restart the proxy",
}
# A name for client.yml's context, cluster and user and for the folder
# ~/.kube/yubikey/NAME: safe for kubectl, file systems and systemd instances.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
OUTPUT_ROOT = "~/.kube/yubikey"

# PIV application (NIST SP 800-73-4 part 2) and Yubico's extensions.
PIV_AID = bytes.fromhex("A000000308")
INS_VERIFY = 0x20
INS_GENERAL_AUTHENTICATE = 0x87
INS_SELECT = 0xA4
INS_GET_RESPONSE = 0xC0
INS_GET_DATA = 0xCB
INS_PUT_DATA = 0xDB
INS_IMPORT_KEY = 0xFE  # Yubico
INS_GET_VERSION = 0xFD  # Yubico
INS_GET_SERIAL = 0xF8  # Yubico, firmware 5+
INS_GET_METADATA = 0xF7  # Yubico, firmware 5.3+
INS_ATTEST = 0xF9  # Yubico, firmware 4.3+: keys generated on the card only
OID_ATTESTED_POLICY = "1.3.6.1.4.1.41482.3.8"  # two bytes: PIN policy, touch policy
INS_GENERATE_ASYMMETRIC = 0x47
INS_MOVE_KEY = 0xF6  # Yubico, firmware 5.7+; P1 0xFF deletes the key
MOVE_KEY_VERSION = (5, 7, 0)
CLA_CHAIN = 0x10

TAG_DYN_AUTH = 0x7C
TAG_AUTH_WITNESS = 0x80
TAG_AUTH_CHALLENGE = 0x81
TAG_AUTH_RESPONSE = 0x82
TAG_OBJ_ID = 0x5C
TAG_OBJ_DATA = 0x53
TAG_CERTIFICATE = 0x70
TAG_CERT_INFO = 0x71
TAG_LRC = 0xFE
TAG_PIN_POLICY = 0xAA
TAG_TOUCH_POLICY = 0xAB
TAG_META_ALGORITHM = 0x01
TAG_META_POLICY = 0x02
TAG_META_ORIGIN = 0x03
TAG_META_PUBLIC_KEY = 0x04
TAG_META_IS_DEFAULT = 0x05
TAG_META_RETRIES = 0x06
TAG_GEN_TEMPLATE = 0xAC
TAG_GEN_ALGORITHM = 0x80
TAG_PUBLIC_KEY = 0x7F49

KEY_PIN = 0x80
KEY_MANAGEMENT = 0x9B

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_STATUS = 0x6982
SW_AUTH_BLOCKED = 0x6983
SW_CONDITIONS = 0x6985
SW_INCORRECT_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_REFERENCE_NOT_FOUND = 0x6A88
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00

SW_TEXT = {
    SW_WRONG_LENGTH: "wrong length",
    SW_SECURITY_STATUS: "security status not satisfied",
    SW_AUTH_BLOCKED: "authentication method blocked",
    SW_CONDITIONS: "conditions of use not satisfied",
    SW_INCORRECT_DATA: "incorrect data or unsupported algorithm",
    SW_FILE_NOT_FOUND: "object not found",
    SW_REFERENCE_NOT_FOUND: "referenced data not found",
    SW_INS_NOT_SUPPORTED: "instruction not supported",
    SW_CLA_NOT_SUPPORTED: "class not supported",
}

# Commands whose data must never reach a log: PIN, PUK, keys.
SECRET_INS = {0x20, 0x24, 0x2C, INS_IMPORT_KEY, 0xFF}

# PC/SC return codes we turn into messages (winscard.h).
SCARD_E_SHARING_VIOLATION = 0x8010000B
SCARD_E_NO_SMARTCARD = 0x8010000C
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_E_SERVICE_STOPPED = 0x8010001E
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
SCARD_W_REMOVED_CARD = 0x80100069
SCARD_W_RESET_CARD = 0x80100068
SCARD_E_INVALID_HANDLE = 0x80100003
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_CANCELLED = 0x80100002
SCARD_E_UNKNOWN_READER = 0x80100009
SCARD_E_READER_UNAVAILABLE = 0x80100017
SCARD_STATE_UNAWARE = 0x00
SCARD_STATE_CHANGED = 0x02
SCARD_STATE_PRESENT = 0x20
SCARD_CARD_GONE = {SCARD_E_NO_SMARTCARD, SCARD_W_REMOVED_CARD, 0x80100017, 0x80100009}
PCSC_SERVICE_ADVICE = {  # SCARD_E_NO_SERVICE, by platform
    "linux": "cannot reach the PC/SC daemon (pcscd): start it with "
    "'sudo systemctl start pcscd.socket' (or install the pcscd package)",
    "darwin": "the macOS smart card service is not available: plug the YubiKey in "
    "(macOS starts the service when a reader appears) and try again",
    "win32": "the Windows Smart Card service is not running: insert the YubiKey, or "
    "start the 'Smart Card' service (services.msc) and try again",
}
PCSC_SERVICE_NAMES = {  # what restarted, and what to restart, by platform
    "linux": "pcscd",
    "darwin": "the macOS smart card service",
    "win32": "the Windows Smart Card service",
}
BUSY_SUSPECTS = (
    "scdaemon/gpg-agent (add 'disable-ccid' or 'pcsc-shared' to ~/.gnupg/scdaemon.conf "
    "and run 'gpgconf --kill scdaemon'), yubikey-agent, or another ykman/PKCS#11 session"
)


def host_platform() -> str:
    """'darwin', 'win32' or 'linux' (any other Unix): the one seam through which
    the tests fake the platforms they cannot run on."""
    return sys.platform if sys.platform in ("darwin", "win32") else "linux"


# =============================================================================
# Errors
# =============================================================================


class ProxyError(Exception):
    """An error a user can act on; its text is one complete sentence."""

    exit_code = 1
    http_status = 502


class ConfigError(ProxyError):
    """The kubeconfig, a file or a command-line value is unusable."""


class CardError(ProxyError):
    """The card or the PC/SC stack failed."""

    http_status = 503


class NoCardError(CardError):
    """No matching YubiKey is inserted."""


class PcscFailure(CardError):
    """A PC/SC call failed with a code that does not say what happened; the card
    layer looks again (reader, presence, serial) before reporting it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class CardBusyError(CardError):
    """Another program holds the card exclusively."""


class TransientCardError(CardError):
    """The card was reset by another program or pcscd restarted: reconnecting
    and repeating the operation is safe."""


class ApduError(CardError):
    """The card answered a command with a status word other than 9000."""

    def __init__(self, message: str, sw: int) -> None:
        super().__init__(message)
        self.sw = sw


class PinError(CardError):
    """The PIN was rejected or is blocked; never retried automatically."""

    def __init__(self, message: str, attempts_remaining: int) -> None:
        super().__init__(message)
        self.attempts_remaining = attempts_remaining


class ManagementKeyError(CardError):
    """The management key did not authenticate."""


class KeyMismatchError(ProxyError):
    """A private key and a certificate (or a card's key) do not belong together."""


# =============================================================================
# Files the user names: regular files of bounded size, never a blocking open
# =============================================================================


def read_user_file(
    path: Path, what: str, fix: str, limit: int = MAX_FILE_BYTES
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. FIFOs, devices and
    directories are refused before reading: the open does not block."""
    import stat

    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except ValueError:
        raise ConfigError(
            f"cannot read {what} {str(path)!r}: the path contains a NUL byte; {fix}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}; {fix}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO"}.get(
                stat.S_IFMT(mode), "not a regular file"
            )
            raise ConfigError(f"cannot read {what} {path}: it is {kind}; {fix}")
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}; {fix}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(
            f"cannot read {what} {path}: it is larger than {limit} bytes; {fix}"
        )
    return data


def read_user_text(path: Path, what: str, fix: str, limit: int = MAX_FILE_BYTES) -> str:
    """A file as UTF-8 text; binary content is refused with a message."""
    try:
        return read_user_file(path, what, fix, limit).decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}); {fix}"
        ) from None


# =============================================================================
# Value types
# =============================================================================


class KeyAlgorithm(enum.IntEnum):
    """PIV algorithm identifiers (SP 800-78 and Yubico)."""

    TDES = 0x03
    AES128 = 0x08
    AES192 = 0x0A
    AES256 = 0x0C
    RSA1024 = 0x06
    RSA2048 = 0x07
    RSA3072 = 0x05
    RSA4096 = 0x16
    ECCP256 = 0x11
    ECCP384 = 0x14
    ED25519 = 0xE0
    X25519 = 0xE1  # key agreement only: it cannot sign


class PinPolicy(enum.IntEnum):
    DEFAULT = 0
    NEVER = 1
    ONCE = 2
    ALWAYS = 3


class TouchPolicy(enum.IntEnum):
    DEFAULT = 0
    NEVER = 1
    ALWAYS = 2
    CACHED = 3


ALGORITHM_NAMES: dict[int, str] = {
    KeyAlgorithm.RSA1024: "RSA-1024",
    KeyAlgorithm.RSA2048: "RSA-2048",
    KeyAlgorithm.RSA3072: "RSA-3072",
    KeyAlgorithm.RSA4096: "RSA-4096",
    KeyAlgorithm.ECCP256: "EC P-256",
    KeyAlgorithm.ECCP384: "EC P-384",
    KeyAlgorithm.ED25519: "Ed25519",
    KeyAlgorithm.X25519: "X25519",
    KeyAlgorithm.TDES: "3DES",
    KeyAlgorithm.AES128: "AES-128",
    KeyAlgorithm.AES192: "AES-192",
    KeyAlgorithm.AES256: "AES-256",
}
# Algorithms a YubiKey accepts for import, with the firmware that brought them.
IMPORTABLE = {
    KeyAlgorithm.RSA2048: (4, 0, 0),
    KeyAlgorithm.ECCP256: (4, 0, 0),
    KeyAlgorithm.ECCP384: (4, 0, 0),
    KeyAlgorithm.RSA3072: (5, 7, 0),
    KeyAlgorithm.RSA4096: (5, 7, 0),
    KeyAlgorithm.ED25519: (5, 7, 0),
}
MANAGEMENT_KEY_SIZES = {
    KeyAlgorithm.TDES: 24,
    KeyAlgorithm.AES128: 16,
    KeyAlgorithm.AES192: 24,
    KeyAlgorithm.AES256: 32,
}
ORIGIN_GENERATED = 1
ORIGINS = {ORIGIN_GENERATED: "generated on card", 2: "imported"}
RSA_SIZES = {
    KeyAlgorithm.RSA1024: 128,
    KeyAlgorithm.RSA2048: 256,
    KeyAlgorithm.RSA3072: 384,
    KeyAlgorithm.RSA4096: 512,
}


@dataclasses.dataclass(frozen=True)
class Slot:
    """A PIV key reference paired with the data object holding its certificate."""

    key: int
    object_id: int

    @property
    def name(self) -> str:
        return f"{self.key:02x}"


SLOTS = {
    "9a": Slot(0x9A, 0x5FC105),
    "9c": Slot(0x9C, 0x5FC10A),
    "9d": Slot(0x9D, 0x5FC10B),
    "9e": Slot(0x9E, 0x5FC101),
    **{f"{0x82 + i:02x}": Slot(0x82 + i, 0x5FC10D + i) for i in range(20)},
}


def parse_slot(text: str) -> Slot:
    """Return the slot named like ``9a`` or ``0x9a`` (retired slots 82-95 too)."""
    name = text.lower().removeprefix("0x")
    if name not in SLOTS:
        raise ConfigError(
            f"unknown PIV slot {text!r}: use 9a, 9c, 9d, 9e or a retired slot 82-95"
        )
    return SLOTS[name]


@dataclasses.dataclass(frozen=True)
class SlotMetadata:
    """What GET METADATA tells about a key slot (firmware 5.3+)."""

    algorithm: KeyAlgorithm | int  # an int when we do not know it
    pin_policy: PinPolicy
    touch_policy: TouchPolicy
    origin: str
    public_key: bytes  # the raw 04 TLV content


@dataclasses.dataclass(frozen=True)
class CardInfo:
    reader: str
    serial: int | None
    version: tuple[int, int, int]

    @property
    def firmware(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> str:
        serial = self.serial if self.serial is not None else "unknown"
        return f"YubiKey serial {serial} (firmware {self.firmware}) in reader {self.reader!r}"


# =============================================================================
# TLV and APDU encoding (pure functions)
# =============================================================================


def key_words(algorithm: int) -> str:
    """'an EC P-256 key', 'an X25519 key', 'a key of unknown type 0x42'."""
    if algorithm in ALGORITHM_NAMES:
        return f"{with_article(ALGORITHM_NAMES[algorithm])} key"
    return f"a key of unknown type 0x{algorithm:02X}"


def with_article(word: str) -> str:
    """'an EC P-256', 'an RSA-2048', 'a 3DES': by how the name is spoken."""
    return f"{'an' if word[:1] in 'AEFHILMNORSX' else 'a'} {word}"


def encode_length(n: int) -> bytes:
    """BER length: one byte below 128, else 0x81 or 0x82 and the length."""
    if n < 0x80:
        return bytes([n])
    if n <= 0xFF:
        return bytes([0x81, n])
    if n <= 0xFFFF:
        return bytes([0x82]) + n.to_bytes(2, "big")
    raise ValueError(f"TLV value of {n} bytes is too long")


def tlv(tag: int, value: bytes = b"") -> bytes:
    """Encode one BER-TLV; tags above 0xFF (0x7F49, 0x5FC105) take more bytes."""
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    return tag_bytes + encode_length(len(value)) + value


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    """Decode concatenated BER-TLVs into {tag: value}; the first of a tag wins."""
    result: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        tag = data[pos]
        pos += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag
            while True:
                if pos >= len(data):
                    raise ValueError("truncated TLV tag")
                tag = (tag << 8) | data[pos]
                pos += 1
                if not data[pos - 1] & 0x80:
                    break
        if pos >= len(data):
            raise ValueError("truncated TLV length")
        length = data[pos]
        pos += 1
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise ValueError("TLV value runs past the end of the data")
        result.setdefault(tag, data[pos : pos + length])
        pos += length
    return result


def encode_apdu(cla: int, ins: int, p1: int, p2: int, data: bytes, le: bool) -> bytes:
    """A short APDU (ISO 7816-4); ``le`` asks for up to 256 bytes back."""
    apdu = bytes([cla, ins, p1, p2])
    if data:
        apdu += bytes([len(data)]) + data
    if le:
        apdu += b"\x00"
    return apdu


def pin_block(pin: str) -> bytes:
    """The PIN as ASCII, padded with 0xFF to 8 bytes (SP 800-73-4 part 2, 3.2.1)."""
    raw = pin.encode()
    if not 6 <= len(raw) <= 8:
        raise ConfigError("a PIV PIN has 6 to 8 characters: check the PIN you entered")
    return raw.ljust(8, b"\xff")


def sw_text(sw: int) -> str:
    if sw >> 8 == 0x63:
        return f"verification failed, {sw & 0x0F} tries left"
    return SW_TEXT.get(sw, "unexpected status")


# =============================================================================
# Key material helpers (cryptography)
# =============================================================================


def key_algorithm(key: Any) -> KeyAlgorithm:
    """The PIV algorithm for a cryptography private or public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        curves = {"secp256r1": KeyAlgorithm.ECCP256, "secp384r1": KeyAlgorithm.ECCP384}
        if key.curve.name in curves:
            return curves[key.curve.name]
        kind = f"an EC {key.curve.name} key"
    elif isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        sizes = {
            2048: KeyAlgorithm.RSA2048,
            3072: KeyAlgorithm.RSA3072,
            4096: KeyAlgorithm.RSA4096,
        }
        if key.key_size in sizes:
            return sizes[key.key_size]
        kind = f"an RSA-{key.key_size} key"
    elif isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return KeyAlgorithm.ED25519
    else:
        kind = f"a {type(key).__name__}"
    raise ConfigError(
        f"the client key is {kind}, which a YubiKey cannot hold: supported are EC P-256, "
        "EC P-384, RSA-2048 and (firmware 5.7+) RSA-3072, RSA-4096 and Ed25519"
    )


def import_key_data(key: Any) -> bytes:
    """The IMPORT KEY payload for a private key (Yubico PIV extension)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return tlv(0x06, key.private_numbers().private_value.to_bytes(size, "big"))
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        half = key.key_size // 16
        parts = (numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)
        return b"".join(
            tlv(tag, v.to_bytes(half, "big")) for tag, v in enumerate(parts, 1)
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return tlv(0x07, key.private_bytes_raw())
    raise ConfigError(
        f"cannot import a {type(key).__name__} into a YubiKey: use an EC, RSA or Ed25519 key"
    )


def can_sign(algorithm: KeyAlgorithm | int) -> bool:
    return algorithm in RSA_SIZES or algorithm in IMPORTABLE


def public_key_from_metadata(
    algorithm: KeyAlgorithm | int, data: bytes
) -> CertificatePublicKeyTypes | None:
    """Rebuild a cryptography public key from GET METADATA's public-key TLVs;
    None for a key type we do not know."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

    tlvs = parse_tlvs(data)
    if algorithm == KeyAlgorithm.X25519:
        return x25519.X25519PublicKey.from_public_bytes(tlvs[0x86])
    if not can_sign(algorithm):
        return None
    if algorithm in (KeyAlgorithm.ECCP256, KeyAlgorithm.ECCP384):
        curve = ec.SECP256R1() if algorithm == KeyAlgorithm.ECCP256 else ec.SECP384R1()
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, tlvs[0x86])
    if algorithm == KeyAlgorithm.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(tlvs[0x86])
    n, e = (int.from_bytes(tlvs[t], "big") for t in (0x81, 0x82))
    return rsa.RSAPublicNumbers(e, n).public_key()


def same_public_key(a: Any, b: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


# DigestInfo prefixes for EMSA-PKCS1-v1_5 (RFC 8017, 9.2 note 1).
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def pkcs1v15_block(digest: bytes, hash_name: str, modulus_bytes: int) -> bytes:
    """The padded block a raw RSA signature takes: 00 01 FF.. 00 DigestInfo."""
    t = DIGEST_INFO[hash_name] + digest
    if modulus_bytes < len(t) + 11:
        raise ValueError("RSA modulus too short for this digest")
    return b"\x00\x01" + b"\xff" * (modulus_bytes - len(t) - 3) + b"\x00" + t


def ecdsa_input(digest: bytes, size: int) -> bytes:
    """An ECDSA digest cut or left-padded to the curve size, as PIV wants it."""
    return digest[:size].rjust(size, b"\x00")


def management_cipher(algorithm: KeyAlgorithm, key: bytes) -> Any:
    """An ECB cipher for the management-key challenge-response."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if algorithm == KeyAlgorithm.TDES:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        return Cipher(TripleDES(key), modes.ECB())
    return Cipher(algorithms.AES(key), modes.ECB())


# PKCS#10 signature algorithms (RFC 5758, RFC 4055, RFC 8410): DER of the
# AlgorithmIdentifier and the hash the card's signature covers.
CSR_SIGNATURE_ALGORITHMS = {
    KeyAlgorithm.ECCP256: (bytes.fromhex("300a06082a8648ce3d040302"), "sha256"),
    KeyAlgorithm.ECCP384: (bytes.fromhex("300a06082a8648ce3d040303"), "sha384"),
    KeyAlgorithm.RSA2048: (bytes.fromhex("300d06092a864886f70d01010b0500"), "sha256"),
    KeyAlgorithm.ED25519: (bytes.fromhex("300506032b6570"), "sha512"),
}


def der(tag: int, content: bytes) -> bytes:
    """One DER element (lengths as in BER-TLV, which are minimal)."""
    return bytes([tag]) + encode_length(len(content)) + content


def csr_info(subject: Any, public_key: Any) -> bytes:
    """CertificationRequestInfo (RFC 2986 4.1): version 0, subject, key, no attributes."""
    from cryptography.hazmat.primitives import serialization

    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der(
        0x30, der(0x02, b"\x00") + subject.public_bytes() + spki + der(0xA0, b"")
    )


def csr_der(info: bytes, algorithm: KeyAlgorithm, signature: bytes) -> bytes:
    """CertificationRequest: the info, the algorithm and the card's signature."""
    identifier = CSR_SIGNATURE_ALGORITHMS[algorithm][0]
    return der(0x30, info + identifier + der(0x03, b"\x00" + signature))


# =============================================================================
# Card transport: PC/SC through pyscard, behind a small interface
# =============================================================================


class Transport(Protocol):
    """The seam between the PIV session and the reader."""

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        """Send one APDU; return the response data and the status word."""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Keep other programs' APDUs out for the duration of the block."""

    def close(self) -> None: ...


def _scard() -> Any:
    try:
        from smartcard import scard
    except ImportError as exc:
        raise CardError(
            f"cannot import pyscard ({exc}): install yubikey-kube-proxy with pip or pipx, "
            "or 'pip install pyscard'"
        ) from None
    return scard


def pcsc_error(hresult: int, reader: str = "") -> CardError:
    """Turn a PC/SC return code into an error that says what to do."""
    code = hresult & 0xFFFFFFFF
    where = f" in reader {reader!r}" if reader else ""
    if code == SCARD_W_RESET_CARD:
        return TransientCardError(
            f"the card{where} was reset by another program (0x{code:08X}): try again"
        )
    if code in (SCARD_E_INVALID_HANDLE, SCARD_E_SERVICE_STOPPED):
        service = PCSC_SERVICE_NAMES[host_platform()]
        return TransientCardError(f"{service} restarted (0x{code:08X}): try again")
    if code == SCARD_E_NO_SERVICE:  # macOS says so spuriously mid-session: retried
        platform = host_platform()
        error = TransientCardError if platform == "darwin" else CardError
        return error(PCSC_SERVICE_ADVICE[platform])
    if code in SCARD_CARD_GONE:
        return NoCardError(f"YubiKey not present{where} - insert it")
    if code == SCARD_E_SHARING_VIOLATION:
        return CardBusyError(
            f"the YubiKey{where} is held exclusively by another program, usually "
            f"{BUSY_SUSPECTS}: close it and try again"
        )
    message = _scard().SCardGetErrorMessage(hresult)
    return PcscFailure(
        f"PC/SC error 0x{code:08X}{where}: {message.strip()}; reinsert the YubiKey, "
        f"and if it persists restart {PCSC_SERVICE_NAMES[host_platform()]}",
        code,
    )


class PcscContext:
    """A PC/SC resource-manager context: lists readers and their card presence."""

    def __init__(self) -> None:
        self._scard = _scard()
        hresult, self.handle = self._scard.SCardEstablishContext(
            self._scard.SCARD_SCOPE_USER
        )
        if hresult != 0:
            raise pcsc_error(hresult)

    def readers(self) -> list[str]:
        hresult, names = self._scard.SCardListReaders(self.handle, [])
        if hresult & 0xFFFFFFFF == SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult != 0:
            raise pcsc_error(hresult)
        return list(names)

    def card_present(self, reader: str) -> bool:
        state = self.wait_change(reader, SCARD_STATE_UNAWARE, 0)
        return bool(state is not None and state & SCARD_STATE_PRESENT)

    def wait_change(self, reader: str, known: int, timeout_ms: int) -> int | None:
        """The reader's state (dwEventState: flags, and pcsc-lite's event counter in
        the high word) once it differs from ``known``, or ``known`` after the
        timeout or SCardCancel; None when the reader is gone."""
        hresult, states = self._scard.SCardGetStatusChange(
            self.handle, timeout_ms, [(reader, known)]
        )
        code = hresult & 0xFFFFFFFF
        if code in (SCARD_E_TIMEOUT, SCARD_E_CANCELLED):
            return known
        if code in (SCARD_E_UNKNOWN_READER, SCARD_E_READER_UNAVAILABLE):
            return None
        if code != 0:
            raise pcsc_error(hresult, reader)
        return states[0][1] & ~SCARD_STATE_CHANGED

    def cancel(self) -> None:
        """Wake a wait_change() in another thread."""
        if self.handle is not None:
            self._scard.SCardCancel(self.handle)

    def connect(self, reader: str) -> PcscTransport:
        sc = self._scard
        hresult, hcard, protocol = sc.SCardConnect(
            self.handle,
            reader,
            sc.SCARD_SHARE_SHARED,
            sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1,
        )
        if hresult != 0:
            raise pcsc_error(hresult, reader)
        return PcscTransport(sc, hcard, protocol, reader)

    def close(self) -> None:
        if self.handle is not None:
            self._scard.SCardReleaseContext(self.handle)
            self.handle = None


class PcscTransport:
    """One shared connection to a card; the only place bytes meet pyscard's lists."""

    def __init__(self, sc: Any, hcard: Any, protocol: int, reader: str) -> None:
        self._sc = sc
        self._hcard = hcard
        self._pci = (
            sc.SCARD_PCI_T1 if protocol == sc.SCARD_PROTOCOL_T1 else sc.SCARD_PCI_T0
        )
        self.reader = reader

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        hresult, response = self._sc.SCardTransmit(self._hcard, self._pci, list(apdu))
        if hresult != 0:
            raise pcsc_error(hresult, self.reader)
        if len(response) < 2:
            raise PcscFailure(
                f"the card in reader {self.reader!r} sent a truncated answer: "
                "reinsert the YubiKey and try again",
                0,
            )
        return bytes(response[:-2]), (response[-2] << 8) | response[-1]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        hresult = self._sc.SCardBeginTransaction(self._hcard)
        if hresult != 0:
            raise pcsc_error(hresult, self.reader)
        try:
            yield
        finally:
            self._sc.SCardEndTransaction(self._hcard, self._sc.SCARD_LEAVE_CARD)

    def close(self) -> None:
        if self._hcard is not None:
            self._sc.SCardDisconnect(self._hcard, self._sc.SCARD_LEAVE_CARD)
            self._hcard = None


# =============================================================================
# PIV session: one method per card operation
# =============================================================================


class PivSession:
    """PIV commands over a transport. Callers hold the card lock and a transaction."""

    def __init__(self, transport: Transport, reader: str = "") -> None:
        self._transport = transport
        self.reader = reader
        self.version: tuple[int, int, int] = (0, 0, 0)

    # -- framing ---------------------------------------------------------------

    def send(
        self,
        ins: int,
        p1: int,
        p2: int,
        data: bytes = b"",
        *,
        le: bool = True,
        what: str = "",
    ) -> bytes:
        """Send a command with chaining; collect 61xx continuations; raise on error."""
        response, sw = self._send_chained(ins, p1, p2, data, le)
        while sw >> 8 == 0x61:
            more, sw = self._transmit(encode_apdu(0, INS_GET_RESPONSE, 0, 0, b"", True))
            response += more
        if sw != SW_OK:
            raise self.error(sw, what or f"command {ins:02X}")
        return response

    def _send_chained(
        self, ins: int, p1: int, p2: int, data: bytes, le: bool
    ) -> tuple[bytes, int]:
        while len(data) > 255:
            chunk, data = data[:255], data[255:]
            response, sw = self._transmit(
                encode_apdu(CLA_CHAIN, ins, p1, p2, chunk, False)
            )
            if sw != SW_OK:
                return response, sw
        return self._transmit(encode_apdu(0, ins, p1, p2, data, le))

    def _transmit(self, apdu: bytes) -> tuple[bytes, int]:
        if log.isEnabledFor(logging.DEBUG):
            body = "<redacted>" if apdu[1] in SECRET_INS else apdu[4:].hex()
            log.debug("APDU > %s %s", apdu[:4].hex(), body)
        data, sw = self._transport.transmit(apdu)
        if log.isEnabledFor(logging.DEBUG):
            secret = (
                apdu[1] in (INS_GENERAL_AUTHENTICATE,) and apdu[3] == KEY_MANAGEMENT
            )
            log.debug("APDU < %s %04X", "<redacted>" if secret else data.hex(), sw)
        return data, sw

    def error(self, sw: int, what: str) -> ApduError:
        """The one place status words become typed errors."""
        where = f" (reader {self.reader!r})" if self.reader else ""
        return ApduError(
            f"the YubiKey refused {what}{where}: {sw_text(sw)} (SW {sw:04X})", sw
        )

    # -- identity ----------------------------------------------------------------

    def select(self) -> None:
        """SELECT the PIV application; cards without it are not PIV cards."""
        try:
            self.send(INS_SELECT, 0x04, 0x00, PIV_AID, what="SELECT PIV")
        except ApduError as exc:
            raise CardError(
                f"the card in reader {self.reader!r} has no PIV application "
                f"(SW {exc.sw:04X}): is it a YubiKey 4 or 5?"
            ) from None
        self.version = self.get_version()

    def get_version(self) -> tuple[int, int, int]:
        data = self.send(INS_GET_VERSION, 0, 0, what="GET VERSION")
        return (data[0], data[1], data[2])

    def get_serial(self) -> int | None:
        """The serial number (firmware 5+; None when the card hides it)."""
        try:
            return int.from_bytes(
                self.send(INS_GET_SERIAL, 0, 0, what="GET SERIAL"), "big"
            )
        except ApduError:
            return None

    def has_metadata(self) -> bool:
        return self.version >= (5, 3, 0)

    def get_metadata(self, key: int) -> dict[int, bytes] | None:
        """GET METADATA for a key reference; None for an empty slot."""
        try:
            return parse_tlvs(self.send(INS_GET_METADATA, 0, key, what="GET METADATA"))
        except ApduError as exc:
            if exc.sw == SW_REFERENCE_NOT_FOUND:
                return None
            raise

    def slot_metadata(self, slot: Slot) -> SlotMetadata | None:
        meta = self.get_metadata(slot.key)
        if meta is None:
            return None
        policy = meta.get(TAG_META_POLICY, b"\x00\x00")
        algorithm: KeyAlgorithm | int = meta[TAG_META_ALGORITHM][0]
        with contextlib.suppress(ValueError):
            algorithm = KeyAlgorithm(algorithm)
        return SlotMetadata(
            algorithm=algorithm,
            pin_policy=PinPolicy(policy[0]),
            touch_policy=TouchPolicy(policy[1]),
            origin=ORIGINS.get(meta.get(TAG_META_ORIGIN, b"\x00")[0], "unknown"),
            public_key=meta.get(TAG_META_PUBLIC_KEY, b""),
        )

    def attested_policies(self, slot: Slot) -> tuple[PinPolicy, TouchPolicy] | None:
        """The key's policies from its attestation certificate; None for a key the
        card cannot attest (imported, or a card without ATTEST)."""
        from cryptography import x509

        try:
            der = self.send(INS_ATTEST, slot.key, 0, what="ATTEST")
        except ApduError:
            return None
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
            oid = x509.ObjectIdentifier(OID_ATTESTED_POLICY)
            ext = cert.extensions.get_extension_for_oid(oid).value
            policy = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
            return PinPolicy(policy[0]), TouchPolicy(policy[1])
        except x509.ExtensionNotFound:
            return None
        except (ValueError, IndexError):
            raise CardError(
                f"the attestation of slot {slot.name} is not a certificate with the "
                "key's policies: reinsert the YubiKey and try again"
            ) from None

    # -- PIN ---------------------------------------------------------------------

    def pin_tries_left(self) -> int | None:
        """Tries left, without using one (metadata, else the empty VERIFY probe)."""
        if self.has_metadata():
            meta = self.get_metadata(KEY_PIN)
            if meta and TAG_META_RETRIES in meta:
                return meta[TAG_META_RETRIES][1]
        _, sw = self._transmit(encode_apdu(0, INS_VERIFY, 0, KEY_PIN, b"", False))
        if sw >> 4 == 0x63C:
            return sw & 0x0F
        return 0 if sw == SW_AUTH_BLOCKED else None

    def pin_verified(self) -> bool:
        """The empty VERIFY probe: True when the PIN is verified in this session."""
        _, sw = self._transmit(encode_apdu(0, INS_VERIFY, 0, KEY_PIN, b"", False))
        return sw == SW_OK

    def verify_pin(self, pin: str) -> None:
        """VERIFY the PIN once. A rejection raises PinError; the caller never retries."""
        _, sw = self._transmit(
            encode_apdu(0, INS_VERIFY, 0, KEY_PIN, pin_block(pin), False)
        )
        if sw == SW_OK:
            return
        if sw == SW_AUTH_BLOCKED or sw == 0x63C0:
            raise PinError(
                "the PIN is blocked: unblock it with the PUK "
                "('ykman piv access unblock-pin' or 'yubico-piv-tool -a unblock-pin')",
                0,
            )
        if sw >> 4 == 0x63C:
            left = sw & 0x0F
            raise PinError(
                f"wrong PIN: the YubiKey has {left} tries left before it blocks the PIN; "
                "check the PIN (or the PIN file) and try again",
                left,
            )
        raise self.error(sw, "VERIFY PIN")

    # -- management key ------------------------------------------------------------

    def management_algorithm(self) -> KeyAlgorithm:
        """The management key's algorithm: firmware 5.7 defaults to AES-192."""
        if self.has_metadata():
            meta = self.get_metadata(KEY_MANAGEMENT)
            if meta and TAG_META_ALGORITHM in meta:
                return KeyAlgorithm(meta[TAG_META_ALGORITHM][0])
        return KeyAlgorithm.TDES

    def management_key_is_default(self) -> bool | None:
        """Whether the management key is still the factory key (GET METADATA,
        firmware 5.3+); None when the card cannot tell."""
        meta = self.get_metadata(KEY_MANAGEMENT) if self.has_metadata() else None
        if not meta or TAG_META_IS_DEFAULT not in meta:
            return None
        return meta[TAG_META_IS_DEFAULT] == b"\x01"

    def authenticate(self, key: bytes) -> None:
        """Mutual authentication with the management key (SP 800-73-4 part 2, 3.2.4)."""
        algorithm = self.management_algorithm()
        if len(key) != MANAGEMENT_KEY_SIZES[algorithm]:
            raise ManagementKeyError(
                f"this YubiKey's management key is {ALGORITHM_NAMES[algorithm]} "
                f"({MANAGEMENT_KEY_SIZES[algorithm]} bytes) but the key given has "
                f"{len(key)} bytes: pass the right one with --management-key-file PATH"
            )
        cipher = management_cipher(algorithm, key)
        witness = self._dyn_auth(algorithm, tlv(TAG_AUTH_WITNESS))[TAG_AUTH_WITNESS]
        decryptor = cipher.decryptor()
        answer = decryptor.update(witness) + decryptor.finalize()
        challenge = secrets.token_bytes(len(witness))
        try:
            reply = self._dyn_auth(
                algorithm,
                tlv(TAG_AUTH_WITNESS, answer) + tlv(TAG_AUTH_CHALLENGE, challenge),
            )
        except ApduError as exc:
            if exc.sw in (SW_SECURITY_STATUS, SW_INCORRECT_DATA, SW_AUTH_BLOCKED):
                raise ManagementKeyError(
                    "the YubiKey rejected the management key: pass the card's key with "
                    f"--management-key-file PATH or {MANAGEMENT_KEY_ENV} (the factory "
                    "key is the default)"
                ) from None
            raise
        encryptor = cipher.encryptor()
        expected = encryptor.update(challenge) + encryptor.finalize()
        if not hmac.compare_digest(reply.get(TAG_AUTH_RESPONSE, b""), expected):
            raise ManagementKeyError(
                "the card's answer to our management-key challenge is wrong: "
                "this is not the YubiKey it claims to be, or it is faulty"
            )

    def _dyn_auth(self, algorithm: int, content: bytes) -> dict[int, bytes]:
        reply = self.send(
            INS_GENERAL_AUTHENTICATE,
            algorithm,
            KEY_MANAGEMENT,
            tlv(TAG_DYN_AUTH, content),
            what="management-key authentication",
        )
        return parse_tlvs(parse_tlvs(reply).get(TAG_DYN_AUTH, b""))

    # -- keys and certificates ----------------------------------------------------

    def import_key(
        self,
        slot: Slot,
        private_key: Any,
        pin_policy: PinPolicy,
        touch_policy: TouchPolicy,
    ) -> None:
        """IMPORT a private key into a slot. Requires management-key authentication."""
        algorithm = key_algorithm(private_key)
        needed = IMPORTABLE[algorithm]
        if self.version < needed:
            raise ConfigError(
                f"{ALGORITHM_NAMES[algorithm]} keys need YubiKey firmware "
                f"{'.'.join(map(str, needed))} or later; this card has "
                f"{'.'.join(map(str, self.version))}"
            )
        data = import_key_data(private_key)
        data += tlv(TAG_PIN_POLICY, bytes([pin_policy]))
        data += tlv(TAG_TOUCH_POLICY, bytes([touch_policy]))
        self.send(
            INS_IMPORT_KEY,
            algorithm,
            slot.key,
            data,
            le=False,
            what=f"the key import into slot {slot.name}",
        )

    def generate_key(
        self,
        slot: Slot,
        algorithm: KeyAlgorithm,
        pin_policy: PinPolicy,
        touch_policy: TouchPolicy,
    ) -> Any:
        """GENERATE ASYMMETRIC KEY PAIR in a slot (SP 800-73-4 part 2, 3.3.2); the
        key never leaves the card. Requires management-key authentication."""
        needed = IMPORTABLE[algorithm]
        if self.version < needed:
            raise ConfigError(
                f"{ALGORITHM_NAMES[algorithm]} keys need YubiKey firmware "
                f"{'.'.join(map(str, needed))} or later; this card has "
                f"{'.'.join(map(str, self.version))}"
            )
        template = tlv(TAG_GEN_ALGORITHM, bytes([algorithm]))
        template += tlv(TAG_PIN_POLICY, bytes([pin_policy]))
        template += tlv(TAG_TOUCH_POLICY, bytes([touch_policy]))
        reply = self.send(
            INS_GENERATE_ASYMMETRIC,
            0,
            slot.key,
            tlv(TAG_GEN_TEMPLATE, template),
            what=f"generating a key in slot {slot.name}",
        )
        return public_key_from_metadata(algorithm, parse_tlvs(reply)[TAG_PUBLIC_KEY])

    def move_key(self, source: Slot, target: Slot | None) -> None:
        """Yubico MOVE KEY (firmware 5.7+): the key of ``source`` into the empty
        ``target``, or DELETE KEY when ``target`` is None. Requires
        management-key authentication."""
        self.send(
            INS_MOVE_KEY,
            target.key if target else 0xFF,
            source.key,
            le=False,
            what=(
                f"moving the key of slot {source.name} to slot {target.name}"
                if target
                else f"deleting the key in slot {source.name}"
            ),
        )

    def put_certificate(self, slot: Slot, der: bytes) -> None:
        """Store a certificate (uncompressed). Requires management-key authentication."""
        value = tlv(TAG_CERTIFICATE, der) + tlv(TAG_CERT_INFO, b"\x00") + tlv(TAG_LRC)
        data = tlv(TAG_OBJ_ID, slot.object_id.to_bytes(3, "big")) + tlv(
            TAG_OBJ_DATA, value
        )
        self.send(
            INS_PUT_DATA,
            0x3F,
            0xFF,
            data,
            le=False,
            what=f"storing the certificate of slot {slot.name}",
        )

    def get_certificate(self, slot: Slot) -> bytes | None:
        """The DER certificate of a slot, or None when there is none."""
        request = tlv(TAG_OBJ_ID, slot.object_id.to_bytes(3, "big"))
        try:
            reply = self.send(
                INS_GET_DATA,
                0x3F,
                0xFF,
                request,
                what=f"reading the certificate of slot {slot.name}",
            )
        except ApduError as exc:
            if exc.sw == SW_FILE_NOT_FOUND:
                return None
            raise
        content = parse_tlvs(parse_tlvs(reply).get(TAG_OBJ_DATA, b""))
        der = content.get(TAG_CERTIFICATE)
        if not der:
            return None
        if content.get(TAG_CERT_INFO, b"\x00")[:1] == b"\x01":  # gzip-compressed
            der = gzip.decompress(der)
        return der

    def sign_raw(self, slot: Slot, algorithm: KeyAlgorithm, data: bytes) -> bytes:
        """The card's private-key operation on prepared input (see sign_message)."""
        request = tlv(
            TAG_DYN_AUTH, tlv(TAG_AUTH_RESPONSE) + tlv(TAG_AUTH_CHALLENGE, data)
        )
        try:
            reply = self.send(
                INS_GENERAL_AUTHENTICATE,
                algorithm,
                slot.key,
                request,
                what=f"a signature with slot {slot.name}",
            )
        except ApduError as exc:
            if exc.sw == SW_SECURITY_STATUS:
                raise CardError(
                    f"the YubiKey refused to sign with slot {slot.name}: the PIN was not "
                    "verified or the key was not touched in time"
                ) from None
            raise
        return parse_tlvs(parse_tlvs(reply).get(TAG_DYN_AUTH, b""))[TAG_AUTH_RESPONSE]


def sign_message(
    piv: PivSession,
    slot: Slot,
    algorithm: KeyAlgorithm,
    message: bytes,
    hash_name: str = "sha256",
) -> bytes:
    """Sign with ECDSA or RSA PKCS#1 v1.5 over ``hash_name``, or pure Ed25519, on
    the card; the standard signature encoding comes back (DER for ECDSA)."""
    if algorithm == KeyAlgorithm.ED25519:
        return piv.sign_raw(slot, algorithm, message)
    digest = hashlib.new(hash_name, message).digest()
    if algorithm in (KeyAlgorithm.ECCP256, KeyAlgorithm.ECCP384):
        size = 32 if algorithm == KeyAlgorithm.ECCP256 else 48
        return piv.sign_raw(slot, algorithm, ecdsa_input(digest, size))
    size = RSA_SIZES[algorithm]
    return piv.sign_raw(slot, algorithm, pkcs1v15_block(digest, hash_name, size))


# =============================================================================
# Card access: finding the YubiKey, one lock per card, the PIN source
# =============================================================================


def describe_card(card: Card, otherwise: str = "YubiKey") -> str:
    """The card as messages name it (serial, firmware, reader), once known."""
    return card.info.describe() if card.info else otherwise


def slot_label(card: Card, slot: Slot) -> str:
    """The card and slot, as a PIN prompt names them."""
    return f"{describe_card(card)}, slot {slot.name}"


class Card:
    """One YubiKey, found by reader name and kept track of by serial number.

    Every operation runs under the card's lock, in a PC/SC transaction on a shared
    connection that is opened for it and closed after it, so other programs (ykman,
    a second proxy) can use the card between requests. A card that moved to
    another reader (unplugged and plugged back) is found again by its serial."""

    def __init__(self, reader: str, reader_filter: str | None = None) -> None:
        self.reader = reader
        self.reader_filter = reader_filter
        self.info: CardInfo | None = None
        self._lock = threading.RLock()
        self._context: PcscContext | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[PivSession]:
        """A PIV session on this card (SELECTed, identity checked). A failure that
        does not say what happened is named after a second look at the reader; an
        answer the PIV layer cannot parse is the card's error."""
        with self._lock:
            try:
                with self._session() as piv:
                    yield piv
            except PcscFailure as exc:
                self._drop_context()  # the next operation starts afresh
                raise self._look_again(exc) from None
            except (ValueError, KeyError, IndexError) as exc:
                raise CardError(
                    f"the YubiKey in reader {self.reader!r} sent an answer that is not "
                    f"valid PIV ({exc}): reinsert it and try again"
                ) from None

    def _look_again(self, failure: PcscFailure) -> CardError:
        """After a failed transmit or transaction: the card was pulled (pcscd may
        still call it present for a moment, until its next poll), or, when it is
        still there, the raw failure."""
        context = PcscContext()
        try:
            state = context.wait_change(self.reader, SCARD_STATE_UNAWARE, 0)
            if state is not None and state & SCARD_STATE_PRESENT:
                ms = int(LOOK_AGAIN_SECONDS * 1000)
                state = context.wait_change(self.reader, state, ms)
        finally:
            context.close()
        if state is None or not state & SCARD_STATE_PRESENT:
            return NoCardError(
                f"YubiKey not present in reader {self.reader!r} - insert it"
            )
        return failure

    @contextlib.contextmanager
    def _session(self) -> Iterator[PivSession]:
        with self._lock:
            transport = self._connect()
            try:
                with transport.transaction():
                    piv = PivSession(transport, self.reader)
                    piv.select()
                    self._check_identity(piv)
                    yield piv
            except TransientCardError:
                self._drop_context()
                raise
            finally:
                transport.close()

    def run(self, operation: Callable[[PivSession], Any]) -> Any:
        """``operation(piv)`` in a session. A card reset by another program or a
        restarted pcscd gets one retry on a fresh connection, so no request is lost."""
        with self._lock:
            try:
                with self.session() as piv:
                    return operation(piv)
            except TransientCardError as exc:
                log.info("retrying on a fresh connection: %s", exc)
            with self.session() as piv:
                return operation(piv)

    def _connect(self) -> PcscTransport:
        """A connection to the card; a stale context (pcscd restarted) is replaced once."""
        fresh = self._context is None
        try:
            if self._context is None:
                self._context = PcscContext()
            return self._connect_reader()
        except CardError:
            self._drop_context()
            if fresh:
                raise
        self._context = PcscContext()
        try:
            return self._connect_reader()
        except CardError:
            self._drop_context()
            raise

    def _connect_reader(self) -> PcscTransport:
        assert self._context is not None
        try:
            return self._context.connect(self.reader)
        except NoCardError:
            moved = self._find_moved_card()
            if moved is None:
                raise
            serial = self.info.serial if self.info else None
            log.info("YubiKey serial %s is now in reader %r", serial, moved)
            self.reader = moved
            return self._context.connect(moved)

    def _find_moved_card(self) -> str | None:
        """The reader that now holds our card (by serial), if any."""
        if self.info is None or self.info.serial is None or self._context is None:
            return None
        for name in self._context.readers():
            if name == self.reader or not reader_matches(name, self.reader_filter):
                continue
            if not self._context.card_present(name):
                continue
            with contextlib.suppress(CardError):
                transport = self._context.connect(name)
                try:
                    piv = PivSession(transport, name)
                    piv.select()
                    if piv.get_serial() == self.info.serial:
                        return name
                finally:
                    transport.close()
        return None

    def _check_identity(self, piv: PivSession) -> None:
        if self.info is None or self.info.serial is None:
            return
        serial = piv.get_serial()
        if serial != self.info.serial:
            raise NoCardError(
                f"the YubiKey in reader {self.reader!r} is serial {serial}, not serial "
                f"{self.info.serial} that holds the key: insert that one"
            )

    def identify(self) -> CardInfo:
        with self.session() as piv:
            self.info = CardInfo(self.reader, piv.get_serial(), piv.version)
        return self.info

    def _drop_context(self) -> None:
        if self._context is not None:
            with contextlib.suppress(Exception):
                self._context.close()
            self._context = None

    def close(self) -> None:
        """Release everything held in PC/SC (the next operation starts afresh)."""
        with self._lock:
            self._drop_context()


class PresenceMonitor:
    """Knows whether the card is still in its reader, from PC/SC reader events.

    A background thread waits in SCardGetStatusChange on the card's reader. The
    ``stamp`` is the reader and pcsc-lite's event counter while a card is in it,
    None while it is empty (or pcscd is gone): a connection the card signed under
    one stamp may be used again while the stamp is unchanged, since the card was
    never pulled in between (no APDU needed). When the stamp changes (the card
    left, or a card, maybe another one, arrived) the listeners are called."""

    def __init__(self, card: Card) -> None:
        self.card = card
        self.stamp: tuple[str, int] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._context: PcscContext | None = None
        self._thread = threading.Thread(
            target=self._run, name="presence-monitor", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def stop(self) -> None:
        self._stopping.set()
        context = self._context
        if context is not None:
            with contextlib.suppress(Exception):
                context.cancel()
        self._thread.join(5)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def still(self, stamp: tuple[str, int] | None) -> bool:
        """True when the card behind ``stamp`` never left its reader since."""
        return stamp is not None and stamp == self.stamp

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._context = PcscContext()
                self._watch(self._context)
            except CardError as exc:
                log.info("presence monitor: %s", exc)
            finally:
                if self._context is not None:
                    with contextlib.suppress(Exception):
                        self._context.close()
                self._context = None
            if self._stopping.wait(0):
                return
            self._seen(None)  # pcscd went away: the card may have, too
            self._stopping.wait(MONITOR_RETRY_SECONDS)

    def _watch(self, context: PcscContext) -> None:
        reader, state = "", SCARD_STATE_UNAWARE
        while not self._stopping.is_set():
            if reader != self.card.reader:  # the card layer found it elsewhere
                reader, state = self.card.reader, SCARD_STATE_UNAWARE
            new = context.wait_change(reader, state, MONITOR_WAKE_MS)
            if new is None:  # the reader went away with the card (USB)
                self._seen(None)
                self._stopping.wait(MONITOR_RETRY_SECONDS)
                reader = ""
                continue
            state = new
            present = state & SCARD_STATE_PRESENT
            self._seen((reader, state >> 16) if present else None)

    def _seen(self, stamp: tuple[str, int] | None) -> None:
        with self._lock:
            old, self.stamp = self.stamp, stamp
        self._ready.set()
        if old is not None and stamp != old:
            log.info("the YubiKey left reader %r (or was put back)", old[0])
            for listener in self._listeners:
                listener()


def reader_matches(name: str, wanted: str | None) -> bool:
    """By default YubiKey readers only; ``--reader`` matches a substring."""
    lower = name.lower()
    if wanted:
        return wanted.lower() in lower
    return "yubikey" in lower or "yubico" in lower


def find_cards(reader: str | None = None) -> list[Card]:
    """Every matching reader that holds a PIV card, identified (serial, firmware).
    Empty readers, such as a laptop's built-in one, are skipped."""
    context = PcscContext()
    try:
        names = [n for n in context.readers() if reader_matches(n, reader)]
        present = [n for n in names if context.card_present(n)]
    finally:
        context.close()
    cards, failures = [], []
    for name in present:
        card = Card(name, reader)
        try:
            card.identify()
            cards.append(card)
        except CardError as exc:
            card.close()
            failures.append(exc)
            log.info("skipping reader %r: %s", name, exc)
    if not cards and failures:
        raise failures[0]
    return cards


def open_card(reader: str | None = None, serial: int | None = None) -> Card:
    """The one YubiKey the user means; several without a choice is an error."""
    cards = find_cards(reader)
    if serial is not None:
        chosen = [c for c in cards if c.info and c.info.serial == serial]
        if not chosen:
            _close_all(cards)
            seen = ", ".join(str(c.info.serial) for c in cards if c.info) or "none"
            raise NoCardError(
                f"no YubiKey with serial {serial} found (inserted: {seen}): "
                "insert it or fix --serial"
            )
        cards, others = chosen, [c for c in cards if c not in chosen]
        _close_all(others)
    if not cards:
        where = f" in a reader matching {reader!r}" if reader else ""
        raise NoCardError(f"no YubiKey found{where} - please insert your YubiKey")
    if len(cards) > 1:
        listing = "; ".join(c.info.describe() for c in cards if c.info)
        _close_all(cards)
        raise ConfigError(
            f"several YubiKeys found: {listing}; choose one with --serial N or --reader NAME"
        )
    return cards[0]


def _close_all(cards: list[Card]) -> None:
    for card in cards:
        card.close()


class PinSource:
    """Where the PIN comes from: a file, else a prompt on a terminal.

    Asked only when the card says the PIN is needed; never asked twice for
    one failure: a rejected PIN raises and is not tried again."""

    def __init__(
        self, path: str | None = None, label: str = "YubiKey", reload_hint: str = ""
    ) -> None:
        self.path = path
        self.label = label
        self.reload_hint = reload_hint
        self.rejected: PinError | None = None  # set once the card refused the PIN
        self._pin: str | None = None

    def get(self) -> str:
        if self.rejected:
            raise self.rejected
        if self._pin is None:
            self._pin = self._read_file() if self.path else self._prompt()
        return self._pin

    def reject(self, error: PinError) -> None:
        """Remember a rejection: the PIN is not sent to the card again until reload()."""
        message = (
            f"{error}{self.reload_hint}" if error.attempts_remaining else str(error)
        )
        self.rejected = PinError(message, error.attempts_remaining)
        self._pin = None

    def reload(self) -> None:
        """Forget the PIN and any rejection (SIGHUP): the file is read again."""
        self.rejected = None
        self._pin = None

    def _prompt(self) -> str:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"the {self.label} needs its PIN and there is no terminal to ask on: "
                "pass --pin-file PATH"
            )
        pin = getpass.getpass(f"PIN for {self.label}: ")
        if not pin:
            raise ConfigError("no PIN entered: run the command again and enter the PIN")
        return pin

    def _read_file(self) -> str:
        assert self.path is not None
        path = Path(os.path.expanduser(self.path))
        pin = read_secret_file(path, "the PIN file", "write just the PIN into it")
        if not pin:
            raise ConfigError(f"the PIN file {path} is empty: write the PIN into it")
        return pin


def read_secret_file(path: Path, what: str, fix: str) -> str:
    """A PIN or key file: one trailing newline is dropped; any other whitespace
    around the secret is refused, so that the card never sees a stray space."""
    text = read_user_text(path, what, fix, MAX_SECRET_FILE_BYTES)
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077 and host_platform() != "win32":
            log.warning("%s %s is readable by others: chmod 600 it", what, path)
    secret = text.removesuffix("\n").removesuffix("\r")
    if secret != secret.strip() or not secret.isprintable():
        raise ConfigError(
            f"{what} {path} has whitespace around the secret, extra lines or control "
            f"characters: {fix}, with at most one newline at the end"
        )
    return secret


def ensure_pin(piv: PivSession, policy: PinPolicy, pins: PinSource) -> None:
    """Verify the PIN when the slot's policy needs it and the card does not
    already hold it (policy ALWAYS needs a VERIFY before every signature)."""
    if policy == PinPolicy.NEVER:
        return
    if policy != PinPolicy.ALWAYS and piv.pin_verified():
        return
    pin = pins.get()  # raises the remembered rejection without asking the card
    try:
        piv.verify_pin(pin)
    except PinError as exc:
        pins.reject(exc)  # never sent to the card again
        assert pins.rejected is not None
        raise pins.rejected from None  # the first answer says so too


# =============================================================================
# Kubeconfig
# =============================================================================


@dataclasses.dataclass
class Named:
    """A named kubeconfig entry and the folder its relative paths start from."""

    name: str
    body: dict[str, Any]
    base: Path
    kind: str = "entry"  # cluster, context or user
    source: Path | None = None  # the file that defines it

    @property
    def where(self) -> str:
        """The file and the entry, for messages."""
        return f"kubeconfig {self.source}, {self.kind} {self.name!r}"


@dataclasses.dataclass
class KubeContext:
    """A resolved context: its cluster, user and namespace."""

    name: str
    cluster: Named
    user: Named
    namespace: str | None
    extension: dict[str, Any]
    sources: list[Path]


# The fields we read, with the types client-go decodes them into
# (clientcmd/api/v1): like kubectl, a file in which one has another type is
# refused. Fields we do not read are kubectl's business and left alone.
KUBECONFIG_FIELDS: dict[str, dict[str, type]] = {
    "config": {
        "apiVersion": str,
        "kind": str,
        "current-context": str,
        "clusters": list,
        "contexts": list,
        "users": list,
        "extensions": list,
        "preferences": dict,
    },
    "named": {"name": str},
    "cluster": {
        "server": str,
        "tls-server-name": str,
        "insecure-skip-tls-verify": bool,
        "certificate-authority": str,
        "certificate-authority-data": str,
        "proxy-url": str,
        "disable-compression": bool,
        "extensions": list,
    },
    "context": {"cluster": str, "user": str, "namespace": str, "extensions": list},
    "user": {
        "client-certificate": str,
        "client-certificate-data": str,
        "client-key": str,
        "client-key-data": str,
        "token": str,
        "tokenFile": str,
        "username": str,
        "password": str,
        "exec": dict,
        "auth-provider": dict,
        "extensions": list,
    },
    EXTENSION_NAME: {
        "slot": str,
        "serial": int,
        "listen": str,
        "reuse-while-present": bool,
        "plain-http": bool,
        "local-tls": dict,
        "proxy-config": str,
    },
    "local-tls": {
        "server-certificate-data": str,
        "server-key-data": str,
        "client-ca-data": str,
    },
}
TYPE_WORDS = {
    bool: ("a boolean", "true or false, without quotes"),
    str: ("a string", "a string, in quotes where YAML would read something else"),
    int: ("a number", "a whole number, without quotes"),
    list: ("a list", "a list (lines starting with '- ')"),
    dict: ("a mapping", "a mapping (key: value lines)"),
}


def type_word(value: Any) -> str:
    """'a string', 'a boolean', 'a date': what YAML made of a value."""
    for kind, (word, _) in TYPE_WORDS.items():
        if type(value) is kind:
            return word
    names = {"float": "a decimal number", "date": "a date", "datetime": "a timestamp"}
    return names.get(type(value).__name__, f"a {type(value).__name__} value")


def check_fields(where: str, body: Any, kind: str) -> dict[str, Any]:
    """``body`` as a mapping whose known fields have client-go's types; ``where``
    names the file and the entry in messages."""
    if body is None:
        return {}
    if type(body) is not dict:
        raise ConfigError(
            f"{where} is {type_word(body)}, not a mapping: write key: value lines there"
        )
    for key, expected in KUBECONFIG_FIELDS[kind].items():
        value = body.get(key)
        if value is not None and type(value) is not expected:
            word, instead = TYPE_WORDS[expected]
            raise ConfigError(
                f"{where}: {key} is {type_word(value)}, not {word}: write {instead}"
            )
    return body


def check_document(path: Path, doc: dict[str, Any]) -> None:
    """Refuse what kubectl refuses to decode: wrong types, entries without names."""
    where = f"kubeconfig {path}"
    check_fields(where, doc, "config")
    check_extensions(where, doc)
    for kind, inner in (
        ("clusters", "cluster"),
        ("contexts", "context"),
        ("users", "user"),
    ):
        for number, item in enumerate(doc.get(kind) or [], 1):
            entry = f"{where}, entry {number} of {kind}"
            if not check_fields(entry, item, "named").get("name"):
                raise ConfigError(f"{entry} has no name: add name: NAME to it")
            named = f"{where}, {inner} {item['name']!r}"
            check_extensions(named, check_fields(named, item.get(inner), inner))


def check_extensions(where: str, body: dict[str, Any]) -> None:
    for number, item in enumerate(body.get("extensions") or [], 1):
        entry = check_fields(f"{where}, extension {number}", item, "named")
        if entry.get("name") == EXTENSION_NAME:
            ours = f"{where}, extension {EXTENSION_NAME}"
            settings = check_fields(ours, entry.get("extension"), EXTENSION_NAME)
            check_fields(f"{ours}, local-tls", settings.get("local-tls"), "local-tls")


def check_cluster(cluster: Named) -> None:
    body = cluster.body
    if body.get("insecure-skip-tls-verify") and (
        body.get("certificate-authority") or body.get("certificate-authority-data")
    ):
        raise ConfigError(
            f"{cluster.where}: insecure-skip-tls-verify: true together with a "
            "certificate authority is refused, as kubectl refuses it: remove "
            "insecure-skip-tls-verify so that the server is checked against the CA"
        )


def kubeconfig_paths(given: str | None) -> list[Path]:
    """--kubeconfig, else $KUBECONFIG (a list), else ~/.kube/config."""
    if given:
        return [Path(os.path.expanduser(given))]
    env = os.environ.get("KUBECONFIG", "")
    paths = [Path(os.path.expanduser(p)) for p in env.split(os.pathsep) if p]
    return paths or [Path(os.path.expanduser("~/.kube/config"))]


def _load_yaml(
    path: Path, fix: str = "pass the right file with --kubeconfig"
) -> dict[str, Any]:
    import yaml

    text = read_user_text(path, "kubeconfig", fix)
    try:
        # libyaml where PyYAML has it: the pure-Python scanner is quadratic in
        # the nesting depth, so a file of 50000 '[' would take minutes
        doc = yaml.load(text, getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"kubeconfig {path} is not valid YAML{where}: fix or replace the file"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"kubeconfig {path} is nested too deeply to be a kubeconfig: fix or "
            "replace the file"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(
            f"kubeconfig {path} is not a kubeconfig (no mapping at the top): "
            "fix or replace the file"
        )
    check_document(path, doc)
    return doc


class Kubeconfig:
    """Merged kubeconfig files, first definition of a name wins (as kubectl does)."""

    def __init__(self, paths: list[Path]) -> None:
        existing = [p for p in paths if p.exists()] if len(paths) > 1 else paths
        if not existing:
            raise ConfigError(
                f"none of the kubeconfig files exist: "
                f"{', '.join(map(str, paths))}; pass one with --kubeconfig"
            )
        self.paths = existing
        self.current_context: str | None = None
        self.entries: dict[str, dict[str, Named]] = {
            "clusters": {},
            "contexts": {},
            "users": {},
        }
        for path in existing:
            self._merge(path, _load_yaml(path))

    def _merge(self, path: Path, doc: dict[str, Any]) -> None:
        """``doc`` has passed check_document: the types are client-go's."""
        base = path.resolve().parent
        self.current_context = (
            self.current_context or doc.get("current-context") or None
        )
        for kind, inner in (
            ("clusters", "cluster"),
            ("contexts", "context"),
            ("users", "user"),
        ):
            for item in doc.get(kind) or []:
                body = item.get(inner) or {}
                self.entries[kind].setdefault(
                    item["name"], Named(item["name"], body, base, inner, path)
                )

    def _get(self, kind: str, name: str, context: str) -> Named:
        entry = self.entries[kind].get(name)
        if entry is None:
            raise ConfigError(
                f"context {context!r} names {kind[:-1]} {name!r}, which is not in "
                f"{self.describe()}: fix the kubeconfig"
            )
        return entry

    def describe(self) -> str:
        return os.pathsep.join(map(str, self.paths))

    def resolve(self, context: str | None) -> KubeContext:
        name = context or self.current_context
        if not name:
            raise ConfigError(
                f"{self.describe()} has no current-context: pass --context NAME"
            )
        ctx = self.entries["contexts"].get(name)
        if ctx is None:
            known = ", ".join(sorted(self.entries["contexts"])) or "none"
            raise ConfigError(
                f"context {name!r} not found in {self.describe()} "
                f"(contexts: {known}): pass --context NAME"
            )
        cluster = self._get("clusters", ctx.body.get("cluster", ""), name)
        check_cluster(cluster)
        user = self._get("users", ctx.body.get("user", ""), name)
        return KubeContext(
            name,
            cluster,
            user,
            ctx.body.get("namespace"),
            find_extension(ctx.body),
            self.paths,
        )


def find_extension(body: dict[str, Any]) -> dict[str, Any]:
    for item in body.get("extensions") or []:
        if isinstance(item, dict) and item.get("name") == EXTENSION_NAME:
            return dict(item.get("extension") or {})
    return {}


def read_material(entry: Named, data_key: str, path_key: str) -> bytes | None:
    """Inline base64 ``*-data`` or a file path relative to the kubeconfig's folder."""
    import base64
    import binascii

    if entry.body.get(data_key):
        try:
            return base64.b64decode(entry.body[data_key], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{entry.where}: {data_key} is not valid base64: write the "
                "base64 of the PEM file there (base64 -w0 FILE)"
            ) from None
    if entry.body.get(path_key):
        path = entry.base / Path(os.path.expanduser(entry.body[path_key]))
        return read_user_file(path, path_key, f"fix the path in {entry.where}")
    return None


def write_private_file(path: Path, text: str) -> None:
    """Write a file readable by its owner only, replacing it in one step."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# =============================================================================
# Certificates and keys from a kubeconfig
# =============================================================================


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """The first certificate of PEM (possibly a chain) or DER bytes."""
    from cryptography import x509

    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)[0]
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(
            f"{what} is not a readable X.509 certificate: fix the kubeconfig "
            "or export the certificate again"
        ) from None


def load_private_key(data: bytes, what: str) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{what} is encrypted with a passphrase: decrypt it first "
            "(openssl pkey -in KEY) and keep the plain copy off disk"
        ) from None
    except (ValueError, Exception) as exc:  # unsupported or corrupt key
        if isinstance(exc, ProxyError):
            raise
        raise ConfigError(
            f"{what} is not a readable private key: fix the kubeconfig"
        ) from None


def auth_kind(user: dict[str, Any]) -> str:
    for key, kind in (
        ("token", "a bearer token"),
        ("tokenFile", "a token file"),
        ("exec", "an exec credential plugin"),
        ("auth-provider", "an auth provider"),
        ("username", "basic auth"),
    ):
        if user.get(key):
            return kind
    return "no credentials"


def load_client_identity(ctx: KubeContext) -> tuple[Any, Any]:
    """The user's client certificate and private key, checked to belong together."""
    user = ctx.user
    cert_data = read_material(user, "client-certificate-data", "client-certificate")
    key_data = read_material(user, "client-key-data", "client-key")
    if cert_data is None or key_data is None:
        raise ConfigError(
            f"user {user.name!r} of context {ctx.name!r} has no client certificate and key "
            f"(it uses {auth_kind(user.body)}): yubikey-kube-proxy moves a client-certificate "
            "key onto the card, so pick a context whose user has one with --context"
        )
    where = f"user {user.name!r} in {user.source}"
    cert = load_certificate(cert_data, f"the client certificate of {where}")
    key = load_private_key(key_data, f"the client key of {where}")
    key_algorithm(key)
    if not same_public_key(cert.public_key(), key.public_key()):
        raise KeyMismatchError(
            f"the client key of user {user.name!r} does not match its certificate "
            f"({cert.subject.rfc4514_string()}): fix the kubeconfig so both belong together"
        )
    return cert, key


def verify_signature(
    public_key: Any, algorithm: KeyAlgorithm, message: bytes, signature: bytes
) -> bool:
    """Check a signature made by ``sign_message``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    try:
        if algorithm == KeyAlgorithm.ED25519:
            public_key.verify(signature, message)
        elif algorithm in (KeyAlgorithm.ECCP256, KeyAlgorithm.ECCP384):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def days_left(cert: x509.Certificate, now: datetime.datetime | None = None) -> int:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return (not_after(cert) - now).days


# =============================================================================
# Card signatures: the card makes the CertificateVerify signature
# =============================================================================


class CardSigner:
    """The private-key operation of one slot, one card session per signature.

    The PIN is verified first when the slot's policy needs it. A PIN the card
    rejected is never sent again (see PinSource.rejected)."""

    def __init__(
        self,
        card: Card,
        slot: Slot,
        algorithm: KeyAlgorithm,
        pin_policy: PinPolicy,
        pins: PinSource,
        touch_policy: TouchPolicy = TouchPolicy.NEVER,
        notify: bool = False,
    ) -> None:
        self.card = card
        self.slot = slot
        self.algorithm = algorithm
        self.pin_policy = pin_policy
        self.pins = pins
        self.touch_policy = touch_policy
        self.notify = notify
        self.signatures = 0
        self.last_seconds = 0.0
        self.terminal: Any = None  # shell: the touch prompt goes to its terminal

    def __call__(self, prepared: bytes) -> bytes:
        return self.card.run(lambda piv: self._sign(piv, prepared))

    def _sign(self, piv: PivSession, prepared: bytes) -> bytes:
        ensure_pin(piv, self.pin_policy, self.pins)
        start = time.perf_counter()
        with self.touch_reminder():
            result = piv.sign_raw(self.slot, self.algorithm, prepared)
        self.last_seconds = time.perf_counter() - start
        self.signatures += 1
        return result

    @contextlib.contextmanager
    def touch_reminder(self) -> Iterator[None]:
        """Say "touch your YubiKey" when a touch-policy signature takes a while."""
        if self.touch_policy not in (TouchPolicy.ALWAYS, TouchPolicy.CACHED):
            yield
            return
        timer = threading.Timer(TOUCH_REMINDER_SECONDS, self.remind)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def remind(self) -> None:
        card = describe_card(self.card, self.card.reader)
        message = f"touch your YubiKey ({card}) to approve a kubectl request"
        if self.terminal is None:
            log.warning("%s", message)
        else:
            log.info("%s", message)
            with contextlib.suppress(OSError, ValueError):
                print(f"\r\n{PROG}: {message}", file=self.terminal, flush=True)
        command = notify_command(message) if self.notify else None
        if command:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(command, timeout=5, check=False)


def notify_command(message: str) -> list[str] | None:
    """The command that shows a desktop notification here, or None."""
    platform = host_platform()
    if platform == "linux" and shutil.which("notify-send"):
        return ["notify-send", "-u", "critical", PROG, message]
    if platform == "darwin" and shutil.which("osascript"):
        script = (  # the message as an argument: nothing to quote
            "on run argv\n"
            f'display notification (item 1 of argv) with title "{PROG}"\nend run'
        )
        return ["osascript", "-e", script, message]
    return None


def check_notify(wanted: bool) -> None:
    """--notify: say at start when no notification can be shown."""
    if not wanted or notify_command("") is not None:
        return
    reason = {
        "linux": "notify-send was not found (Debian and Ubuntu: install libnotify-bin)",
        "darwin": "osascript was not found",
        "win32": "Windows notifications are not supported",
    }[host_platform()]
    log.warning(
        "--notify: %s, so touch prompts only go to this log: fix that or drop --notify",
        reason,
    )


def verify_prehashed(public_key: Any, signature: bytes, digest: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    algorithm = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}[
        len(digest)
    ]
    try:
        public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(algorithm)))
    except InvalidSignature:
        return False
    return True


# =============================================================================
# Upstream TLS: tlslite-ng with cryptography's AEAD, the server verified first
# =============================================================================


class UpstreamError(ProxyError):
    """The API server could not be reached or refused us."""

    http_status = 502


class UpstreamTimeout(UpstreamError):
    http_status = 504


class ServerCertificateError(UpstreamError):
    """The API server's certificate failed verification: no card signature."""


def tls_settings() -> Any:
    """What Go's crypto/tls offers and no more: TLS 1.2 and 1.3, ECDHE key
    exchange (the server signs its key share before the card signs anything; with
    static RSA the card would sign first), AEAD suites, one key share."""
    from tlslite import HandshakeSettings

    settings = HandshakeSettings()
    settings.minVersion = (3, 3)
    settings.maxVersion = (3, 4)
    settings.versions = [(3, 4), (3, 3)]  # supported_versions: no TLS 1.0 or 1.1
    settings.keyExchangeNames = ["ecdhe_ecdsa", "ecdhe_rsa"]
    settings.cipherNames = ["aes128gcm", "aes256gcm", "chacha20-poly1305"]
    settings.macNames = ["aead"]
    settings.keyShares = ["x25519"]
    settings.eccCurves = ["x25519", "secp256r1", "secp384r1"]
    settings.rsaSigHashes = ["sha256", "sha384", "sha512", "sha1"]
    settings.ecdsaSigHashes = ["sha256", "sha384", "sha512", "sha1"]
    settings.dsaSigHashes = []
    settings.more_sig_schemes = ["Ed25519"]
    settings.use_heartbeat_extension = False
    settings.certificate_compression_send = []  # 0.8.2 breaks TLS 1.3 client auth otherwise
    return settings


# ClientHello extensions that ask for session tickets: a resumed TLS 1.3 session
# needs no client signature, so we never ask for, keep or offer one (as Go does
# without a ClientSessionCache).
TICKET_EXTENSIONS = {35, 45}  # session_ticket, psk_key_exchange_modes
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
ANY_EXTENDED_KEY_USAGE = "2.5.29.37.0"
NOT_FOR_SERVERS = "certificate is not for TLS servers (no serverAuth usage)"
# Extensions Go's crypto/x509 understands; it refuses a certificate with any other
# critical one. 2.5.29.x: subject key id, key usage, subjectAltName, basic
# constraints, name constraints, CRL distribution points, certificate policies,
# authority key id, extended key usage; then authority information access.
GO_KNOWN_EXTENSIONS = {f"2.5.29.{n}" for n in (14, 15, 17, 19, 30, 31, 32, 35, 37)} | {
    "1.3.6.1.5.5.7.1.1"
}


def go_like_policies() -> tuple[Any, Any]:
    """Extension policies as lenient as Go's crypto/x509 and no more: every
    certificate of the chain with an extended key usage must allow serverAuth
    (Go checks the whole chain), issuers must be CAs and, with a key usage,
    allow keyCertSign; the leaf needs a subjectAltName (ServerVerifier matches
    its names as Go does). Criticality is not enforced here (see
    GO_KNOWN_EXTENSIONS)."""
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    def is_ca(policy: Any, cert: Any, ext: Any) -> None:
        if ext is None or not ext.ca:
            raise ValueError("issuer is not a CA")

    def cert_sign(policy: Any, cert: Any, ext: Any) -> None:
        if ext is not None and not ext.key_cert_sign:
            raise ValueError(
                "an issuer's key usage does not allow signing certificates"
            )

    def server_auth(policy: Any, cert: Any, ext: Any) -> None:
        if not server_auth_allowed(cert):
            raise ValueError(NOT_FOR_SERVERS)

    any_ = Criticality.AGNOSTIC
    ca_policy = (
        ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, any_, is_ca)
        .may_be_present(x509.KeyUsage, any_, cert_sign)
        .may_be_present(x509.ExtendedKeyUsage, any_, server_auth)
    )
    ee_policy = (
        ExtensionPolicy.permit_all()
        .require_present(x509.SubjectAlternativeName, any_, None)
        .may_be_present(x509.ExtendedKeyUsage, any_, server_auth)
    )
    return ca_policy, ee_policy


def go_ip(name: str) -> Any:
    """The IP address a server name stands for, as Go reads it ([v6] too), or None."""
    import ipaddress

    host = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def go_valid_hostname(host: str, pattern: bool) -> bool:
    """Go's validHostname: LDH labels, '_' allowed, a leading '*' label in a pattern."""
    if not pattern:
        host = host.removesuffix(".")
    if not host:
        return False
    for i, label in enumerate(host.split(".")):
        if pattern and i == 0 and label == "*":
            continue
        if not label or not all(
            c.isascii() and (c.isalnum() or c == "_" or (c == "-" and j))
            for j, c in enumerate(label)
        ):
            return False
    return True


def go_name_matches(leaf: Any, name: str) -> bool:
    """Go's Certificate.VerifyHostname: IP addresses against IP SANs only; DNS names
    case-insensitively, one leading wildcard label, a trailing dot ignored, exact
    comparison for names outside those rules. The common name is never used."""
    from cryptography import x509

    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    ip = go_ip(name)
    if ip is not None:
        return ip in sans.value.get_values_for_type(x509.IPAddress)
    host = name.lower()
    for pattern in sans.value.get_values_for_type(x509.DNSName):
        pattern = pattern.lower()
        if go_valid_hostname(host, False) and go_valid_hostname(pattern, True):
            want, have = pattern.split("."), host.removesuffix(".").split(".")
            if len(want) == len(have) and all(
                w == h or (i == 0 and w == "*")
                for i, (w, h) in enumerate(zip(want, have, strict=True))
            ):
                return True
        elif pattern not in ("", ".") and pattern == host:
            return True
    return False


def go_unknown_critical(chain: list[Any]) -> bool:
    return any(
        ext.critical and ext.oid.dotted_string not in GO_KNOWN_EXTENSIONS
        for cert in chain
        for ext in cert.extensions
    )


class ServerVerifier:
    """Checks the API server's chain, dates and name before the card signs, as
    Go's crypto/x509 does for kubectl (README: where we are stricter)."""

    def __init__(
        self, roots: list[Any], server_name: str, insecure: bool = False
    ) -> None:
        if (
            not server_name
            or not server_name.isascii()
            or not server_name.isprintable()
        ):
            raise ConfigError(
                f"the server name {server_name!r} (tls-server-name, or the host of the "
                "server URL) can never match a certificate: write the host name or IP "
                "address that the API server's certificate names"
            )
        self.roots = roots
        self.root_ders = {der_bytes(root) for root in roots}
        self.server_name = server_name
        self.insecure = insecure

    def verify(self, chain_der: list[bytes], where: str) -> Any:
        """Raise ServerCertificateError unless the chain passes; return the leaf."""
        from cryptography import x509

        problem: str | None
        try:
            certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain_der]
        except ValueError as exc:
            certs, problem = [], f"it cannot be parsed: {exc}"
        else:
            problem = "it sent no certificate" if not certs else None
        if certs and self.insecure:
            return certs[0]
        try:
            problem = problem or self.problem(certs)
        except Exception as exc:  # noqa: BLE001 (hostile input: refuse, never crash)
            problem = f"it cannot be checked: {exc}"
        if problem:
            raise ServerCertificateError(
                f"the API server at {where} presented a certificate we do not trust for "
                f"{self.server_name!r} ({problem}): check the server URL, "
                "certificate-authority and tls-server-name in the kubeconfig"
            ) from None
        return certs[0]

    def problem(self, certs: list[Any]) -> str | None:
        """Why Go would refuse the chain (or we, where stricter), or None."""
        from cryptography.x509.verification import (
            PolicyBuilder,
            Store,
            VerificationError,
        )

        leaf, now = certs[0], datetime.datetime.now(datetime.timezone.utc)
        if expired := date_problem(leaf, now):
            return expired
        if not go_name_matches(leaf, self.server_name):
            return "leaf certificate has no matching subjectAltName"
        if der_bytes(leaf) in self.root_ders:
            chain = [leaf]  # Go: a certificate the kubeconfig trusts needs no issuer
            if not server_auth_allowed(leaf):
                return NOT_FOR_SERVERS
        else:
            ca_policy, ee_policy = go_like_policies()
            verifier = (
                PolicyBuilder()
                .store(Store(self.roots))
                .time(now)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
                .build_client_verifier()  # the name is matched above, as Go does
            )
            try:
                chain = verifier.verify(leaf, certs[1:]).chain
            except VerificationError as exc:
                return verification_reason(exc)
        if go_unknown_critical(chain):
            return "it has a critical extension that Go does not know"
        return None


def server_auth_allowed(cert: Any) -> bool:
    """Go's extended key usage rule for one certificate: none, or serverAuth or any."""
    from cryptography import x509

    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(
        {SERVER_AUTH, ANY_EXTENDED_KEY_USAGE} & {o.dotted_string for o in usages}
    )


def der_bytes(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def date_problem(cert: Any, now: datetime.datetime) -> str | None:
    if cert.not_valid_after_utc < now:
        return f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    return None


def verification_reason(exc: Exception) -> str:
    """A short reason from cryptography's verbose verification error."""
    text = str(exc).removeprefix("validation failed: ").split(" (encountered")[0]
    text = text.removeprefix("candidates exhausted: ")
    text = text.replace("Python extension validator failed: ValueError: ", "")
    if "signature does not match" in text or "no interior errors" in text:
        return "it is not signed by the cluster's CA"
    if "not valid at validation time" in text:
        return "a certificate of its chain has expired or is not valid yet"
    return text


def system_roots() -> list[Any]:
    """The system trust store, for kubeconfigs without a CA."""
    import ssl

    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.exists(path):
            return x509.load_pem_x509_certificates(Path(path).read_bytes())
    raise ConfigError(
        "the kubeconfig names no certificate-authority and no system trust "
        "store was found: add certificate-authority-data to the kubeconfig"
    )


# =============================================================================
# tlslite-ng internals: everything that relies on more than tlslite-ng's public API
# =============================================================================
# Written against tlslite-ng 0.8.2 exactly (REQUIREMENTS: check_dependencies
# refuses any other version at start, naming both and the pip command). Nothing
# outside this section touches a private name of tlslite, and install_tlslite()
# is the one place that changes tlslite's modules, called once by build_upstream.


def install_tlslite() -> None:
    """Point tlslite's record layer at FastAead and its X25519 at cryptography's
    (pure Python costs 3 ms per use); idempotent."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from tlslite import keyexchange, recordlayer

    def aes_gcm(key: bytes, impl_list: Any = None) -> FastAead:
        return FastAead("aes128gcm" if len(key) == 16 else "aes256gcm", key, AESGCM)

    def chacha20(key: bytes, impl_list: Any = None) -> FastAead:
        return FastAead("chacha20-poly1305", key, ChaCha20Poly1305)

    recordlayer.createAESGCM = aes_gcm
    recordlayer.createCHACHA20 = chacha20
    keyexchange.x25519 = fast_x25519


def tls_buffered(conn: Any) -> bool:
    """Whether tlslite holds bytes it has read but not handed out: decrypted
    application data, or raw bytes its BufferedSocket read ahead."""
    return bool(conn._readBuffer or conn.sock._read_buffer)


class FastAead:
    """tlslite's AEAD interface on top of cryptography's AES-GCM / ChaCha20-Poly1305
    (tlslite's own are pure Python: 0.56 MB/s against hundreds of MB/s here)."""

    isBlockCipher = False  # noqa: N815 (tlslite's names)
    isAEAD = True  # noqa: N815
    nonceLength = 12  # noqa: N815
    tagLength = 16  # noqa: N815
    implementation = "cryptography"

    def __init__(self, name: str, key: bytes, factory: Any) -> None:
        self.name = name
        self.key = key
        self._aead = factory(bytes(key))

    def seal(self, nonce: bytes, plaintext: bytes, data: bytes) -> bytearray:
        return bytearray(
            self._aead.encrypt(bytes(nonce), bytes(plaintext), bytes(data))
        )

    def open(self, nonce: bytes, ciphertext: bytes, data: bytes) -> bytearray | None:
        from cryptography.exceptions import InvalidTag

        try:
            return bytearray(
                self._aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(data))
            )
        except InvalidTag:
            return None


X25519_BASE_POINT = bytes([9]) + bytes(31)


def fast_x25519(scalar: bytes, point: bytes) -> bytearray:
    """RFC 7748 X25519 with cryptography; all zeros for a low-order point, which
    tlslite checks for."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    private = X25519PrivateKey.from_private_bytes(bytes(scalar))
    if bytes(point) == X25519_BASE_POINT:
        return bytearray(private.public_key().public_bytes_raw())
    try:
        return bytearray(
            private.exchange(X25519PublicKey.from_public_bytes(bytes(point)))
        )
    except ValueError:
        return bytearray(32)


def fast_server_key(tls_key: Any, leaf: Any) -> Any:
    """The server's EC key with cryptography verifying its signature (python-ecdsa,
    which tlslite uses, takes 5 ms); other key types are left as they are."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from tlslite.utils.python_ecdsakey import Python_ECDSAKey

    public = leaf.public_key()
    if not isinstance(tls_key, Python_ECDSAKey) or not isinstance(
        public, ec.EllipticCurvePublicKey
    ):
        return tls_key

    class FastECDSAPublicKey(Python_ECDSAKey):
        def __init__(self) -> None:
            self.__dict__.update(tls_key.__dict__)

        def _verify(self, signature: bytes, hash_bytes: bytes) -> bool:
            return verify_prehashed(public, bytes(signature), bytes(hash_bytes))

    return FastECDSAPublicKey()


def tls_private_key(signer: CardSigner, public_key: Any) -> Any:
    """A tlslite key object whose private operation is the card's."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from tlslite.utils.ecdsakey import ECDSAKey
    from tlslite.utils.eddsakey import EdDSAKey
    from tlslite.utils.python_rsakey import Python_RSAKey

    class CardECDSAKey(ECDSAKey):
        key_type = "ecdsa"

        def __init__(self) -> None:
            self.size = (public_key.curve.key_size + 7) // 8
            self.curve_name = {32: "NIST256p", 48: "NIST384p"}[self.size]
            # tlslite cuts TLS 1.2 digests to private_key.curve.baselen
            self.private_key = types.SimpleNamespace(
                curve=types.SimpleNamespace(baselen=self.size)
            )

        def __len__(self) -> int:
            return public_key.curve.key_size

        def hasPrivateKey(self) -> bool:  # noqa: N802 (tlslite's name)
            return True

        def _sign(self, data: bytes, hash_alg: str) -> bytearray:
            return bytearray(signer(ecdsa_input(bytes(data), self.size)))

        def _verify(self, signature: bytes, hash_bytes: bytes) -> bool:
            return verify_prehashed(public_key, bytes(signature), bytes(hash_bytes))

    class CardRSAKey(Python_RSAKey):
        def __init__(self) -> None:
            numbers = public_key.public_numbers()
            super().__init__(numbers.n, numbers.e)

        def hasPrivateKey(self) -> bool:  # noqa: N802
            return True

        def _raw_private_key_op_bytes(self, message: bytes) -> bytearray:
            if len(message) != (self.n.bit_length() + 7) // 8:
                raise ValueError("message has the wrong length for the key")
            return bytearray(signer(bytes(message)))

    class CardEdDSAKey(EdDSAKey):
        key_type = curve_name = "Ed25519"

        def __init__(self) -> None:
            self.public_key = public_key

        def __len__(self) -> int:
            return 256

        def hasPrivateKey(self) -> bool:  # noqa: N802
            return True

        def _hashAndSign(self, data: bytes) -> bytearray:  # noqa: N802
            return bytearray(signer(bytes(data)))

        def _hashAndVerify(self, signature: bytes, data: bytes) -> bool:  # noqa: N802
            return verify_signature(
                public_key, KeyAlgorithm.ED25519, bytes(data), bytes(signature)
            )

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return CardECDSAKey()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return CardEdDSAKey()
    return CardRSAKey()


def make_tls_connection(
    sock: socket.socket, verifier: ServerVerifier, where: str
) -> Any:
    """A tlslite client connection that verifies the server's chain the moment
    it arrives, before the card is asked for a signature."""
    from tlslite import TLSConnection
    from tlslite.constants import AlertDescription, ContentType
    from tlslite.messages import ClientHello

    class VerifyingTLSConnection(TLSConnection):
        rejection: ProxyError | None = None

        @property
        def tickets(self) -> list[Any]:
            return []  # whatever tlslite stores here is dropped

        @tickets.setter
        def tickets(self, value: list[Any]) -> None:
            pass

        tls_1_0_tickets = tickets

        def _sendMsg(self, msg: Any, *a: Any, **kw: Any) -> Iterator[Any]:  # noqa: N802
            if isinstance(msg, ClientHello):
                msg.extensions = [
                    e for e in msg.extensions if e.extType not in TICKET_EXTENSIONS
                ]
            yield from self._alert_on_hangup(super()._sendMsg(msg, *a, **kw))

        def _sendMsgs(self, msgs: Any) -> Iterator[Any]:  # noqa: N802
            yield from self._alert_on_hangup(super()._sendMsgs(msgs))

        def _alert_on_hangup(self, sending: Iterator[Any]) -> Iterator[Any]:
            """A server that hangs up on our flight may have said why first: its
            alert is raised (TLSRemoteAlert); without one, the OSError stands."""
            try:
                yield from sending
            except OSError:
                yield from self._getMsg(ContentType.handshake)
                raise

        def _clientGetKeyFromChain(  # noqa: N802
            self,
            certificate: Any,
            settings: Any,
            tack_ext: Any = None,
        ) -> Iterator[Any]:
            try:
                leaf = verifier.verify(
                    [c.bytes for c in certificate.cert_chain.x509List], where
                )
            except ServerCertificateError as exc:
                self.rejection = exc
                yield from self._sendError(AlertDescription.bad_certificate, str(exc))
            for result in super()._clientGetKeyFromChain(
                certificate, settings, tack_ext
            ):
                if isinstance(result, tuple):  # (public key, chain, tack): the outcome
                    result = (fast_server_key(result[0], leaf), *result[1:])
                yield result

    return VerifyingTLSConnection(sock)


# =============================================================================
# Upstream connections: the card signs each handshake
# =============================================================================


class HeadReader(io.BufferedReader):
    """A buffered reader that keeps the lines of a response head as they were
    read, for the relay's checks: http.client's parser splits lines at a bare CR
    and joins folded ones. An unsolicited 100 Continue head is not kept."""

    def __init__(self, raw: Any) -> None:
        super().__init__(raw, CHUNK)
        self.start_head()

    def start_head(self) -> None:
        self.head: list[bytes] = []
        self.in_head = True

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        if self.in_head:
            self.head.append(line)
            if line in (b"\r\n", b"\n", b""):
                self.in_head = self.head[0][9:13] == b"100 "
                if self.in_head:
                    self.head = []
        return line


class TLSStream(io.RawIOBase):
    """Reads application data from a tlslite connection; an abrupt close reads as
    end of file."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from tlslite.errors import TLSAbruptCloseError

        try:
            data = self.conn.read(max=len(buffer))
        except TLSAbruptCloseError:
            return 0
        count = len(data)
        buffer[:count] = data
        return count


class TLSSocket:
    """The little of a socket that http.client and the tunnel use, over tlslite:
    writes in 64 KB pieces under a lock (tlslite's big writes are quadratic, and
    two writers would interleave records)."""

    def __init__(self, conn: Any, raw: socket.socket) -> None:
        self.conn = conn
        self.raw = raw
        self.lock = threading.Lock()
        self.stamp: tuple[str, int] | None = None  # the card's presence when it signed
        self.idle_since = 0.0
        self.cut = False  # ended because the card left

    def quiet(self) -> bool:
        """Nothing arrived while idle: the server has not closed it or sent
        anything (an idle HTTP/1.1 connection must stay silent)."""
        if tls_buffered(self.conn):
            return False
        return not select.select([self.raw], [], [], 0)[0]

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        with self.lock:
            for start in range(0, len(view), CHUNK):
                self.conn.write(bytes(view[start : start + CHUNK]))

    def makefile(
        self, mode: str = "rb", buffering: int | None = None
    ) -> io.BufferedReader:
        self.stream = TLSStream(self.conn)
        return HeadReader(self.stream)

    def shutdown(self, cut: bool = False) -> None:
        """Wake up any reader and stop the connection, without waiting."""
        self.cut = self.cut or cut
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """http.client closes its socket as soon as a response says "Connection:
        close", while the body is still to be read: the relay calls release()."""

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        self.raw.close()


@dataclasses.dataclass(frozen=True)
class UpstreamAddress:
    """The API server as the kubeconfig names it."""

    host: str
    port: int
    prefix: str
    server_name: str  # what its certificate must name
    sni: str | None  # DNS names only, as Go does

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, url: str, tls_server_name: str | None) -> UpstreamAddress:
        import urllib.parse

        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, 0
        printable = url.isascii() and url.isprintable() and " " not in url
        if parts is None or port == 0 or not printable:
            raise ConfigError(
                f"the cluster server {url!r} is not a URL (ASCII, no spaces, a "
                "port from 1 to 65535): write https://HOST:PORT in the kubeconfig"
            )
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                f"the cluster server {url!r} is not an https:// URL: the "
                "YubiKey can only protect TLS connections"
            )
        name = tls_server_name or parts.hostname
        return cls(
            parts.hostname,
            port or 443,
            parts.path.rstrip("/"),
            name,
            sni_for(name),
        )


def sni_for(name: str) -> str | None:
    """The server_name extension Go sends for a name: none for an IP address,
    trailing dots dropped; none either for names tlslite cannot send (with '_')."""
    from tlslite.utils.dns_utils import is_valid_hostname

    host = name.rstrip(".")
    if go_ip(name) is not None or not host or not is_valid_hostname(host):
        return None
    return host


class Upstream:
    """Opens mutual-TLS connections to the API server; the card signs each
    handshake after the server's certificate has passed. The slot's certificate
    is read from the card again only when it may have changed."""

    def __init__(
        self,
        address: UpstreamAddress,
        verifier: ServerVerifier,
        certificate: Any,
        signer: CardSigner,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.address = address
        self.verifier = verifier
        self.signer = signer
        self.timeout = timeout
        self.settings = tls_settings()
        self.origin = "of unknown origin"  # from the slot's metadata, for the logs
        self.refresh_seconds = CERTIFICATE_REFRESH_SECONDS
        self.use_certificate(certificate)
        self.read_at = time.monotonic()  # the caller has just read it from the card
        self.stale = False

    def refresh_certificate(self) -> None:
        """Read the slot's certificate before the next handshake (the card was put
        back, the server refused the certificate, or SIGHUP)."""
        self.stale = True

    def certificate_rejected(self) -> UpstreamError:
        """The server refused the certificate: read it again, and say what to do."""
        self.refresh_certificate()
        return UpstreamError(
            f"the API server at {self.address.where} refused the YubiKey's client "
            f"certificate ({self.subject}): it may have expired or belong to another "
            f"cluster; check it with '{PROG} status' and "
            f"{certificate_advice(self.origin)}"
        )

    @property
    def host_header(self) -> str:
        default = self.address.port == 443
        return self.address.where.rsplit(":", 1)[0] if default else self.address.where

    def identity(self) -> tuple[Any, Any]:
        """The slot's certificate chain and key object: 'renew' (or 'setup --force')
        may replace the certificate under a running proxy, so it is read again when
        stale or after ``refresh_seconds``."""
        if not self.stale and time.monotonic() - self.read_at < self.refresh_seconds:
            return self.cert_chain, self.key
        slot = self.signer.slot
        der = self.signer.card.run(lambda piv: piv.get_certificate(slot))
        self.read_at, self.stale = time.monotonic(), False
        if der is None:
            raise CardError(
                f"slot {slot.name} of the YubiKey holds no certificate any more: "
                f"run '{PROG} setup'"
            )
        if der != self.certificate_der:
            self.use_certificate(
                load_certificate(der, f"the certificate in slot {slot.name}")
            )
            log.warning(
                "now using the certificate in slot %s: %s", slot.name, self.subject
            )
        return self.cert_chain, self.key

    def use_certificate(self, cert: Any) -> None:
        from cryptography.hazmat.primitives import serialization
        from tlslite import X509CertChain

        chain = X509CertChain()
        chain.parsePemList(cert.public_bytes(serialization.Encoding.PEM).decode())
        self.signer.algorithm = key_algorithm(cert.public_key())
        self.key = tls_private_key(self.signer, cert.public_key())
        self.cert_chain = chain
        self.subject = cert.subject.rfc4514_string()
        self.not_after = not_after(cert)
        self.certificate_der = cert.public_bytes(serialization.Encoding.DER)

    def connect(self) -> TLSSocket:
        """A fresh connection, its handshake signed by the card."""
        cert_chain, key = self.identity()
        raw = self._tcp_connect()
        conn = make_tls_connection(raw, self.verifier, self.address.where)
        signatures = self.signer.signatures
        try:
            conn.handshakeClientCert(
                cert_chain,
                key,
                settings=self.settings,
                serverName=self.address.sni,
                alpn=[bytearray(b"http/1.1")],
            )
        except BaseException as exc:  # noqa: BLE001 - closed, then re-raised as ours
            raw.close()
            signed = self.signer.signatures != signatures
            raise self._handshake_error(conn, exc, signed) from None
        raw.settimeout(None)
        return TLSSocket(conn, raw)

    def _tcp_connect(self) -> socket.socket:
        where = self.address.where
        try:
            raw = socket.create_connection(
                (self.address.host, self.address.port), timeout=self.timeout
            )
        except socket.gaierror:
            raise UpstreamError(
                f"cannot resolve the API server host {self.address.host!r}: "
                "check the server URL in the kubeconfig"
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(
                f"the API server at {where} did not answer within "
                f"{self.timeout:g} s: is the cluster reachable?"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to the API server at {where} "
                f"({exc.strerror or exc}): is the cluster up and "
                "reachable?"
            ) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return raw

    def _handshake_error(
        self, conn: Any, exc: BaseException, signed: bool
    ) -> BaseException:
        """The error to report for a failed handshake. The client certificate is
        blamed only when the server refused it with an alert that says so, after
        the card signed; everything else names the server."""
        from tlslite.constants import AlertDescription as Alert
        from tlslite.errors import TLSDecryptionFailed, TLSLocalAlert, TLSRemoteAlert

        where = self.address.where
        if getattr(conn, "rejection", None):
            return conn.rejection
        if isinstance(exc, (ProxyError, KeyboardInterrupt)):
            return exc
        alert = getattr(exc, "description", None)
        remote = isinstance(exc, TLSRemoteAlert)
        if signed and rejects_certificate(exc):
            return self.certificate_rejected()
        forged = isinstance(exc, TLSDecryptionFailed) or (
            isinstance(exc, TLSLocalAlert) and alert == Alert.decrypt_error
        )
        if forged and not signed:
            return ServerCertificateError(
                f"the API server at {where} did not prove that it holds the key of its "
                "certificate (its handshake signature is wrong): it may be an impostor; "
                "check the server URL in the kubeconfig"
            )
        if remote and not signed and alert in OFFER_ALERTS:
            return UpstreamError(
                f"the API server at {where} accepts none of what kubectl offers too "
                f"(TLS 1.2 or 1.3, ECDHE key exchange, AES-GCM or ChaCha20): {exc}"
            )
        return self._transport_error(exc)

    def _transport_error(self, exc: BaseException) -> BaseException:
        from tlslite.errors import BaseTLSException, TLSAbruptCloseError

        where = self.address.where
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(
                f"the TLS handshake with the API server at {where} took "
                f"longer than {self.timeout:g} s"
            )
        if isinstance(exc, TLSAbruptCloseError):
            return UpstreamError(
                f"the API server at {where} closed the connection during "
                "the TLS handshake: is it a Kubernetes API server?"
            )
        if isinstance(exc, (BaseTLSException, OSError)):
            return UpstreamError(
                f"the TLS handshake with the API server at {where} failed: {exc}"
            )
        return exc


class LinkPool:
    """The upstream connections the card opened, and the guarantee that none of
    them outlives the card's presence.

    With ``reuse`` (--reuse-while-present) a connection whose response ended
    cleanly is kept for up to ``idle_seconds`` and lent to one request at a
    time, each time after the presence monitor confirms that the card that
    signed it never left its reader since. When the card leaves, the idle ones
    close, and (unless ``keep_streams``) so do those still carrying a response
    or a tunnel."""

    def __init__(
        self,
        upstream: Upstream,
        monitor: PresenceMonitor,
        reuse: bool = False,
        idle_seconds: float = REUSE_IDLE_SECONDS,
        keep_streams: bool = False,
    ) -> None:
        self.upstream = upstream
        self.monitor = monitor
        self.reuse = reuse
        self.idle_seconds = idle_seconds
        self.keep_streams = keep_streams
        self._idle: list[TLSSocket] = []
        self._busy: set[TLSSocket] = set()
        self._lock = threading.Condition()
        monitor.on_change(self.card_left)
        if reuse:
            threading.Thread(target=self._expire, name="pool", daemon=True).start()

    def take(self, reuse: bool) -> tuple[TLSSocket, bool]:
        """An idle connection (and True), else a fresh one the card signs."""
        if reuse and self.reuse:
            sock = self._take_idle()
            if sock is not None:
                return sock, True
        stamp = self.monitor.stamp  # before the card signs: a pull after it shows
        sock = self.upstream.connect()
        sock.stamp = stamp
        with self._lock:
            self._busy.add(sock)
        if stamp is not None and not self.monitor.still(stamp):
            sock.shutdown(cut=not self.keep_streams)  # pulled during the handshake
        return sock, False

    def _take_idle(self) -> TLSSocket | None:
        with self._lock:
            while self._idle:
                sock = self._idle.pop()  # the most recent first
                if self.monitor.still(sock.stamp) and sock.quiet():
                    self._busy.add(sock)
                    return sock
                sock.release()
        return None

    def give_back(self, sock: TLSSocket, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(sock)
            if (
                reusable
                and self.reuse
                and not sock.cut
                and self.monitor.still(sock.stamp)
            ):
                sock.idle_since = time.monotonic()
                self._idle.append(sock)
                self._lock.notify_all()
                return
        sock.release()

    def card_left(self) -> None:
        """The presence monitor saw the card leave (or another card arrive)."""
        self.upstream.refresh_certificate()
        with self._lock:
            idle, self._idle = self._idle, []
            busy = [] if self.keep_streams else list(self._busy)
        for sock in idle:
            sock.release()
        for sock in busy:
            sock.shutdown(cut=True)
        if idle or busy:
            log.warning(
                "the YubiKey left its reader: closed %d idle and %d open upstream "
                "connections",
                len(idle),
                len(busy),
            )

    def _expire(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for sock in [
                    s for s in self._idle if now - s.idle_since >= self.idle_seconds
                ]:
                    self._idle.remove(sock)
                    sock.release()
                due = [s.idle_since + self.idle_seconds - now for s in self._idle]
                self._lock.wait(max(0.0, min(due)) if due else None)


# TLS alerts by which a server refuses a client certificate (RFC 8446 6.2).
CERTIFICATE_ALERTS = {42, 43, 44, 45, 46, 48, 49, 51, 116}
# ... and by which it says that nothing we offered suits it.
OFFER_ALERTS = {
    40,
    70,
    71,
}  # handshake_failure, protocol_version, insufficient_security


def rejects_certificate(exc: BaseException) -> bool:
    """Whether the server refused our client certificate with an alert saying so."""
    from tlslite.errors import TLSRemoteAlert

    return isinstance(exc, TLSRemoteAlert) and exc.description in CERTIFICATE_ALERTS


def enrolled_on_card(meta: SlotMetadata | None) -> bool:
    """The slot holds a signing key that was generated on the card (enroll)."""
    return (
        meta is not None
        and meta.origin == ORIGINS[ORIGIN_GENERATED]
        and can_sign(meta.algorithm)
    )


def replacement_advice(meta: SlotMetadata | None) -> str:
    """What replaces a slot's missing or mismatched certificate: a key enrolled on
    the card needs a new enrolment; any other, setup again."""
    if enrolled_on_card(meta):
        return f"run '{PROG} enroll --force'"
    return f"run '{PROG} setup --force'"


def certificate_advice(origin: str) -> str:
    """What to do about an expired or refused certificate: a key generated on the
    card (enroll) gets a new one with renew; an imported one, through setup."""
    if origin == ORIGINS[ORIGIN_GENERATED]:
        return f"run '{PROG} renew'"
    return f"run '{PROG} setup' with a current certificate"


# =============================================================================
# The HTTP relay: ThreadingHTTPServer, one fresh upstream connection per request
# =============================================================================


class RequestError(ProxyError):
    """The local client's request is not well-formed HTTP/1.1 (RFC 9112), or its
    client stopped sending it: refused, never forwarded as it is."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


# The grammar of RFC 9112 (2.2, 3, 5, 7.1) that the local hop must follow.
TCHAR = rb"!#$%&'*+.^_`|~0-9A-Za-z-"
REQUEST_LINE = re.compile(rb"([%s]+) ([^ ]+) HTTP/([0-9])\.([0-9])\r\n" % TCHAR)
ORIGIN_FORM = re.compile(rb"/(?:[-A-Za-z0-9._~!$&'()*+,;=:@/?\[\]]|%[0-9A-Fa-f]{2})*")
TARGET_OUTSIDER = re.compile(rb"[^-A-Za-z0-9._~!$&'()*+,;=:@/?\[\]%]")
FIELD_LINE = re.compile(
    rb"([%s]+):[ \t]*((?:[\x21-\x7e\x80-\xff][\t \x21-\x7e\x80-\xff]*)?)\r\n" % TCHAR
)
CONTENT_LENGTH = re.compile(rb"[0-9]{1,12}")
CHUNK_EXT_VALUE = (
    rb'(?:[%s]+|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*")'
    % TCHAR
)
CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*%s)?)*)\r\n"
    % (TCHAR, CHUNK_EXT_VALUE)
)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: [\t \x21-\x7e\x80-\xff]*)?\r\n")
CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def line_fault(line: bytes, what: str) -> str:
    """Why ``line``, which should be a field line (RFC 9112 5), is not one."""
    if line[:1] in (b" ", b"\t"):
        return f"a folded {what} (obs-fold)"
    if not line.endswith(b"\r\n"):
        return f"a {what} that does not end with CR LF"
    control = CONTROLS.search(line[:-2])
    if control:
        return f"a {what} with the control character 0x{control[0][0]:02x}"
    return f"a {what} that is not 'Name: value'"


def framing_fault(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Why the Content-Length and Transfer-Encoding fields do not frame a message
    in exactly one way (RFC 9112 6), or None."""
    lengths = [value for name, value in fields if name == b"content-length"]
    codings = [value for name, value in fields if name == b"transfer-encoding"]
    if lengths and codings:
        return "both Transfer-Encoding and Content-Length are set"
    if len(lengths) > 1 or len(codings) > 1:
        return "Content-Length or Transfer-Encoding is given more than once"
    if lengths and not CONTENT_LENGTH.fullmatch(lengths[0]):
        return f"invalid Content-Length {lengths[0].decode('latin-1')!r}"
    if codings and codings[0].lower() != b"chunked":
        return f"unsupported Transfer-Encoding {codings[0].decode('latin-1')!r}"
    return None


def request_line_fault(line: bytes) -> str | None:
    match = REQUEST_LINE.fullmatch(line)
    if not match:
        return "the request line is not 'METHOD /path HTTP/1.1'"
    if match.group(3, 4) not in ((b"1", b"0"), (b"1", b"1")):
        return "only HTTP/1.0 and HTTP/1.1 are served"
    target = match[2]
    if not target.startswith(b"/"):
        return "the request target must be a path"
    if ORIGIN_FORM.fullmatch(target):
        return None
    bad = TARGET_OUTSIDER.search(target)
    if bad:
        return f"byte 0x{bad[0][0]:02x} is not allowed in the request target"
    return "the request target has a '%' that is not followed by two hex digits"


def response_fault(head: list[bytes]) -> str | None:
    """Why an upstream response head (status line, header lines, empty line) is
    not one to relay, or None."""
    if not head or not STATUS_LINE.fullmatch(head[0]):
        return "a malformed status line"
    if head[-1] != b"\r\n":
        return "a header section that does not end with CR LF"
    fields = []
    for line in head[1:-1]:
        match = FIELD_LINE.fullmatch(line)
        if not match:
            return line_fault(line, "header line")
        fields.append((match[1].lower(), match[2].rstrip(b" \t")))
    fault = framing_fault(fields)
    return fault and f"a response where {fault}"


TRUNCATED_CHUNKED = (
    "refused: the chunked request body ended before its last chunk: the client "
    "stopped sending it; try again"
)

# Hop-by-hop headers (RFC 9110 7.6.1), plus Host (set to the upstream's) and Expect
# (the local server has answered 100-continue already).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "expect",
}


def status_body(code: int, reason: str, message: str) -> bytes:
    """A Kubernetes Status object: kubectl prints 'Error from server (reason): message'."""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    ).encode()


STATUS_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    413: "RequestEntityTooLarge",
    414: "RequestURITooLong",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ProxyServer(http.server.ThreadingHTTPServer):
    """The local listener. It carries what handlers need: the upstream, the Host
    values it accepts, and (unless plain HTTP) the TLS context for the local hop."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # a burst waits briefly; past MAX_CONNECTIONS, closed

    def __init__(
        self,
        address: tuple[str, int],
        upstream: Upstream,
        tls_context: Any,
        pool: LinkPool,
    ) -> None:
        self.upstream = upstream
        self.tls_context = tls_context
        self.pool = pool
        self.inflight = 0
        self.idle = threading.Condition()
        self.connections = 0  # local connections open, at most MAX_CONNECTIONS
        self.at_limit = False  # warned about MAX_CONNECTIONS (once per episode)
        self.accept_pause = 0.0  # grows while accept() runs out of descriptors
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, RelayHandler)
        port = self.server_address[1]
        self.allowed_hosts = {
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            f"{address[0]}:{port}",
            f"[{address[0]}]:{port}",
        }
        scheme = "http" if tls_context is None else "https"
        self.own_origins = {  # what non-browser WebSocket clients send as Origin
            f"{scheme}://{host}:{port}" for host in ("127.0.0.1", "localhost", "[::1]")
        }

    def track(self, change: int) -> None:
        """Count requests in flight (for a graceful stop)."""
        with self.idle:
            self.inflight += change
            self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.inflight == 0, timeout)

    def get_request(self) -> tuple[Any, Any]:
        try:
            sock, addr = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.out_of_descriptors(exc)
            raise
        self.accept_pause = 0.0
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms stalls
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr

    def out_of_descriptors(self, exc: OSError) -> None:
        """accept() failed for want of descriptors: the listener stays readable, so
        wait (5 ms, doubling up to 1 s) instead of spinning."""
        if not self.accept_pause:
            log.warning(
                "cannot accept local connections (%s): waiting for some to close; "
                "raise the limit of open files (ulimit -n, LimitNOFILE=) if this "
                "is not a flood",
                exc.strerror,
            )
        self.accept_pause = min(1.0, max(0.005, self.accept_pause * 2))
        time.sleep(self.accept_pause)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """At most MAX_CONNECTIONS local connections; one more is closed at once."""
        with self.idle:
            if self.connections < MAX_CONNECTIONS:
                self.connections += 1
                self.at_limit = False
                return True
            if not self.at_limit:
                log.warning(
                    "%d local connections are open, the most this proxy serves: "
                    "closing new ones until some end (is another program flooding "
                    "port %d?)",
                    MAX_CONNECTIONS,
                    self.server_address[1],
                )
            self.at_limit = True
            return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (out of memory or threads)
            self.connection_ended()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_ended()

    def connection_ended(self) -> None:
        with self.idle:
            self.connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)


class StrictRequestHandler(http.server.BaseHTTPRequestHandler):
    """http.server's handler, reading strictly (RFC 9112): a request's head is
    checked line by line before http.server parses it, a chunked body can be
    read whole and checked, and every refusal is a Status answer, logged, after
    which the connection lingers (see finish())."""

    protocol_version = "HTTP/1.1"
    lingering = False  # an error answer went out: drain the client before closing
    rfile: Any  # the socket's buffered reader, or a BytesIO of the checked head

    def handle_one_request(self) -> None:
        """Wait for the next request, check its head, then let http.server parse
        the head that passed; a refusal closes the connection."""
        try:
            head = self.read_head()
        except RequestError as exc:
            return self.refuse(exc)
        except OSError:  # idle or slow for too long, or gone: close, no answer
            head = b""
        if not head:
            self.close_connection = True
            return
        self.socket_file, self.rfile = self.rfile, io.BytesIO(head)
        try:
            super().handle_one_request()
        finally:
            self.rfile = self.socket_file

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the checked head from memory
        self.rfile = self.socket_file  # the body, if any, comes from the client
        return parsed

    def read_head(self) -> bytes:
        """The request line and header fields, checked (RFC 9112 3, 5); b"" when
        the client closed instead. The first byte may take IDLE_TIMEOUT, the head
        HEADER_TIMEOUT; then the body may pause for up to BODY_TIMEOUT."""
        self.command = self.path = self.requestline = self.request_version = ""
        self.connection.settimeout(IDLE_TIMEOUT)
        if not self.rfile.peek(1):
            return b""
        deadline = time.monotonic() + HEADER_TIMEOUT
        line = self.read_line(MAX_HEAD_BYTES + 1, deadline)
        self.note_request_line(line)
        if len(line) > MAX_HEAD_BYTES:
            limit = f"the request line is longer than {MAX_HEAD_BYTES} bytes"
            raise RequestError(f"refused: {limit}", 414)
        fault = request_line_fault(line)
        if fault:
            raise RequestError(f"refused: {fault}")
        head, fields = [line], list[tuple[bytes, bytes]]()
        while (line := self.read_line(MAX_HEAD_BYTES + 1, deadline)) != b"\r\n":
            head.append(line)
            if sum(map(len, head)) > MAX_HEAD_BYTES:
                limit = f"the request's head is longer than {MAX_HEAD_BYTES} bytes"
                raise RequestError(f"refused: {limit}", 431)
            match = FIELD_LINE.fullmatch(line)
            if not match:
                raise RequestError(f"refused: {line_fault(line, 'header line')}")
            if len(fields) == MAX_HEADER_FIELDS:
                limit = f"the request has more than {MAX_HEADER_FIELDS} header fields"
                raise RequestError(f"refused: {limit}", 431)
            fields.append((match[1].lower(), match[2].rstrip(b" \t")))
        self.check_fields(fields)
        self.connection.settimeout(BODY_TIMEOUT)
        return b"".join(head) + line

    def read_line(self, limit: int, deadline: float) -> bytes:
        """Up to and including LF, at most ``limit`` bytes, by ``deadline``: each
        read of the socket gets only the time that is left."""
        line = bytearray()
        while len(line) < limit and not line.endswith(b"\n"):
            self.connection.settimeout(max(deadline - time.monotonic(), 0.001))
            ahead = self.rfile.peek(1)[: limit - len(line)]
            if not ahead:
                raise ConnectionResetError("the client closed in a request's head")
            line += self.rfile.read(ahead.find(b"\n") + 1 or len(ahead))
        return bytes(line)

    def note_request_line(self, line: bytes) -> None:
        """Method, path and version as sent, for the log line of a refusal."""
        words = line.decode("latin-1").rstrip("\r\n").split(" ")
        self.command, self.path = words[0][:20], " ".join(words[1:2])[:200]
        self.request_version = "HTTP/1.0" if words[-1] == "HTTP/1.0" else "HTTP/1.1"

    def check_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        names = [name for name, _ in fields]
        if names.count(b"host") != 1:
            fault: str | None = "the request must have exactly one Host header"
        elif self.request_version == "HTTP/1.0" and b"transfer-encoding" in names:
            fault = "Transfer-Encoding is not allowed in an HTTP/1.0 request"
        else:
            fault = framing_fault(fields)
        if fault:
            raise RequestError(f"refused: {fault}")

    def read_chunked_body(self) -> bytes:
        """A chunked request body (RFC 9112 7.1), checked and whole, so that a
        malformed one is refused before any upstream connection; the trailer
        fields are checked and dropped."""
        body = bytearray()
        long_line = f"refused: a chunk-size line is longer than {MAX_CHUNK_LINE} bytes"
        while True:
            line = self.body_line(MAX_CHUNK_LINE, RequestError(long_line))
            match = CHUNK_LINE.fullmatch(line)
            if not match:
                shown = line.rstrip(b"\r\n")[:40].decode("latin-1")
                raise RequestError(f"refused: malformed chunk-size line {shown!r}")
            size = int(match[1], 16)
            if size == 0:
                break
            if len(body) + size > MAX_CHUNKED_BODY:
                limit = f"a chunked request body may have at most {MAX_CHUNKED_BODY}"
                raise RequestError(f"refused: {limit} bytes", 413)
            data = self.rfile.read(size)
            if len(data) < size:
                raise RequestError(TRUNCATED_CHUNKED)
            if self.rfile.read(2) != b"\r\n":
                raise RequestError("refused: a chunk's data is not followed by CR LF")
            body += data
        long_trailers = f"refused: the trailers are longer than {MAX_HEAD_BYTES} bytes"
        size = 0
        for _ in range(MAX_HEADER_FIELDS + 1):
            line = self.body_line(
                MAX_HEAD_BYTES - size, RequestError(long_trailers, 431)
            )
            size += len(line)
            if line == b"\r\n":
                return bytes(body)
            if not FIELD_LINE.fullmatch(line):
                raise RequestError(f"refused: {line_fault(line, 'trailer line')}")
        limit = f"the request has more than {MAX_HEADER_FIELDS} trailer fields"
        raise RequestError(f"refused: {limit}", 431)

    def body_line(self, limit: int, too_long: RequestError) -> bytes:
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            raise too_long
        if not line.endswith(b"\n"):
            raise RequestError(TRUNCATED_CHUNKED)
        return line

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        """What http.server itself refuses (an unknown method) gets a Status too."""
        text = message or http.HTTPStatus(code).phrase
        reason = f"refused: {text.lower()}" + (f" ({explain})" if explain else "")
        self.refuse(RequestError(reason, code))

    def refuse(self, exc: ProxyError) -> None:
        log.warning("%s %s: %s", self.command or "-", self.path or "-", exc)
        self.send_status(exc.http_status, str(exc))

    def send_status(self, code: int, message: str) -> None:
        """A Status answer from the proxy itself; the connection closes after it, as
        the request's body may not have been read (lingering, see finish())."""
        self.close_connection = self.lingering = True
        body = status_body(code, STATUS_REASONS.get(code, "InternalError"), message)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        if self.lingering:
            linger(self.connection)


class RelayHandler(StrictRequestHandler):
    """Relays one kubectl request at a time; each gets its own upstream connection.
    A chunked body is read whole and checked before the upstream is contacted."""

    server_version = PROG
    server: ProxyServer
    upstream_sock: TLSSocket | None = None  # the one carrying the current request
    reused = False  # ... and it was kept from an earlier request: no card time

    def setup(self) -> None:
        super().setup()
        if self.server.tls_context is not None:
            self.connection.settimeout(LOCAL_HANDSHAKE_TIMEOUT)
            self.connection.do_handshake()  # failures end here: handle_error logs them

    def do_relay(self) -> None:
        self.server.track(+1)
        try:
            self.relay()
        finally:
            self.server.track(-1)

    def relay(self) -> None:
        started = time.perf_counter()
        try:
            body = self.checked_body()
        except ProxyError as exc:
            return self.refuse(exc)
        reuse = not is_upgrade(self.headers)  # an upgrade gets its own connection
        while True:
            try:
                link, reused = self.upstream_link(reuse)
            except ProxyError as exc:
                return self.refuse(exc)
            keep, sock = False, cast(TLSSocket, link.sock)  # forgotten when it fails
            try:
                replayable = reused and self.replayable(body)
                keep = self.exchange(link, body, started, replayable)
                return
            except StaleConnection:
                log.info(
                    "%s %s: retried, the kept connection was stale",
                    self.command,
                    self.path,
                )
                reuse = False  # once more, on a fresh connection
            finally:
                self.upstream_sock = None
                self.server.pool.give_back(sock, keep)

    def checked_body(self) -> bytes | None:
        """Refuses what refusal() names; a chunked body is read whole (None for
        others, which are streamed)."""
        refusal = self.refusal()
        if refusal:
            raise RequestError(refusal[1], refusal[0])
        if "Transfer-Encoding" not in self.headers:
            return None
        try:
            return self.read_chunked_body()
        except OSError:
            raise RequestError(TRUNCATED_CHUNKED) from None

    def upstream_link(self, reuse: bool) -> tuple[http.client.HTTPConnection, bool]:
        """An upstream connection from the pool, and whether it was used before."""
        sock, reused = self.server.pool.take(reuse)
        self.reused = reused
        link = http.client.HTTPConnection(self.server.upstream.address.host)
        link.sock = self.upstream_sock = sock
        return link, reused

    def replayable(self, body: bytes | None) -> bool:
        """The request can be sent again as it was: no body, or one held whole."""
        return body is not None or self.headers.get("Content-Length", "0") == "0"

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_relay  # noqa: N815

    def refusal(self) -> tuple[int, str] | None:
        """Requests from browsers or naming other hosts."""
        if self.headers.get("Host", "").lower() not in self.server.allowed_hosts:
            return 403, (
                f"refused: Host {self.headers.get('Host', '')!r} does not name this "
                "proxy's loopback listener (DNS rebinding?)"
            )
        if any(k.lower().startswith("sec-fetch-") for k in self.headers):
            return 403, "refused: requests from web browsers are not relayed"
        origins = self.headers.get_all("Origin") or []
        if origins and (
            len(origins) > 1 or origins[0].lower() not in self.server.own_origins
        ):
            return 403, (
                f"refused: Origin {', '.join(origins)!r} is not this proxy's own "
                "(requests from web browsers are not relayed)"
            )
        return None

    def exchange(
        self,
        link: http.client.HTTPConnection,
        body: bytes | None,
        started: float,
        replayable: bool,
    ) -> bool:
        """Relay one request and its response; True when the upstream connection
        could carry another request. StaleConnection when a ``replayable`` request
        failed before any byte of an answer arrived."""
        from tlslite.errors import TLSAbruptCloseError

        try:
            self.forward_request(link, body)
            self.connection.settimeout(None)  # answers and tunnels may be quiet
            first = link.getresponse()
            response = self.final_response(first)
        except ProxyError as exc:
            self.refuse(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the upstream failed mid-request
            # RemoteDisconnected, a reset: not one byte of a status line arrived
            if replayable and isinstance(exc, (ConnectionError, TLSAbruptCloseError)):
                raise StaleConnection() from None
            self.upstream_failed(exc)
            return False
        if response.status == 101:
            sent = self.tunnel(response, cast(TLSSocket, link.sock))
        else:
            sent = self.forward_response(response)
        signer = self.server.upstream.signer
        log.info(
            "%s %s %d %d bytes %.1f ms (card %.1f ms)",
            self.command,
            self.path,
            response.status,
            sent,
            (time.perf_counter() - started) * 1000,
            0.0 if self.reused else signer.last_seconds * 1000,
        )
        return (
            response is first
            and response.status != 101
            and not response.will_close
            and response.isclosed()
        )

    def upstream_failed(self, exc: Exception) -> None:
        upstream = self.server.upstream
        where = upstream.address.where
        if rejects_certificate(exc):
            error = upstream.certificate_rejected()
        else:
            error = UpstreamError(
                f"the API server at {where} failed during the request "
                f"({type(exc).__name__}: {exc}): try again"
            )
        log.warning("%s %s: %s", self.command, self.path, error)
        self.send_status(error.http_status, str(error))

    def forward_request(
        self, http_conn: http.client.HTTPConnection, body: bytes | None
    ) -> None:
        """The request upstream; a chunked body (read whole) goes with its length."""
        upstream = self.server.upstream
        http_conn.putrequest(
            self.command,
            upstream.address.prefix + self.path,
            skip_host=True,
            skip_accept_encoding=True,
        )
        http_conn.putheader("Host", upstream.host_header)
        for name, value in end_to_end_headers(self.headers):
            http_conn.putheader(name, value)
        if is_upgrade(self.headers):
            http_conn.putheader("Connection", "Upgrade")
            http_conn.putheader("Upgrade", self.headers["Upgrade"])
        length = len(body) if body is not None else self.headers.get("Content-Length")
        if length is not None:
            http_conn.putheader("Content-Length", str(int(length)))
        http_conn.endheaders()
        if body is not None:
            http_conn.send(body)
        else:
            self.copy_request_body(http_conn.send, int(length or 0))

    def copy_request_body(self, write: Any, length: int) -> None:
        """Stream a Content-Length body; a client that stops short is at fault."""
        while length > 0:
            try:
                data = self.rfile.read1(min(CHUNK, length))
            except OSError:
                data = b""
            if not data:
                raise RequestError(
                    "the request body is shorter than its Content-Length: the client "
                    "stopped sending it, so the request was not completed; try again"
                )
            write(data)
            length -= len(data)

    def final_response(
        self, response: http.client.HTTPResponse
    ) -> http.client.HTTPResponse:
        """The upstream's final answer, its head checked. Interim 1xx answers before
        it (RFC 9110 15.2) go to HTTP/1.1 clients; HTTP/1.0 ones never get them."""
        while True:
            head_reader: HeadReader = response.fp  # type: ignore[assignment]
            fault = response_fault(head_reader.head)
            if fault:
                where = self.server.upstream.address.where
                raise UpstreamError(
                    f"the API server at {where} sent {fault}: the answer is not relayed"
                )
            if not 100 <= response.status < 200 or response.status == 101:
                return response
            if self.request_version != "HTTP/1.0":
                self.send_response_only(response.status, response.reason)
                for name, value in end_to_end_headers(response.headers):
                    self.send_header(name, value)
                self.end_headers()
            response.fp = None  # type: ignore[assignment]  # else closing it closes fp
            head_reader.start_head()
            same_reader: Any = types.SimpleNamespace(
                makefile=lambda _, fp=head_reader: fp
            )
            response = http.client.HTTPResponse(same_reader, method=self.command)
            response.begin()

    def forward_response(self, response: http.client.HTTPResponse) -> int:
        """Status, headers and body (streamed); returns the body's size. The body
        keeps its length if it has one; otherwise it is chunked, or for HTTP/1.0
        clients ended by closing the connection."""
        self.send_response_only(response.status, response.reason)
        for name, value in end_to_end_headers(response.headers):
            self.send_header(name, value)
        if self.request_version == "HTTP/1.0":
            self.send_header("Connection", "close")
        no_body = (
            self.command == "HEAD"
            or response.status in (204, 304)
            or 100 <= response.status < 200
        )
        length = response.headers.get("Content-Length")
        if no_body:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            return 0
        size = response.length  # http.client counts it down while reading
        if size is not None and not response.chunked:
            self.send_header("Content-Length", str(size))
            self.end_headers()
            copy_exact(response, self.wfile.write, size)
            return size
        chunked = self.request_version != "HTTP/1.0"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        return self.stream(response, chunked)

    def stream(self, response: http.client.HTTPResponse, chunked: bool) -> int:
        """Relay the body as it arrives (watch, logs -f), as chunks or as it is,
        flushing each piece. The stream ends when the client hangs up; cut because
        the card left, it ends without its last chunk, so kubectl reports it
        broken, not complete."""
        sent = 0
        upstream = self.upstream_sock
        try:
            with ended_with_client(self.connection, upstream):
                while data := response.read1(CHUNK):
                    piece = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
                    self.wfile.write(piece)
                    self.wfile.flush()
                    sent += len(data)
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # broken or cut: no last chunk
            return sent
        if upstream is not None and upstream.cut:
            self.close_connection = True
            return sent
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return sent

    def tunnel(self, response: http.client.HTTPResponse, upstream: TLSSocket) -> int:
        """After 101 Switching Protocols: bytes both ways until either side closes;
        returns the bytes sent to the client."""
        self.send_response_only(101, response.reason)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

        def client_to_server() -> None:
            with contextlib.suppress(Exception):
                while data := self.rfile.read1(CHUNK):
                    upstream.sendall(data)
            upstream.shutdown()

        sender = threading.Thread(target=client_to_server, daemon=True)
        sender.start()
        sent = 0
        with contextlib.suppress(Exception):
            while data := response.fp.read1(CHUNK):
                self.wfile.write(data)
                sent += len(data)
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        upstream.shutdown()
        sender.join()
        return sent

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s - %s", self.address_string(), format % args)


class StaleConnection(Exception):
    """A kept upstream connection failed before any answer: send the request again."""


@contextlib.contextmanager
def ended_with_client(
    client: socket.socket, upstream: TLSSocket | None
) -> Iterator[None]:
    """While a stream is relayed, a thread waits for the client to hang up
    (POLLRDHUP, nothing read) and then shuts the upstream connection down at once,
    not at the next write, which for a quiet watch may be minutes away."""
    done = threading.Event()

    def watch() -> None:
        poller = select.poll()
        poller.register(client.fileno(), select.POLLRDHUP)
        while not done.is_set():
            if poller.poll(CLIENT_WATCH_MS):
                if not done.is_set() and upstream is not None:
                    upstream.shutdown()
                return

    if upstream is not None:
        threading.Thread(target=watch, name="client-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def is_upgrade(headers: Any) -> bool:
    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return "upgrade" in tokens and "Upgrade" in headers


def end_to_end_headers(headers: Any) -> Iterator[tuple[str, str]]:
    """Headers without hop-by-hop ones (RFC 9110 7.6.1) and those named by Connection."""
    named = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    for name, value in headers.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named and lower != "content-length":
            yield name, value


def linger(sock: socket.socket) -> None:
    """Half-close, then read and drop what the client still sends (for at most
    LINGER_SECONDS and LINGER_BYTES): closing with unread data would reset the
    connection and could destroy the answer just sent (RFC 9112 9.6)."""
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_WR)
        while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(CHUNK)
            if not data:
                return
            drained += len(data)


def copy_exact(source: Any, write: Any, length: int) -> None:
    """Copy exactly ``length`` bytes in pieces of at most 64 KB."""
    while length > 0:
        data = source.read(min(CHUNK, length))
        if not data:
            raise UpstreamError(
                "the connection closed in the middle of a body: the transfer is "
                "incomplete, try again"
            )
        write(data)
        length -= len(data)


# =============================================================================
# proxy: run the relay
# =============================================================================


@dataclasses.dataclass(frozen=True)
class LocalTls:
    """The local hop's TLS material, from the extension entry setup wrote."""

    server_cert: bytes
    server_key: bytes
    client_ca: bytes

    def context(self) -> Any:
        """A server context demanding a client certificate from the local CA.
        The key goes through an anonymous in-memory file, never the disk."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.client_ca.decode())
        if not hasattr(os, "memfd_create"):  # macOS, Windows: a private temp folder
            import tempfile

            with tempfile.TemporaryDirectory(prefix="yk-kube-proxy-") as folder:
                path = Path(folder) / "local-tls.pem"
                write_private_file(path, (self.server_cert + self.server_key).decode())
                context.load_cert_chain(path)
            return context
        fd = os.memfd_create("yk-kube-proxy-local-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.server_cert + self.server_key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context


OptionsType = typing.TypeVar("OptionsType", bound="Options")


@dataclasses.dataclass(frozen=True)
class Options:
    """A command's parsed arguments as a type: made once, at the command's entry,
    so that nothing below the commands sees argparse."""

    @classmethod
    def from_args(cls: type[OptionsType], args: argparse.Namespace) -> OptionsType:
        fields = [f.name for f in dataclasses.fields(cls) if f.init and not f.kw_only]
        return cls(**{name: getattr(args, name) for name in fields})


@dataclasses.dataclass(frozen=True)
class ProxyOptions(Options):
    kubeconfig: str | None
    context: str | None
    reader: str | None
    serial: int | None
    slot: Slot | None
    pin_file: str | None
    notify: bool
    listen: str | None
    unsafe_listen: bool
    plain_http: bool
    reuse_while_present: bool
    reuse_idle: float
    keep_streams_on_removal: bool
    certificate_refresh: float
    handshake_timeout: float


@dataclasses.dataclass(frozen=True)
class ShellOptions(ProxyOptions):
    client_config: str | None
    command: list[str]


@dataclasses.dataclass(frozen=True)
class OutputOptions(Options):
    """Where setup and enroll write proxy.yml and client.yml, and what goes in."""

    slot: Slot
    force: bool
    name: str | None
    output_dir: str | None
    port: int | None
    merge: str | None
    use_context: bool
    plain_http: bool
    reuse_while_present: bool


@dataclasses.dataclass(frozen=True)
class SetupOptions(OutputOptions):
    kubeconfig: str | None
    context: str | None
    reader: str | None
    serial: int | None
    pin_file: str | None
    pin_policy: str
    touch_policy: str
    management_key: bytes | None
    management_key_file: str | None


@dataclasses.dataclass(frozen=True)
class RequestOptions(Options):
    """How enroll and renew ask the cluster's CSR API for a certificate."""

    kubeconfig: str | None
    context: str | None
    reader: str | None
    serial: int | None
    pin_file: str | None
    management_key: bytes | None
    management_key_file: str | None
    expiration: int | None
    approve: bool
    timeout: float
    admin_key: bytes = dataclasses.field(default=b"", kw_only=True)  # resolved


@dataclasses.dataclass(frozen=True)
class EnrollOptions(OutputOptions, RequestOptions):
    user: str
    group: list[str]
    algorithm: str
    bind_clusterrole: str | None
    allow_renew: bool | None
    pin_policy: str
    touch_policy: str


@dataclasses.dataclass(frozen=True)
class RenewOptions(RequestOptions):
    proxy_config: str | None
    slot: Slot | None
    if_expiring_within: float | None


@dataclasses.dataclass(frozen=True)
class StatusOptions(Options):
    kubeconfig: str | None
    reader: str | None
    serial: int | None
    slot: Slot | None
    json: bool


@dataclasses.dataclass(frozen=True)
class UnmergeOptions(Options):
    kubeconfig: str | None
    name: str


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy needs, from proxy.yml and the command line."""

    address: UpstreamAddress
    roots: list[Any]
    insecure: bool
    slot: Slot
    serial: int | None
    listen: tuple[str, int]
    local_tls: LocalTls | None
    reuse_while_present: bool = False
    reuse_idle: float = REUSE_IDLE_SECONDS
    keep_streams_on_removal: bool = False


def parse_listen(text: str, unsafe: bool, what: str = "--listen") -> tuple[str, int]:
    import ipaddress

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not (sep and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"{what} {text!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not unsafe:
        raise ConfigError(
            f"{what} {text!r} is not a loopback address: anyone who can "
            "reach it could use your cluster; pass --unsafe-listen if you "
            "really mean it"
        )
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def local_tls_from(extension: dict[str, Any], where: str) -> LocalTls:
    """The local hop's credentials; a missing or damaged entry is an error, never
    a quiet fallback to plain HTTP."""
    import base64

    local = extension.get("local-tls")
    if not local:
        raise ConfigError(
            f"{where} has no local-tls entry for the local hop's mutual TLS: run "
            f"'{PROG} setup' again (plain HTTP only with setup --plain-http or "
            "proxy --plain-http)"
        )
    keys = ("server-certificate-data", "server-key-data", "client-ca-data")
    try:
        tls = LocalTls(*(base64.b64decode(local[k], validate=True) for k in keys))
        tls.context()
    except (KeyError, TypeError, ValueError, OSError):
        raise ConfigError(
            f"the local-tls entry of {where} is damaged: run '{PROG} setup' again"
        ) from None
    return tls


def upstream_settings(cluster: Named) -> tuple[UpstreamAddress, list[Any]]:
    """The API server's address and the roots its chain must lead to."""
    from cryptography import x509

    body = cluster.body
    if not body.get("server"):
        raise ConfigError(f"{cluster.where} has no server URL: fix the kubeconfig")
    try:
        address = UpstreamAddress.parse(body["server"], body.get("tls-server-name"))
    except ConfigError as exc:
        raise ConfigError(f"{cluster.where}: {exc}") from None
    ca = read_material(cluster, "certificate-authority-data", "certificate-authority")
    try:
        roots = x509.load_pem_x509_certificates(ca) if ca else system_roots()
    except ValueError:
        raise ConfigError(
            f"the certificate-authority of {cluster.where} is not PEM "
            "certificates: fix the kubeconfig"
        ) from None
    return address, roots


def proxy_settings(args: ProxyOptions) -> ProxySettings:
    ctx = Kubeconfig(kubeconfig_paths(args.kubeconfig)).resolve(args.context)
    address, roots = upstream_settings(ctx.cluster)
    ext = ctx.extension
    where = f"the proxy kubeconfig {os.pathsep.join(map(str, ctx.sources))}"
    ours = f"the {EXTENSION_NAME} extension of {where}"
    try:
        slot = args.slot or parse_slot(ext.get("slot") or "9a")
    except ConfigError as exc:
        raise ConfigError(f"{ours}: {exc}") from None
    serial = args.serial if args.serial is not None else ext.get("serial")
    listen = (
        parse_listen(args.listen, args.unsafe_listen)
        if args.listen
        else parse_listen(
            ext.get("listen") or f"127.0.0.1:{DEFAULT_PORT}",
            args.unsafe_listen,
            f"{ours}: listen",
        )
    )
    reuse = args.reuse_while_present or bool(ext.get("reuse-while-present"))
    plain = args.plain_http or ext.get("plain-http") is True
    return ProxySettings(
        address,
        roots,
        bool(ctx.cluster.body.get("insecure-skip-tls-verify")),
        slot,
        serial,
        listen,
        None if plain else local_tls_from(ext, where),
        reuse,
        args.reuse_idle,
        args.keep_streams_on_removal,
    )


def slot_identity(card: Card, slot: Slot) -> tuple[Any, SlotMetadata | None]:
    """The slot's certificate, checked against the slot's key, and its metadata."""
    with card.session() as piv:
        der = piv.get_certificate(slot)
        meta = piv.slot_metadata(slot) if piv.has_metadata() else None
    if der is None:
        advice = f"run '{PROG} setup' first"
        if enrolled_on_card(meta):
            advice = replacement_advice(meta)
        raise ConfigError(
            f"slot {slot.name} of the YubiKey holds no certificate: {advice}"
        )
    cert = load_certificate(der, f"the certificate in slot {slot.name}")
    if meta is not None:
        refuse_non_signing(slot, meta)
        public = public_key_from_metadata(meta.algorithm, meta.public_key)
        if not same_public_key(public, cert.public_key()):
            raise KeyMismatchError(
                f"the certificate in slot {slot.name} does not belong to "
                f"its key: {replacement_advice(meta)}"
            )
    return cert, meta


def refuse_non_signing(slot: Slot, meta: SlotMetadata) -> None:
    if not can_sign(meta.algorithm):
        raise ConfigError(non_signing(slot, meta))


def non_signing(slot: Slot, meta: SlotMetadata) -> str:
    return (
        f"slot {slot.name} holds {key_words(meta.algorithm)}, which cannot sign TLS "
        f"handshakes: replace it ('{PROG} setup --force') or choose another --slot"
    )


def warn_expiry(cert: x509.Certificate, slot: Slot, origin: str) -> None:
    left = days_left(cert)
    if left < 0:
        log.warning(
            "the client certificate in slot %s expired on %s: the API server will "
            "refuse it; %s",
            slot.name,
            not_after(cert).date(),
            certificate_advice(origin),
        )
    elif left < EXPIRY_WARNING_DAYS:
        log.warning(
            "the client certificate in slot %s expires in %d days (%s)",
            slot.name,
            left,
            not_after(cert).date(),
        )


def card_signer(
    card: Card,
    settings: ProxySettings,
    args: ProxyOptions,
    cert: x509.Certificate,
    meta: SlotMetadata | None,
) -> CardSigner:
    """The slot's signer; its PIN is verified now so that a wrong one shows at once."""
    pin_policy, touch_policy = key_policies(card, settings.slot, meta, args.pin_file)
    pins = PinSource(args.pin_file, slot_label(card, settings.slot))
    signer = CardSigner(
        card,
        settings.slot,
        key_algorithm(cert.public_key()),
        pin_policy,
        pins,
        touch_policy,
        args.notify,
    )
    if pin_policy != PinPolicy.NEVER:
        card.run(lambda piv: ensure_pin(piv, PinPolicy.ALWAYS, pins))
    pins.reload_hint = (  # from now on a rejection waits for a reload
        " (the proxy will not send it again: fix the PIN or the PIN file, then "
        f"{PIN_RELOAD_HINTS[host_platform()]})"
    )
    return signer


def key_policies(
    card: Card, slot: Slot, meta: SlotMetadata | None, pin_file: str | None
) -> tuple[PinPolicy, TouchPolicy]:
    """The slot key's PIN and touch policies as the card reports them: its metadata
    (firmware 5.3+), else its attestation (a key generated on the card), else the
    user's word (a PIN file given: the PIN is needed)."""
    if meta:
        return meta.pin_policy, meta.touch_policy
    attested = card.run(lambda piv: piv.attested_policies(slot))
    if attested:
        return attested
    return (PinPolicy.ONCE if pin_file else PinPolicy.NEVER), TouchPolicy.NEVER


def build_upstream(settings: ProxySettings, card: Card, args: ProxyOptions) -> Upstream:
    check_notify(args.notify)
    install_tlslite()
    cert, meta = slot_identity(card, settings.slot)
    warn_expiry(cert, settings.slot, meta.origin if meta else "of unknown origin")
    signer = card_signer(card, settings, args, cert, meta)
    verifier = ServerVerifier(
        settings.roots, settings.address.server_name, settings.insecure
    )
    upstream = Upstream(
        settings.address, verifier, cert, signer, args.handshake_timeout
    )
    upstream.origin = meta.origin if meta else "of unknown origin"
    upstream.refresh_seconds = args.certificate_refresh
    return upstream


def cmd_proxy(namespace: argparse.Namespace) -> int:
    args = ProxyOptions.from_args(namespace)
    settings = proxy_settings(args)
    if settings.insecure:
        log.warning("%s", INSECURE_WARNING)
    card = open_card(args.reader, settings.serial)
    try:
        upstream = build_upstream(settings, card, args)
        server = start_server(settings, upstream)
    except BaseException:
        card.close()
        raise
    scheme = "https" if settings.local_tls else "http"
    print(
        f"{PROG}: listening on {scheme}://{format_address(server.server_address)} -> "
        f"https://{settings.address.where}{settings.address.prefix} (slot "
        f"{settings.slot.name}, key {upstream.origin}, certificate {upstream.subject} "
        f"until {upstream.not_after:%Y-%m-%d}, "
        f"{describe_card(card)})",
        file=sys.stderr,
        flush=True,
    )
    serve_until_signal(server, card, upstream.signer.pins)
    card.close()
    return 0


def format_address(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_server(settings: ProxySettings, upstream: Upstream) -> ProxyServer:
    """The listener, with the card's presence monitor and the connection pool."""
    context = settings.local_tls.context() if settings.local_tls else None
    if context is None:
        log.warning("%s", PLAIN_HTTP_WARNING)
    monitor = PresenceMonitor(upstream.signer.card)
    pool = LinkPool(
        upstream,
        monitor,
        settings.reuse_while_present,
        settings.reuse_idle,
        settings.keep_streams_on_removal,
    )
    try:
        server = ProxyServer(settings.listen, upstream, context, pool)
    except (OSError, ValueError, UnicodeError, OverflowError) as exc:
        where = format_address(settings.listen)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"cannot listen on {where} ({reason}): is another proxy "
            "running? choose another address with --listen"
        ) from None
    monitor.start()
    return server


def serve_until_signal(server: ProxyServer, card: Card, pins: PinSource) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting and give in-flight
    requests up to SHUTDOWN_GRACE_SECONDS. SIGHUP releases the card and reads the
    PIN file again."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def reload(signum: int, frame: Any) -> None:
        log.warning("reloading: releasing the card and reading the PIN again")
        pins.reload()
        server.upstream.refresh_certificate()
        threading.Thread(target=card.close, daemon=True).start()

    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop}
    if hasattr(signal, "SIGHUP"):  # not on Windows: restart there to reload
        handlers[signal.SIGHUP] = reload
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            sig: signal.signal(sig, handler) for sig, handler in handlers.items()
        }
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if not server.wait_idle(SHUTDOWN_GRACE_SECONDS):
            log.warning(
                "stopping with requests still open (after %g s)", SHUTDOWN_GRACE_SECONDS
            )
        pool = getattr(server, "pool", None)  # a stand-in server may have none
        if pool is not None:
            pool.monitor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shell_client_config(args: ShellOptions, port: int, directory: Path) -> Path:
    """A copy of setup's client.yml pointing at the port the shell's proxy got."""
    import yaml

    source = (
        Path(os.path.expanduser(args.client_config))
        if args.client_config
        else kubeconfig_paths(args.kubeconfig)[0].parent / "client.yml"
    )
    doc = _load_yaml(
        source, "pass the client.yml that setup wrote with --client-config"
    )
    try:
        cluster = doc["clusters"][0]["cluster"]
        scheme = cluster["server"].split("://", 1)[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ConfigError(
            f"{source} is not the client.yml that setup wrote: pass it with "
            "--client-config PATH"
        ) from None
    cluster["server"] = f"{scheme}://127.0.0.1:{port}"
    path = directory / "client.yml"
    write_private_file(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def cmd_shell(namespace: argparse.Namespace) -> int:
    """A subshell (or a command) whose kubectl goes through a proxy of its own."""
    args = ShellOptions.from_args(namespace)
    if os.environ.get(SHELL_ENV):
        raise ConfigError(
            f"this is already a {PROG} shell (KUBECONFIG="
            f"{os.environ.get('KUBECONFIG', '')}): exit it first"
        )
    settings = proxy_settings(args)
    card = open_card(args.reader, settings.serial)
    terminal = open_terminal()
    try:
        upstream = build_upstream(settings, card, args)
        upstream.signer.terminal = terminal
        server = start_server(settings, upstream)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            code = run_shell(args, server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()
            server.pool.monitor.stop()
    finally:
        card.close()
        if terminal is not None:
            terminal.close()
    return code if code >= 0 else 128 - code


def run_shell(args: ShellOptions, port: int) -> int:
    """The shell (or the command) with KUBECONFIG naming the proxy on ``port``;
    its exit code. Ctrl-C is the shell's while it runs."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory(prefix="yk-kube-proxy-") as directory:
        config = shell_client_config(args, port, Path(directory))
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        command = command or [default_shell()]
        print(
            f"{PROG}: KUBECONFIG={config} through the YubiKey; exit the shell to stop",
            file=sys.stderr,
            flush=True,
        )
        env = {**os.environ, "KUBECONFIG": str(config), SHELL_ENV: str(os.getpid())}
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return subprocess.call(command, env=env)
        except OSError as exc:
            raise ConfigError(f"cannot run {command[0]!r}: {exc.strerror}") from None
        finally:
            signal.signal(signal.SIGINT, previous)


def default_shell() -> str:
    if host_platform() == "win32":
        return os.environ.get("COMSPEC") or "cmd.exe"
    return os.environ.get("SHELL") or "/bin/sh"


def open_terminal() -> Any:
    """The controlling terminal, where shell prints the touch prompt, or None."""
    try:
        return open("CONOUT$" if host_platform() == "win32" else "/dev/tty", "w")
    except OSError:
        return None


# =============================================================================
# merge and unmerge: client.yml's context, cluster and user in a kubeconfig
# =============================================================================

MERGED_KINDS = (("clusters", "cluster"), ("contexts", "context"), ("users", "user"))


def merge_target(given: str | None) -> Path | None:
    """--merge PATH; --merge alone: $KUBECONFIG's first file, else ~/.kube/config."""
    if given is None:
        return None
    return Path(os.path.expanduser(given)) if given else kubeconfig_paths(None)[0]


def load_merge_target(path: Path) -> dict[str, Any]:
    doc = _load_yaml(path) if path.exists() else {"apiVersion": "v1", "kind": "Config"}
    for kind, _ in MERGED_KINDS:
        entries = doc.get(kind)
        if entries is not None and not isinstance(entries, list):
            raise ConfigError(f"{kind} in {path} is not a list: fix the kubeconfig")
    return doc


def merged_by_us(item: Any, inner: str) -> bool:
    body = item.get(inner) if isinstance(item, dict) else None
    return isinstance(body, dict) and "proxy-config" in find_extension(body)


def check_mergeable(doc: dict[str, Any], path: Path, name: str) -> None:
    """Refuse to replace an entry of that name that we did not write."""
    for kind, inner in MERGED_KINDS:
        for item in doc.get(kind) or []:
            named = isinstance(item, dict) and item.get("name") == name
            if named and not merged_by_us(item, inner):
                raise ConfigError(
                    f"{path} already has a {inner} named {name!r} that {PROG} "
                    "did not write: choose another --name"
                )


def merge_client(path: Path, client: dict[str, Any], use_context: bool) -> None:
    """Add or replace client.yml's three entries in place, keeping all else."""
    doc = load_merge_target(path)
    name = client["contexts"][0]["name"]
    check_mergeable(doc, path, name)
    old = [
        c["context"]
        for c in doc.get("contexts") or []
        if isinstance(c, dict) and c.get("name") == name
    ]
    old_ext = find_extension(old[0]) if old else {}
    current = doc.get("current-context")
    previous = (
        old_ext.get("previous-current-context")
        if current == name
        else (current if use_context else None)
    )
    for kind, inner in MERGED_KINDS:
        entry = copy.deepcopy(client[kind][0])
        if kind == "contexts" and previous:
            entry[inner]["extensions"][0]["extension"]["previous-current-context"] = (
                previous
            )
        entries = doc[kind] = doc.get(kind) or []
        names = [e.get("name") if isinstance(e, dict) else None for e in entries]
        if name in names:
            entries[names.index(name)] = entry
        else:
            entries.append(entry)
    if use_context:
        doc["current-context"] = name
    write_kubeconfig_with_backup(path, doc)


def write_kubeconfig_with_backup(path: Path, doc: dict[str, Any]) -> None:
    """Keep the old file as PATH.bak, then replace PATH atomically, mode 0600."""
    import yaml

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        write_private_file(backup_path(path), path.read_text())
    write_private_file(path, yaml.safe_dump(doc, sort_keys=False))


def backup_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.bak")


def print_merged(outputs: Outputs, use_context: bool) -> None:
    if outputs.merge is None:
        return
    current = (
        f"current-context is now {outputs.name!r}"
        if use_context
        else "current-context unchanged"
    )
    print(
        f"Merged context, cluster and user {outputs.name!r} into {outputs.merge} "
        f"({current}; a file that was there is kept as {backup_path(outputs.merge)}); "
        f"'{PROG} unmerge {outputs.name}' removes them."
    )


def cmd_unmerge(namespace: argparse.Namespace) -> int:
    """Remove what merge added: the three entries named NAME that carry our mark,
    and the current-context it set (the previous one comes back)."""
    args = UnmergeOptions.from_args(namespace)
    path = merge_target(args.kubeconfig or "")
    assert path is not None  # a str was given
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist: pass the merged file with --kubeconfig"
        )
    doc = load_merge_target(path)
    removed, previous = [], None
    for kind, inner in MERGED_KINDS:
        kept = []
        for item in doc.get(kind) or []:
            if (
                isinstance(item, dict)
                and item.get("name") == args.name
                and merged_by_us(item, inner)
            ):
                removed.append(inner)
                previous = previous or find_extension(item[inner]).get(
                    "previous-current-context"
                )
            else:
                kept.append(item)
        if kind in doc:
            doc[kind] = kept
    if not removed:
        raise ConfigError(
            f"{path} has no context, cluster or user named {args.name!r} that {PROG} "
            "merged: check the name (kubectl config get-contexts)"
        )
    if doc.get("current-context") == args.name:
        if previous:
            doc["current-context"] = previous
        else:
            del doc["current-context"]
    write_kubeconfig_with_backup(path, doc)
    print(
        f"Removed {args.name!r} ({', '.join(removed)}) from {path} "
        f"(the previous file is {backup_path(path)})."
    )
    return 0


# =============================================================================
# setup: move the kubeconfig's client key onto the card
# =============================================================================


def slot_occupant(piv: PivSession, slot: Slot) -> str | None:
    """What a slot holds already, in words, or None when it is empty."""
    parts = []
    meta = piv.slot_metadata(slot) if piv.has_metadata() else None
    if meta:
        parts.append(f"{key_words(meta.algorithm)} ({meta.origin})")
    der = piv.get_certificate(slot)
    if der:
        try:
            subject = load_certificate(
                der, "the slot certificate"
            ).subject.rfc4514_string()
        except ConfigError:
            subject = "an unreadable subject"
        parts.append(f"a certificate for {subject or 'an empty subject'}")
    return " and ".join(parts) or None


def prove_slot(
    piv: PivSession,
    slot: Slot,
    cert: x509.Certificate,
    pin_policy: PinPolicy,
    touch_policy: TouchPolicy,
    pins: PinSource,
) -> None:
    """Read the certificate back and have the card sign a fresh challenge that
    must verify against the certificate's public key."""
    from cryptography.hazmat.primitives import serialization

    stored = piv.get_certificate(slot)
    if stored != cert.public_bytes(serialization.Encoding.DER):
        raise CardError(
            f"the certificate read back from slot {slot.name} differs from the "
            "one written: run setup again with --force"
        )
    ensure_pin(piv, pin_policy, pins)
    if touch_policy in (TouchPolicy.ALWAYS, TouchPolicy.CACHED):
        print("Touch your YubiKey now to prove the import...", file=sys.stderr)
    algorithm = key_algorithm(cert.public_key())
    challenge = secrets.token_bytes(32)
    signature = sign_message(piv, slot, algorithm, challenge)
    if not verify_signature(cert.public_key(), algorithm, challenge, signature):
        raise CardError(
            f"the YubiKey's signature with the key just imported into slot {slot.name} "
            "does not verify: the card did not store or use the key correctly; run "
            "setup again with --force, and use another YubiKey if it happens again"
        )


def management_key(card: Card, given: bytes | None, key_file: str | None) -> bytes:
    """--management-key-file, --management-key (others can see it), the
    environment, the factory key while the card still has it, else a prompt."""
    if key_file:
        path = Path(os.path.expanduser(key_file))
        what = "the management-key file"
        text = read_secret_file(path, what, "write just the key in hex into it")
        return parse_management_key(text, f"{what} {path}")
    if given is not None:
        log.warning(
            "--management-key puts the key on the command line, where other users "
            "can see it (ps): use --management-key-file PATH or %s",
            MANAGEMENT_KEY_ENV,
        )
        return given
    if os.environ.get(MANAGEMENT_KEY_ENV):
        return parse_management_key(os.environ[MANAGEMENT_KEY_ENV], MANAGEMENT_KEY_ENV)
    if card.run(lambda piv: piv.management_key_is_default()) is not False:
        return DEFAULT_MANAGEMENT_KEY
    if not sys.stdin.isatty():
        raise ConfigError(
            "the YubiKey's management key is not the factory key and there is no "
            "terminal to ask on: pass --management-key-file PATH or set "
            f"{MANAGEMENT_KEY_ENV}"
        )
    text = getpass.getpass(
        f"Management key (hex) of {describe_card(card, 'the YubiKey')}: "
    )
    return parse_management_key(text.strip(), "the management key entered")


def parse_management_key(text: str, where: str) -> bytes:
    """A management key in hex; the message never shows the key."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) not in MANAGEMENT_KEY_LENGTHS:
        raise ConfigError(
            f"{where} is not a management key: write 32, 48 or 64 hex digits "
            "(16, 24 or 32 bytes)"
        )
    return key


def refuse_occupied(piv: PivSession, slot: Slot, force: bool, verb: str) -> None:
    """Setup and enroll change an occupied slot only with --force."""
    occupant = slot_occupant(piv, slot)
    if occupant and not force:
        raise ConfigError(
            f"slot {slot.name} of the YubiKey already holds {occupant}: pass "
            f"--force to {verb} it, or choose another --slot"
        )


def install_identity(
    card: Card, args: SetupOptions, admin_key: bytes, cert: x509.Certificate, key: Any
) -> None:
    """Import key and certificate into the slot, then prove the import."""
    from cryptography.hazmat.primitives import serialization

    slot = args.slot
    pin_policy = PinPolicy[args.pin_policy.upper()]
    touch_policy = TouchPolicy[args.touch_policy.upper()]
    pins = PinSource(args.pin_file, slot_label(card, slot))
    if args.pin_file and pin_policy != PinPolicy.NEVER:
        pins.get()  # a bad PIN file fails before the card is changed
    with card.session() as piv:
        refuse_occupied(piv, slot, args.force, "overwrite")
        piv.authenticate(admin_key)
        piv.import_key(slot, key, pin_policy, touch_policy)
        piv.put_certificate(slot, cert.public_bytes(serialization.Encoding.DER))
        prove_slot(piv, slot, cert, pin_policy, touch_policy, pins)


@dataclasses.dataclass(frozen=True)
class LocalPki:
    """The local hop's credentials: a CA whose key is thrown away after signing a
    server certificate for the loopback names and one client certificate."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def make_local_pki(days: int = LOCAL_PKI_DAYS) -> LocalPki:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{PROG} local CA")])

    def issue(key: Any, cn: str, ca: bool, extensions: list[Any]) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                ca_name
                if ca
                else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM
        )

    def private_pem(key: Any) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    names = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("localhost"),
        ]
    )
    return LocalPki(
        ca_cert=issue(ca_key, "", True, []),
        server_cert=issue(
            server_key,
            f"{PROG} local server",
            False,
            [names, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
        ),
        server_key=private_pem(server_key),
        client_cert=issue(
            client_key,
            f"{PROG} local client",
            False,
            [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
        ),
        client_key=private_pem(client_key),
    )


def b64encode(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def proxy_kubeconfig(ctx: KubeContext, settings: dict[str, Any]) -> dict[str, Any]:
    """proxy.yml: the upstream cluster, its CA inlined, no credentials."""
    import base64

    cluster = {
        k: v for k, v in ctx.cluster.body.items() if k != "certificate-authority"
    }
    ca = read_material(
        ctx.cluster, "certificate-authority-data", "certificate-authority"
    )
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    context: dict[str, Any] = {"cluster": ctx.cluster.name, "user": EXTENSION_NAME}
    if ctx.namespace:
        context["namespace"] = ctx.namespace
    context["extensions"] = [{"name": EXTENSION_NAME, "extension": settings}]
    return kubeconfig_doc(ctx.cluster.name, cluster, ctx.name, context)


def client_kubeconfig(
    outputs: Outputs, ctx: KubeContext, pki: LocalPki | None
) -> dict[str, Any]:
    """client.yml: kubectl's view, the local proxy as its server; with the local
    hop's CA and client credentials unless it is plain HTTP. Context, cluster and
    user are all named NAME and marked as ours (for merge and unmerge)."""
    name, port = outputs.name, outputs.port
    marker = [
        {"name": EXTENSION_NAME, "extension": {"proxy-config": str(outputs.proxy)}}
    ]
    context: dict[str, Any] = {"cluster": name, "user": name}
    if ctx.namespace:
        context["namespace"] = ctx.namespace
    context["extensions"] = marker
    cluster: dict[str, Any] = {"server": f"http://127.0.0.1:{port}"}
    user: dict[str, Any] = {}
    if pki is not None:
        cluster = {
            "server": f"https://127.0.0.1:{port}",
            "certificate-authority-data": b64encode(pki.ca_cert),
        }
        user = {
            "client-certificate-data": b64encode(pki.client_cert),
            "client-key-data": b64encode(pki.client_key),
        }
    cluster["extensions"] = copy.deepcopy(marker)
    user["extensions"] = copy.deepcopy(marker)
    return kubeconfig_doc(name, cluster, name, context, user, name)


def kubeconfig_doc(
    cluster_name: str,
    cluster: dict[str, Any],
    context_name: str,
    context: dict[str, Any],
    user: dict[str, Any] | None = None,
    user_name: str = EXTENSION_NAME,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": cluster}],
        "contexts": [{"name": context_name, "context": context}],
        "current-context": context_name,
        "users": [{"name": user_name, "user": user or {}}],
        "preferences": {},
    }


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where setup and enroll write, under which name, and what they merge into."""

    name: str
    proxy: Path
    client: Path
    port: int
    merge: Path | None


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} cannot name the kubeconfig context and the folder "
            f"{OUTPUT_ROOT}/NAME: pass --name with letters, digits, '.', '_' and '-' "
            "(up to 63, starting with a letter or digit)"
        )
    return name


def plan_outputs(args: OutputOptions, ctx: KubeContext, sources: list[Path]) -> Outputs:
    """The name, the files and the merge target, checked before the card is touched."""
    name = check_name(args.name or ctx.name, "--name" if args.name else "the context")
    out = Path(
        os.path.expanduser(args.output_dir or f"{OUTPUT_ROOT}/{name}")
    ).absolute()
    target = merge_target(args.merge)
    if target is not None:
        check_mergeable(load_merge_target(target), target, name)
    proxy_path, client_path = output_paths(args, out, sources)
    port = args.port or (DEFAULT_PORT if args.output_dir else free_port_beside(out))
    return Outputs(name, proxy_path, client_path, port, target)


def free_port_beside(out: Path) -> int:
    """DEFAULT_PORT, or the next one no other proxy.yml under OUTPUT_ROOT listens on."""
    used = set()
    for other in out.parent.glob("*/proxy.yml"):
        if other.parent == out:
            continue
        with contextlib.suppress(ProxyError, OSError):
            listen = str(Kubeconfig([other]).resolve(None).extension.get("listen"))
            used.add(listen.rpartition(":")[2])
    port = DEFAULT_PORT
    while str(port) in used:
        port += 1
    return port


def output_paths(
    args: OutputOptions, out: Path, sources: list[Path]
) -> tuple[Path, Path]:
    """proxy.yml and client.yml in the output folder."""
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "the path contains a NUL byte"
        raise ConfigError(
            f"cannot create the output folder {str(out)!r}: {reason}; choose "
            "another --output-dir"
        ) from None
    paths = (out / "proxy.yml", out / "client.yml")
    resolved_sources = {s.resolve() for s in sources}
    for path in paths:
        if path.resolve() in resolved_sources:
            raise ConfigError(
                f"{path} is the source kubeconfig: choose another --output-dir"
            )
        if path.exists() and not args.force:
            raise ConfigError(
                f"{path} exists already: pass --force to replace it, "
                "or choose another --output-dir or --name"
            )
    if not os.access(out, os.W_OK):
        raise ConfigError(
            f"cannot write to the output folder {out}: choose another --output-dir"
        )
    return paths


def cmd_setup(namespace: argparse.Namespace) -> int:
    args = SetupOptions.from_args(namespace)
    ctx = Kubeconfig(kubeconfig_paths(args.kubeconfig)).resolve(args.context)
    cert, key = load_client_identity(ctx)
    if days_left(cert) < 0:
        log.warning(
            "the client certificate expired on %s: the cluster will refuse it",
            not_after(cert).date(),
        )
    outputs = plan_outputs(args, ctx, ctx.sources)
    card = open_card(args.reader, args.serial)
    try:
        admin_key = management_key(card, args.management_key, args.management_key_file)
        install_identity(card, args, admin_key, cert, key)
    finally:
        card.close()
    del key
    write_proxy_files(ctx, card, args, outputs)
    print_next_steps(ctx, card, args, cert, outputs)
    return 0


def write_proxy_files(
    ctx: KubeContext, card: Card, args: OutputOptions, outputs: Outputs
) -> None:
    """proxy.yml (cluster, proxy settings, local TLS) and client.yml, mode 0600;
    client.yml's entries also merged into a kubeconfig when asked."""
    import yaml

    settings: dict[str, Any] = {
        "slot": args.slot.name,
        "listen": f"127.0.0.1:{outputs.port}",
    }
    if card.info and card.info.serial is not None:
        settings["serial"] = card.info.serial
    if args.reuse_while_present:
        settings["reuse-while-present"] = True
    pki = None if args.plain_http else make_local_pki()
    if pki is None:
        settings["plain-http"] = True  # asked for: the proxy refuses it otherwise
        log.warning("%s", PLAIN_HTTP_WARNING)
    else:
        settings["local-tls"] = {
            "server-certificate-data": b64encode(pki.server_cert),
            "server-key-data": b64encode(pki.server_key),
            "client-ca-data": b64encode(pki.ca_cert),
        }
    client = client_kubeconfig(outputs, ctx, pki)
    for path, doc in (
        (outputs.proxy, proxy_kubeconfig(ctx, settings)),
        (outputs.client, client),
    ):
        write_private_file(path, yaml.safe_dump(doc, sort_keys=False))
    if outputs.merge is not None:
        merge_client(outputs.merge, client, args.use_context)


def print_next_steps(
    ctx: KubeContext,
    card: Card,
    args: OutputOptions,
    cert: x509.Certificate,
    outputs: Outputs,
) -> None:
    algorithm = ALGORITHM_NAMES[key_algorithm(cert.public_key())]
    print(
        f"Imported the {algorithm} key and certificate "
        f"({cert.subject.rfc4514_string()}, valid until {not_after(cert):%Y-%m-%d}) "
        f"into slot {args.slot.name} of {describe_card(card, 'the card')}."
    )
    print(
        "Proved the import: the card signed a challenge that verifies against the "
        "certificate."
    )
    print(
        f"Wrote {outputs.proxy} (for the proxy) and {outputs.client} (for kubectl), "
        "mode 0600."
    )
    print_merged(outputs, args.use_context)
    print()
    print("Next steps:")
    print(f"  1. {PROG} proxy --kubeconfig {outputs.proxy}")
    if outputs.merge is None:
        print(f"  2. KUBECONFIG={outputs.client} kubectl get nodes")
    else:
        print(f"  2. kubectl --context {outputs.name} get nodes")
    sources = ", ".join(map(str, ctx.sources))
    print(
        f"  3. The private key is still in {sources} (user {ctx.user.name!r}): once the "
        "proxy works, delete it there (keep an offline backup if you need one)."
    )


# =============================================================================
# status: what is on the card
# =============================================================================


def slot_report(piv: PivSession, slot: Slot) -> dict[str, Any]:
    """Key, certificate and problems of one slot, as plain data."""
    report: dict[str, Any] = {
        "slot": slot.name,
        "key": None,
        "certificate": None,
        "problems": [],
    }
    problems = report["problems"]
    meta = piv.slot_metadata(slot) if piv.has_metadata() else None
    if meta:
        report["key"] = {
            "algorithm": ALGORITHM_NAMES.get(meta.algorithm, f"0x{meta.algorithm:02x}"),
            "pin_policy": meta.pin_policy.name.lower(),
            "touch_policy": meta.touch_policy.name.lower(),
            "origin": meta.origin,
        }
        if not can_sign(meta.algorithm):
            problems.append(("error", non_signing(slot, meta)))
    der = piv.get_certificate(slot)
    if der:
        report["certificate"] = certificate_report(der, meta, problems)
    if not meta and not der:
        problems.append(("error", f"slot {slot.name} is empty: run '{PROG} setup'"))
    elif meta and not der:
        problems.append(
            (
                "error",
                f"slot {slot.name} holds a key but no certificate: "
                f"{replacement_advice(meta)}",
            )
        )
    report["problems"] = [{"level": lvl, "message": msg} for lvl, msg in problems]
    return report


def certificate_report(
    der: bytes, meta: SlotMetadata | None, problems: list[tuple[str, str]]
) -> dict[str, Any]:
    try:
        cert = load_certificate(der, "the slot certificate")
    except ConfigError as exc:
        problems.append(("error", str(exc)))
        return {"readable": False}
    left = days_left(cert)
    info = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": not_after(cert).isoformat(),
        "days_left": left,
    }
    if left < 0:
        advice = f"renew it and run '{PROG} setup --force'"
        if meta and meta.origin == ORIGINS[ORIGIN_GENERATED]:
            advice = certificate_advice(meta.origin)  # born on the card: renew
        problems.append(
            (
                "error",
                f"the certificate expired on {not_after(cert):%Y-%m-%d}: {advice}",
            )
        )
    elif left < EXPIRY_WARNING_DAYS:
        problems.append(
            (
                "warning",
                f"the certificate expires in {left} days "
                f"({not_after(cert):%Y-%m-%d}): renew it soon",
            )
        )
    public = (
        public_key_from_metadata(meta.algorithm, meta.public_key)
        if meta and meta.public_key
        else None
    )
    if public is not None:
        info["matches_key"] = same_public_key(public, cert.public_key())
        if not info["matches_key"]:
            problems.append(
                (
                    "error",
                    "the certificate does not belong to the key in the "
                    f"slot: {replacement_advice(meta)}",
                )
            )
    return info


def card_report(card: Card, slots: list[Slot]) -> dict[str, Any]:
    with card.session() as piv:
        info = card.info or CardInfo(card.reader, piv.get_serial(), piv.version)
        return {
            "reader": info.reader,
            "serial": info.serial,
            "firmware": info.firmware,
            "pin_tries_left": piv.pin_tries_left(),
            "slots": [slot_report(piv, slot) for slot in slots],
        }


def print_card_report(report: dict[str, Any]) -> None:
    print(
        f"YubiKey serial {report['serial']}, firmware {report['firmware']}, "
        f"reader {report['reader']!r}"
    )
    print(f"  PIN tries left: {report['pin_tries_left']}")
    for slot in report["slots"]:
        key = slot["key"]
        desc = (
            f"{key['algorithm']} key, {key['origin']}, PIN policy {key['pin_policy']}, "
            f"touch policy {key['touch_policy']}"
            if key
            else "no key information"
        )
        print(f"  slot {slot['slot']}: {desc}")
        cert = slot["certificate"]
        if cert and cert.get("subject") is not None:
            print(f"    certificate: {cert['subject']}")
            print(f"    issuer:      {cert['issuer']}")
            print(
                f"    not after:   {cert['not_after']} ({cert['days_left']} days left)"
            )
        for problem in slot["problems"]:
            print(f"    {problem['level']}: {problem['message']}")


def proxy_config_status(path: str | None) -> tuple[dict[str, Any], list[str]]:
    """A proxy kubeconfig's settings (slot, serial) and what is unsafe about it."""
    if path is None:
        return {}, []
    ctx = Kubeconfig([Path(os.path.expanduser(path))]).resolve(None)
    warnings = []
    if ctx.cluster.body.get("insecure-skip-tls-verify"):
        warnings.append(INSECURE_WARNING)
    if ctx.extension.get("plain-http"):
        warnings.append(PLAIN_HTTP_WARNING)
    return ctx.extension, warnings


def cmd_status(namespace: argparse.Namespace) -> int:
    args = StatusOptions.from_args(namespace)
    settings, warnings = proxy_config_status(args.kubeconfig)
    slot = args.slot or parse_slot(settings.get("slot") or "9a")
    serial = args.serial if args.serial is not None else settings.get("serial")
    found = find_cards(args.reader)
    try:
        cards = found
        if serial is not None:
            cards = [c for c in found if c.info and c.info.serial == serial]
        if not cards:
            what = f"with serial {serial} " if serial is not None else ""
            raise NoCardError(f"no YubiKey {what}found - please insert your YubiKey")
        reports = [card_report(card, [slot]) for card in cards]
    finally:
        _close_all(found)
    if args.json:
        print(json.dumps({"cards": reports, "warnings": warnings}, indent=2))
    else:
        for report in reports:
            print_card_report(report)
        for warning in warnings:
            print(f"warning: {warning}")
    failed = any(
        p["level"] == "error"
        for r in reports
        for s in r["slots"]
        for p in s["problems"]
    )
    return 1 if failed else 0


# =============================================================================
# enroll and renew: keys born on the card, certificates from the cluster's CSR API
# =============================================================================

CSR_SIGNER = "kubernetes.io/kube-apiserver-client"
CSR_GROUP = "certificates.k8s.io"
CSR_RESOURCE = "certificatesigningrequests"
CSR_POLL_SECONDS = 1.0
CSR_PROGRESS_SECONDS = 10.0
RBAC_GROUP = "rbac.authorization.k8s.io"
RENEW_VERBS = ("create", "get", "watch")
APPROVAL_REVIEWS = [
    {
        "verb": "update",
        "group": CSR_GROUP,
        "resource": CSR_RESOURCE,
        "subresource": "approval",
    },
    {"verb": "approve", "group": CSR_GROUP, "resource": "signers", "name": CSR_SIGNER},
    {
        "verb": "approve",
        "group": CSR_GROUP,
        "resource": "signers",
        "name": CSR_SIGNER.split("/")[0] + "/*",
    },
]
FORBIDDEN_PATTERN = (
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"/]+)'
    r'(?:/(?P<sub>[^"]+))?" in API group "(?P<group>[^"]*)"'
)
SIGNER_FORBIDDEN = "user not permitted to approve requests with signerName"
ENROLL_ALGORITHMS = {
    "p256": KeyAlgorithm.ECCP256,
    "p384": KeyAlgorithm.ECCP384,
    "rsa2048": KeyAlgorithm.RSA2048,
    "ed25519": KeyAlgorithm.ED25519,
}


def remaining(seconds: float) -> str:
    """A time left in words: 40 minutes, 5 hours, 30 days."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size or unit == "minute":
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    raise AssertionError("unreachable")


def parse_duration(text: str) -> int:
    """Seconds in a duration like 90m, 720h, 30d or 1h30m (Go-like, plus days)."""
    import re

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration like 90m, 720h or 30d"
        )
    return sum(int(n) * units[u] for n, u in parts)


class KubectlError(UpstreamError):
    """kubectl failed; ``output`` is the last line it printed on stderr."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def kubectl_missing() -> ConfigError:
    return ConfigError(
        "kubectl is not installed: enroll and renew use it to reach the cluster"
    )


def kubectl_error(args: tuple[str, ...], stderr: str) -> KubectlError:
    reason = (stderr.strip().splitlines() or ["no message"])[-1]
    message = forbidden_message(reason)
    return KubectlError(
        message or f"kubectl {' '.join(args[:2])} failed: {reason}", reason
    )


class Kubectl:
    """The cluster's API through kubectl, so every kind of kubeconfig credential
    works (client certificates, tokens, exec plugins, this proxy's client.yml)."""

    def __init__(self, kubeconfig: str | None, context: str | None = None) -> None:
        self.base = ["kubectl"]
        if kubeconfig:
            self.base += ["--kubeconfig", str(Path(kubeconfig).expanduser())]
        if context:
            self.base += ["--context", context]

    def run(self, *args: str, stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [*self.base, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except FileNotFoundError:
            raise kubectl_missing() from None
        except subprocess.TimeoutExpired:
            raise UpstreamTimeout(f"kubectl {args[0]} took longer than 120 s") from None
        if done.returncode != 0:
            raise kubectl_error(args, done.stderr)
        return done.stdout

    def get_json(self, *args: str) -> dict[str, Any]:
        docs, rest = split_json(self.run(*args, "-o", "json"))
        if len(docs) != 1 or not isinstance(docs[0], dict) or rest.strip():
            raise not_json(args)
        return docs[0]

    def watch(
        self, kind: str, name: str, deadline: float
    ) -> Iterator[dict[str, Any] | None]:
        """The object as `kubectl get --watch` prints it, at first and after each
        change; None after CSR_PROGRESS_SECONDS without news. Ends at the
        deadline or when the watch does."""
        import codecs
        import select

        args = ("get", kind, name, "--watch", "-o", "json")
        try:
            process = subprocess.Popen(
                [*self.base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except FileNotFoundError:
            raise kubectl_missing() from None
        decode, buffer = codecs.getincrementaldecoder("utf-8")("replace").decode, ""
        ended = False
        try:
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, CSR_PROGRESS_SECONDS)
                assert process.stdout is not None  # stdout=PIPE
                if not select.select([process.stdout], [], [], wait)[0]:
                    if wait == CSR_PROGRESS_SECONDS:
                        yield None
                    continue
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(10)
                    ended = process.returncode is not None
                    break
                docs, buffer = split_json(buffer + decode(chunk))
                if buffer.lstrip()[:1] not in ("", "{") or not all(
                    isinstance(d, dict) for d in docs
                ):
                    raise not_json(args)
                yield from docs
        finally:
            if process.poll() is None:
                process.kill()
            stderr = process.communicate()[1]
        if ended and process.returncode:
            raise kubectl_error(args, stderr.decode(errors="replace"))


def not_json(args: tuple[str, ...]) -> UpstreamError:
    return UpstreamError(
        f"kubectl {' '.join(args[:2])} printed something that is not a Kubernetes "
        "object in JSON: check that kubectl reaches a Kubernetes API server"
    )


def split_json(text: str) -> tuple[list[Any], str]:
    """The complete JSON documents at the start of ``text``, and the rest."""
    decoder, docs, pos = json.JSONDecoder(), list[Any](), 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return docs, text[pos:]
        docs.append(doc)


# -- RBAC: what renewal needs, what a Forbidden answer lacks -------------------


def forbidden_message(reason: str) -> str | None:
    """For kubectl's report of an RBAC Forbidden answer: one line naming the
    permission refused and the command that grants it; None for anything else."""
    import re

    if SIGNER_FORBIDDEN in reason:
        return approval_refused([f"approve on signers/{CSR_SIGNER}"])
    found = re.search(FORBIDDEN_PATTERN, reason)
    if not found:
        return None
    user, verb, resource, sub, group = found.group(
        "user", "verb", "resource", "sub", "group"
    )
    if (group, resource, sub) == (CSR_GROUP, CSR_RESOURCE, "approval"):
        return approval_refused([f"update on {CSR_RESOURCE}/approval"])
    return (
        f"the cluster refused: user {user} may not {verb} "
        f"{resource}{'/' + sub if sub else ''} (API group {group or 'core'}); an "
        f"administrator grants it with: {grant_command(user, verb, resource, sub, group)}"
    )


def grant_command(
    user: str, verb: str, resource: str, sub: str | None, group: str
) -> str:
    """The kubectl commands that let USER do VERB on the resource: for what
    renewal needs, the very role enroll --allow-renew creates."""
    import shlex

    if (group, resource, sub) == (CSR_GROUP, CSR_RESOURCE, None) and (
        verb in RENEW_VERBS
    ):
        role, verbs = renewal_role_name(user), ",".join(RENEW_VERBS)
    else:
        role, verbs = f"yubikey-{verb}-{resource}-{safe_name(user)}", verb
    target = ".".join(filter(None, (resource, group))) + (f"/{sub}" if sub else "")
    return (
        f"kubectl create clusterrole {role} --verb={verbs} --resource={target} && "
        f"kubectl create clusterrolebinding {role} --clusterrole={role} "
        f"--user={shlex.quote(user)}"
    )


def approval_refused(missing: list[str]) -> str:
    return (
        "this kubeconfig's user may not approve certificate requests (it lacks "
        f"{' and '.join(missing)} in API group {CSR_GROUP}): leave out --approve "
        "and let an administrator run kubectl certificate approve, since whoever "
        "may approve can mint a certificate for any user"
    )


def access_reviews(kube: Kubectl, attributes: list[dict[str, str]]) -> list[bool]:
    """Ask the cluster, in one SelfSubjectAccessReview each, whether this
    kubeconfig's user may do these things."""
    items = [
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": a},
        }
        for a in attributes
    ]
    out = kube.run(
        "create",
        "--validate=false",
        "-o",
        "json",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    docs, rest = split_json(out)
    answers: list[Any] = []
    for doc in docs:
        is_list = isinstance(doc, dict) and doc.get("kind") == "List"
        answers += (doc.get("items") or []) if is_list else [doc]
    allowed = [review_allowed(a) for a in answers]
    if (
        rest.strip()
        or len(allowed) != len(items)
        or not all(isinstance(a, bool) for a in allowed)
    ):
        raise UpstreamError(
            "the cluster's answer to the access reviews (SelfSubjectAccessReview) is "
            "not understood: check that kubectl reaches a Kubernetes API server"
        )
    return cast(list[bool], allowed)  # each checked above


def review_allowed(answer: Any) -> bool | None:
    """status.allowed of a SelfSubjectAccessReview answer (None if it has none)."""
    status = answer.get("status") if isinstance(answer, dict) else None
    return status.get("allowed") if isinstance(status, dict) else None


def check_approval_rights(kube: Kubectl) -> None:
    """--approve only with the rights to approve, asked of the cluster first with
    access reviews (never found out by trying), before the card signs a request."""
    update, signer, signer_domain = access_reviews(kube, APPROVAL_REVIEWS)
    missing = [] if update else [f"update on {CSR_RESOURCE}/approval"]
    if not (signer or signer_domain):
        missing.append(f"approve on signers/{CSR_SIGNER}")
    if missing:
        raise ConfigError(approval_refused(missing))


def cluster_role_binding(user: str, role: str, name: str = "") -> dict[str, Any]:
    """A ClusterRoleBinding of ROLE for USER (what --bind-clusterrole creates)."""
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name or f"yubikey-{safe_name(user)}"},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "User", "name": user}],
    }


def renewal_role_name(user: str) -> str:
    return f"yubikey-renew-{safe_name(user)}"


def renewal_rbac(user: str) -> list[dict[str, Any]]:
    """A ClusterRole that lets USER create and follow certificate requests and
    nothing more (approving stays with an administrator), and its binding."""
    name = renewal_role_name(user)
    rule = {"apiGroups": [CSR_GROUP], "resources": [CSR_RESOURCE]}
    role = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{**rule, "verbs": list(RENEW_VERBS)}],
    }
    return [role, cluster_role_binding(user, name, name)]


def enroll_rbac(args: EnrollOptions) -> list[dict[str, Any]]:
    objects = []
    if args.bind_clusterrole:
        objects.append(cluster_role_binding(args.user, args.bind_clusterrole))
    allow_renew = args.allow_renew
    if allow_renew is None:
        allow_renew = bool(args.bind_clusterrole)
    return objects + (renewal_rbac(args.user) if allow_renew else [])


def create_objects(kube: Kubectl, objects: list[dict[str, Any]]) -> None:
    """Create each object, or accept one of its name that already says the same."""
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            kube.run("create", "--validate=false", "-f", "-", stdin=json.dumps(obj))
        except KubectlError as exc:
            if "(AlreadyExists)" not in exc.output:
                raise
            found = kube.get_json("get", kind.lower(), name)
            if any(
                found.get(k) != v
                for k, v in obj.items()
                if k in ("rules", "roleRef", "subjects")
            ):
                raise ConfigError(
                    f"a {kind} named {name} already exists with other content: "
                    f"compare it (kubectl get {kind.lower()} {name} -o yaml), delete "
                    "it if it is stale, and run enroll again"
                ) from None


def csr_object(name: str, request_pem: bytes, expiration: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "request": b64encode(request_pem),
        "signerName": CSR_SIGNER,
        "usages": ["client auth"],
    }
    if expiration:
        spec["expirationSeconds"] = expiration
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": spec,
    }


def request_certificate(
    kube: Kubectl, name: str, request_pem: bytes, args: RequestOptions
) -> Any:
    """Create the CSR, approve it if asked, and wait for the certificate."""
    body = json.dumps(csr_object(name, request_pem, args.expiration))
    kube.run("create", "--validate=false", "-f", "-", stdin=body)
    if args.approve:
        kube.run("certificate", "approve", name)
    else:
        print(
            f"Waiting up to {args.timeout:g} s for an administrator to run: "
            f"kubectl certificate approve {name}",
            file=sys.stderr,
            flush=True,
        )
    return wait_for_certificate(kube, name, args.timeout)


def wait_for_certificate(kube: Kubectl, name: str, timeout: float) -> x509.Certificate:
    """Follow the request (a watch, not polling: through the proxy a few card
    signatures, not one a second) until its certificate is issued, it is denied
    or failed, or time is up."""
    deadline = time.monotonic() + timeout
    approved = False
    while time.monotonic() < deadline:
        for csr in kube.watch("certificatesigningrequest", name, deadline):
            if csr is None and approved:
                break  # issuing takes moments: a fresh watch reads it again
            if csr is None:
                left = max(0.0, deadline - time.monotonic())
                print(
                    f"still waiting for {name} ({left:.0f} s left)...",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            cert, now_approved = csr_outcome(csr, name)
            if cert is not None:
                return cert
            if now_approved and not approved:
                print(
                    f"{name} is approved; waiting for the cluster to issue its "
                    "certificate...",
                    file=sys.stderr,
                    flush=True,
                )
            approved = approved or now_approved
        if time.monotonic() < deadline:
            time.sleep(CSR_POLL_SECONDS)  # the watch ended: watch again
    raise UpstreamTimeout(
        f"no certificate for request {name} after {timeout:g} s: approve it "
        f"(kubectl certificate approve {name}) and run the command again"
    )


def csr_outcome(csr: dict[str, Any], name: str) -> tuple[Any, bool]:
    """(the issued certificate or None, whether the request is approved); a
    denied or failed request raises."""
    import base64

    status = csr.get("status") or {}
    if not isinstance(status, dict) or not isinstance(
        status.get("conditions") or [], list
    ):
        raise UpstreamError(f"the cluster's answer about {name} is not understood")
    approved = False
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Denied", "Failed"):
            why = (
                condition.get("message") or condition.get("reason") or "no reason given"
            )
            raise UpstreamError(
                f"the cluster {condition['type'].lower()} certificate request "
                f"{name}: {why}"
            )
        approved = approved or condition.get("type") == "Approved"
    if not status.get("certificate"):
        return None, approved
    return (
        load_certificate(
            base64.b64decode(status["certificate"]), f"the certificate of {name}"
        ),
        approved,
    )


def check_issued(
    cert: x509.Certificate, public_key: Any, requested: int | None
) -> None:
    """The certificate must carry the card's key; report a shortened lifetime."""
    if not same_public_key(cert.public_key(), public_key):
        raise KeyMismatchError(
            "the certificate the cluster issued does not carry the key on the card: "
            "refusing it; check the cluster's signer and try again"
        )
    lifetime = (not_after(cert) - cert.not_valid_before_utc).total_seconds()
    if requested and lifetime < requested - 3600:
        print(
            f"The cluster granted {lifetime / 86400:.1f} days instead of the "
            f"{requested / 86400:.1f} requested (valid until "
            f"{not_after(cert):%Y-%m-%d %H:%M} UTC).",
            file=sys.stderr,
        )


def card_csr(
    piv: PivSession,
    slot: Slot,
    algorithm: KeyAlgorithm,
    public_key: Any,
    subject: Any,
) -> bytes:
    """A PKCS#10 request in PEM whose self-signature the card makes (proof of
    possession), checked before it leaves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    info = csr_info(subject, public_key)
    hash_name = CSR_SIGNATURE_ALGORITHMS[algorithm][1]
    signature = sign_message(piv, slot, algorithm, info, hash_name)
    request = x509.load_der_x509_csr(csr_der(info, algorithm, signature))
    if not request.is_signature_valid:
        raise CardError(
            "the YubiKey's signature on the certificate request does not verify with "
            f"the public key of slot {slot.name}: the card answered wrongly; run the "
            "command again, and use another YubiKey if it happens again"
        )
    return request.public_bytes(serialization.Encoding.PEM)


def enroll_subject(args: EnrollOptions) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if "system:masters" in args.group:
        raise ConfigError(
            "Kubernetes refuses client certificates for group system:masters from the "
            "CSR API: enroll without it and grant rights with --bind-clusterrole "
            "cluster-admin"
        )
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in args.group]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, args.user))
    return x509.Name(attributes)


@dataclasses.dataclass(frozen=True)
class EnrollSlot:
    """Where enroll makes the key. On firmware 5.7 a key already in the target
    stays there while the new one is made in an empty retired slot and moved in
    once its certificate is issued; so a failure deletes only the new key."""

    target: Slot
    work: Slot
    can_delete: bool
    target_had_key: bool

    @property
    def restorable(self) -> bool:
        return self.can_delete and (self.work != self.target or not self.target_had_key)


def enroll_slot(piv: PivSession, args: EnrollOptions) -> EnrollSlot:
    refuse_occupied(piv, args.slot, args.force, "replace")
    can_delete = piv.version >= MOVE_KEY_VERSION
    had_key = can_delete and piv.slot_metadata(args.slot) is not None
    work = args.slot
    if had_key:
        retired = [s for s in SLOTS.values() if 0x82 <= s.key <= 0x95]
        free = (s for s in reversed(retired) if slot_occupant(piv, s) is None)
        work = next(free, args.slot)
    return EnrollSlot(args.slot, work, can_delete, had_key)


def generate_enroll_key(card: Card, args: EnrollOptions, where: EnrollSlot) -> Any:
    with card.session() as piv:
        piv.authenticate(args.admin_key)
        return piv.generate_key(
            where.work,
            ENROLL_ALGORITHMS[args.algorithm],
            PinPolicy[args.pin_policy.upper()],
            TouchPolicy[args.touch_policy.upper()],
        )


def sign_enroll_request(
    card: Card, args: EnrollOptions, slot: Slot, public_key: Any, subject: Any
) -> bytes:
    """Have the card sign the request for the key it just generated."""
    touch_policy = TouchPolicy[args.touch_policy.upper()]
    label = slot_label(card, slot)
    with card.session() as piv:
        ensure_pin(
            piv, PinPolicy[args.pin_policy.upper()], PinSource(args.pin_file, label)
        )
        if touch_policy in (TouchPolicy.ALWAYS, TouchPolicy.CACHED):
            print("Touch your YubiKey now to sign the request...", file=sys.stderr)
        algorithm = ENROLL_ALGORITHMS[args.algorithm]
        return card_csr(piv, slot, algorithm, public_key, subject)


def undo_enroll(card: Card, args: EnrollOptions, where: EnrollSlot) -> str:
    """Put the slot back as enroll found it; else say what is left in it ('' when
    it is as it was)."""
    try:
        with card.session() as piv:
            if where.restorable:
                if piv.slot_metadata(where.work) is not None:
                    piv.authenticate(args.admin_key)
                    piv.move_key(where.work, None)
                return ""
            der = piv.get_certificate(where.target)
    except ProxyError as exc:
        return (
            f"slot {where.work.name} may still hold the key generated for this "
            f"request ({exc}): check it with {PROG} status --slot {where.work.name}"
        )
    certificate = "no certificate"
    if der:
        try:
            subject = load_certificate(der, "the slot certificate").subject
            holder = f"for {subject.rfc4514_string()}"
        except ConfigError:
            holder = "(unreadable)"
        certificate = (
            f"the certificate {holder} it held before, which does not belong to "
            "that key"
        )
    why = (
        "no retired slot was free to keep the old key in"
        if where.can_delete
        else "this YubiKey cannot delete keys (firmware 5.7 can)"
    )
    name = ALGORITHM_NAMES[ENROLL_ALGORITHMS[args.algorithm]]
    return (
        f"slot {where.target.name} of the YubiKey now holds the {name} key generated "
        f"for this request and {certificate}, as {why}: run enroll again with "
        "--force, or choose another --slot"
    )


def add_note(exc: BaseException, note: str) -> None:
    """Append what is left in the slot to the error the user sees."""
    if note and isinstance(exc, ProxyError):
        exc.args = (f"{exc}; {note}",)
    elif note:
        print(f"{PROG}: {note}", file=sys.stderr)


def install_enrolled(
    card: Card, args: EnrollOptions, where: EnrollSlot, cert: x509.Certificate
) -> None:
    """Move the new key in place (firmware 5.7: over the old one) and store its
    certificate."""
    from cryptography.hazmat.primitives import serialization

    with card.session() as piv:
        piv.authenticate(args.admin_key)
        if where.work != where.target:
            piv.move_key(where.target, None)
            piv.move_key(where.work, where.target)
        piv.put_certificate(where.target, cert.public_bytes(serialization.Encoding.DER))


def store_certificate(
    card: Card, slot: Slot, admin_key: bytes, cert: x509.Certificate
) -> None:
    from cryptography.hazmat.primitives import serialization

    with card.session() as piv:
        piv.authenticate(admin_key)
        piv.put_certificate(slot, cert.public_bytes(serialization.Encoding.DER))


def enroll_on_card(
    card: Card, kube: Kubectl, args: EnrollOptions, subject: Any
) -> tuple[str, Any]:
    """Generate the key, have its certificate issued and the user's roles made,
    then install it; a failure on the way leaves the slot as it was where the
    card allows, and otherwise says what is left."""
    with card.session() as piv:
        where = enroll_slot(piv, args)
    public_key = generate_enroll_key(card, args, where)
    try:
        request = sign_enroll_request(card, args, where.work, public_key, subject)
        name = csr_name(args.user, card)
        cert = request_certificate(kube, name, request, args)
        check_issued(cert, public_key, args.expiration)
        create_objects(kube, enroll_rbac(args))
    except BaseException as exc:
        add_note(exc, undo_enroll(card, args, where))
        raise
    try:
        install_enrolled(card, args, where, cert)
    except ProxyError as exc:
        add_note(
            exc,
            f"check what slot {args.slot.name} holds with {PROG} status --slot "
            f"{args.slot.name}",
        )
        raise
    return name, cert


def safe_name(user: str) -> str:
    """A user name as a Kubernetes object name part."""
    import re

    return re.sub(r"[^a-z0-9.-]+", "-", user.lower()).strip("-.")[:40] or "user"


def csr_name(user: str, card: Card) -> str:
    serial = card.info.serial if card.info and card.info.serial is not None else "card"
    return (
        f"yubikey-{safe_name(user)}-{serial}-{int(time.time())}-{secrets.token_hex(2)}"
    )


def cluster_context(args: EnrollOptions) -> KubeContext:
    """The cluster to write into proxy.yml: from the kubeconfig, or, when that is a
    proxy's client.yml, from the proxy.yml beside it."""
    paths = kubeconfig_paths(args.kubeconfig)
    ctx = Kubeconfig(paths).resolve(args.context)
    older = ctx.user.name == EXTENSION_NAME == ctx.cluster.name  # before names
    if "proxy-config" in ctx.extension or older:  # a client.yml setup or enroll wrote
        beside = recorded_proxy_config(ctx, paths[0])
        if not beside.exists():
            raise ConfigError(
                f"{paths[0]} is a proxy's client.yml but there is no proxy.yml beside "
                "it to take the cluster from: use an admin kubeconfig"
            )
        ctx = Kubeconfig([beside]).resolve(None)
    return ctx


def recorded_proxy_config(ctx: KubeContext, kubeconfig: Path) -> Path:
    """The proxy.yml a client.yml (or a merged context) names, else the one beside."""
    recorded = ctx.extension.get("proxy-config")
    if isinstance(recorded, str) and Path(recorded).exists():
        return Path(recorded)
    return kubeconfig.resolve().parent / "proxy.yml"


def cmd_enroll(namespace: argparse.Namespace) -> int:
    args = EnrollOptions.from_args(namespace)
    subject = enroll_subject(args)
    ctx = cluster_context(args)
    outputs = plan_outputs(args, ctx, [])
    kube = Kubectl(args.kubeconfig, args.context)
    if args.approve:
        check_approval_rights(kube)
    card = open_card(args.reader, args.serial)
    try:
        args = dataclasses.replace(  # the key itself, from wherever it comes
            args,
            admin_key=management_key(
                card, args.management_key, args.management_key_file
            ),
        )
        name, cert = enroll_on_card(card, kube, args, subject)
    finally:
        card.close()
    write_proxy_files(ctx, card, args, outputs)
    print(
        f"Enrolled {subject.rfc4514_string()}: "
        f"{with_article(ALGORITHM_NAMES[ENROLL_ALGORITHMS[args.algorithm]])} "
        f"key generated on {describe_card(card, 'the card')}, slot "
        f"{args.slot.name}; certificate from request {name}, valid until "
        f"{not_after(cert):%Y-%m-%d %H:%M} UTC. The key has never been anywhere else."
    )
    print(
        f"Wrote {outputs.proxy} and {outputs.client}; next: {PROG} proxy --kubeconfig "
        f"{outputs.proxy}"
    )
    print_merged(outputs, args.use_context)
    return 0


def proxy_settings_beside(args: RenewOptions) -> dict[str, Any]:
    """The extension entry of --proxy-config, else of the proxy.yml beside --kubeconfig."""
    paths = kubeconfig_paths(args.kubeconfig)
    path = Path(os.path.expanduser(args.proxy_config)) if args.proxy_config else None
    if path is None:
        path = paths[0].resolve().parent / "proxy.yml"
        with contextlib.suppress(ConfigError):  # kubectl will say what is wrong
            path = recorded_proxy_config(
                Kubeconfig(paths).resolve(args.context), paths[0]
            )
    if not path.exists():
        if args.proxy_config:
            raise ConfigError(
                f"cannot read the proxy config {path}: no such file; pass the "
                "proxy.yml that setup or enroll wrote with --proxy-config"
            )
        return {}
    return Kubeconfig([path]).resolve(None).extension


def cmd_renew(namespace: argparse.Namespace) -> int:
    """A new certificate for the same on-card key, through the running proxy."""
    args = RenewOptions.from_args(namespace)
    settings = proxy_settings_beside(args)
    slot = args.slot or parse_slot(str(settings.get("slot", "9a")))
    serial = args.serial if args.serial is not None else settings.get("serial")
    kube = Kubectl(args.kubeconfig, args.context)
    card = open_card(args.reader, serial)
    try:
        args = dataclasses.replace(  # the key itself, from wherever it comes
            args,
            admin_key=management_key(
                card, args.management_key, args.management_key_file
            ),
        )
        return renew_on_card(card, kube, slot, args)
    finally:
        card.close()


def common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "user"


def renew_on_card(card: Card, kube: Kubectl, slot: Slot, args: RenewOptions) -> int:
    cert, meta = slot_identity(card, slot)
    left = (
        not_after(cert) - datetime.datetime.now(datetime.timezone.utc)
    ).total_seconds()
    if args.if_expiring_within is not None and left > args.if_expiring_within:
        print(
            f"The certificate in slot {slot.name} is valid until "
            f"{not_after(cert):%Y-%m-%d %H:%M} UTC ({remaining(left)} left): nothing to do."
        )
        return 0
    if args.approve:
        check_approval_rights(kube)
    algorithm = key_algorithm(cert.public_key())
    label = slot_label(card, slot)
    pins = PinSource(args.pin_file, label)
    pin_policy, _ = key_policies(card, slot, meta, args.pin_file)

    def sign_request(piv: PivSession) -> bytes:
        ensure_pin(piv, pin_policy, pins)
        return card_csr(piv, slot, algorithm, cert.public_key(), cert.subject)

    request = card.run(sign_request)
    name = csr_name(common_name(cert), card)
    new = request_certificate(kube, name, request, args)
    check_issued(new, cert.public_key(), args.expiration)
    store_certificate(card, slot, args.admin_key, new)
    print(
        f"Renewed the certificate in slot {slot.name} ({cert.subject.rfc4514_string()}): "
        f"valid until {not_after(new):%Y-%m-%d %H:%M} UTC, same key. A running proxy "
        "uses it from its next request."
    )
    return 0


# =============================================================================
# Command line
# =============================================================================


def management_key_arg(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "the management key must be hexadecimal"
        ) from None
    if len(key) not in MANAGEMENT_KEY_LENGTHS:
        raise argparse.ArgumentTypeError(
            "the management key has 32, 48 or 64 hex digits (16, 24 or 32 bytes)"
        )
    return key


def slot_arg(text: str) -> Slot:
    try:
        return parse_slot(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds between 0 and 86400"
        )
    return seconds


def port_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def serial_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a YubiKey serial number")
    return int(text)


def card_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more output: -v info, -vv debug with an APDU trace",
    )
    common.add_argument(
        "--reader",
        metavar="SUBSTR",
        help="use the reader whose name contains SUBSTR "
        "(default: readers named YubiKey/Yubico)",
    )
    common.add_argument(
        "--serial",
        type=serial_arg,
        metavar="N",
        help="use the YubiKey with this serial number",
    )
    return common


def proxy_options() -> argparse.ArgumentParser:
    """Options of proxy and shell."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="the proxy.yml setup wrote (default: $KUBECONFIG, else ~/.kube/config)",
    )
    options.add_argument(
        "--context", metavar="NAME", help="context (default: current-context)"
    )
    options.add_argument("--slot", type=slot_arg, help="PIV slot (default: from setup)")
    options.add_argument(
        "--pin-file",
        metavar="PATH",
        help="read the PIN from this file instead of prompting (read again on SIGHUP)",
    )
    options.add_argument(
        "--notify",
        action="store_true",
        help="desktop notification (notify-send) when the card waits for a touch",
    )
    options.add_argument(
        "--reuse-while-present",
        action="store_true",
        help="keep upstream connections for the next requests, also of later "
        "kubectl runs, while the card that signed them stays in its reader: "
        "fewer signatures (default: from setup, else a fresh one per request)",
    )
    options.add_argument(
        "--reuse-idle",
        type=seconds_arg,
        default=REUSE_IDLE_SECONDS,
        metavar="SECONDS",
        help="with --reuse-while-present, close connections idle this long "
        f"(default: {REUSE_IDLE_SECONDS:g})",
    )
    options.add_argument(
        "--keep-streams-on-removal",
        action="store_true",
        help="let open watches, logs -f and exec/attach/port-forward sessions run "
        "on after the card is pulled (default: they end at once)",
    )
    options.add_argument(
        "--certificate-refresh",
        type=seconds_arg,
        default=CERTIFICATE_REFRESH_SECONDS,
        metavar="SECONDS",
        help="read the slot's certificate again at most this often, to pick up "
        f"'renew' (default: {CERTIFICATE_REFRESH_SECONDS:g})",
    )
    options.add_argument(
        "--handshake-timeout",
        type=seconds_arg,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="connecting and the TLS handshake with the API server, card "
        f"touch included (default: {HANDSHAKE_TIMEOUT:g})",
    )
    return options


def expiration_arg(text: str) -> int:
    seconds = parse_duration(text)
    if seconds < 600:
        raise argparse.ArgumentTypeError(
            "Kubernetes issues certificates for at least 10 minutes (--expiration 10m)"
        )
    return seconds


def add_certificate_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expiration",
        type=expiration_arg,
        metavar="DURATION",
        default=None,
        help="requested lifetime, at least 10m (e.g. 720h, 365d); the cluster may "
        "grant less (default: the cluster's)",
    )
    parser.add_argument(
        "--approve",
        action="store_true",
        help="approve the request ourselves: only with the rights to approve, "
        "which are checked first (SelfSubjectAccessReview)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for approval and the certificate (default: 300)",
    )


def add_management_key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--management-key-file",
        metavar="PATH",
        help="read the card's management key (hex) from this file (default: "
        f"${MANAGEMENT_KEY_ENV}, else the factory key while the card has it, else "
        "a prompt)",
    )
    group.add_argument(
        "--management-key",
        type=management_key_arg,
        metavar="HEX",
        help="the management key on the command line, where other users can see it",
    )


def add_card_write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--slot", type=slot_arg, default=SLOTS["9a"], help="PIV slot (default: 9a)"
    )
    add_management_key_options(parser)
    parser.add_argument(
        "--pin-policy",
        choices=["never", "once", "always"],
        default="never",
        help="when the card asks for the PIN (default: never)",
    )
    parser.add_argument(
        "--touch-policy",
        choices=["never", "always", "cached"],
        default="never",
        help="when the card asks for a touch (default: never)",
    )
    parser.add_argument(
        "--pin-file",
        metavar="PATH",
        help="read the PIN from this file instead of prompting",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an occupied slot and existing proxy.yml/client.yml",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where setup and enroll write proxy.yml and client.yml, and what goes in."""
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="the name of client.yml's context, cluster and user, and of the folder "
        f"{OUTPUT_ROOT}/NAME (default: the source context's name)",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where proxy.yml and client.yml go, created if missing "
        f"(default: {OUTPUT_ROOT}/NAME)",
    )
    parser.add_argument(
        "--port",
        type=port_arg,
        help=f"local port of the proxy (default: {DEFAULT_PORT}, or the next one that "
        f"no other proxy.yml in {OUTPUT_ROOT} uses)",
    )
    parser.add_argument(
        "--merge",
        nargs="?",
        const="",
        metavar="PATH",
        help="also add client.yml's context, cluster and user to this kubeconfig "
        "(default: $KUBECONFIG's first file, else ~/.kube/config), keeping a .bak",
    )
    parser.add_argument(
        "--use-context",
        action="store_true",
        help="with --merge: make NAME the current context",
    )
    parser.add_argument(
        "--plain-http",
        action="store_true",
        help="kubectl reaches the proxy over plain HTTP instead of mutual TLS",
    )
    parser.add_argument(
        "--reuse-while-present",
        action="store_true",
        help="make the proxy reuse an upstream connection within one kubectl run while "
        "the card answers (see proxy --help)",
    )


def add_setup_command(commands: Any, common: argparse.ArgumentParser) -> None:
    setup = commands.add_parser(
        "setup",
        parents=[common],
        help="import a kubeconfig's client key into the YubiKey",
        description="Import the client key and certificate of a kubeconfig context into a "
        "PIV slot, prove it, and write proxy.yml and client.yml.",
    )
    setup.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="source kubeconfig (default: $KUBECONFIG, else ~/.kube/config)",
    )
    setup.add_argument(
        "--context", metavar="NAME", help="context (default: current-context)"
    )
    add_card_write_options(setup)
    add_output_options(setup)
    setup.set_defaults(func=cmd_setup)


def add_proxy_command(commands: Any, common: argparse.ArgumentParser) -> None:
    proxy = commands.add_parser(
        "proxy",
        parents=[common, proxy_options()],
        help="relay kubectl's requests, the YubiKey signing each",
        description="Listen on loopback and relay each request over a fresh mutual-TLS "
        "connection to the API server, whose handshake the YubiKey signs.",
    )
    proxy.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="local address (default: from setup, else 127.0.0.1:8080)",
    )
    proxy.add_argument(
        "--unsafe-listen",
        action="store_true",
        help="allow a --listen address that is not loopback",
    )
    proxy.add_argument(
        "--plain-http",
        action="store_true",
        help="serve plain HTTP on the local hop, whatever proxy.yml says: any "
        "local user can then act as the card's identity",
    )
    proxy.set_defaults(func=cmd_proxy)


def add_shell_command(commands: Any, common: argparse.ArgumentParser) -> None:
    shell = commands.add_parser(
        "shell",
        parents=[common, proxy_options()],
        help="a shell whose kubectl goes through the YubiKey",
        description="Start the proxy on a free loopback port and a subshell (or COMMAND) "
        "with KUBECONFIG pointing at it; the proxy stops when the shell exits, "
        "and the shell's exit code is passed on.",
    )
    shell.add_argument(
        "--client-config",
        metavar="PATH",
        help="the client.yml setup wrote (default: beside --kubeconfig)",
    )
    shell.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="run this instead of $SHELL (after --)",
    )
    shell.set_defaults(
        func=cmd_shell, listen="127.0.0.1:0", unsafe_listen=False, plain_http=False
    )


def add_enroll_command(commands: Any, common: argparse.ArgumentParser) -> None:
    enroll = commands.add_parser(
        "enroll",
        parents=[common],
        help="generate a key on the YubiKey and get its certificate from the cluster",
        description="Generate a key inside the card, have the card sign a certificate "
        "request for it, submit it to the cluster's CSR API (signer "
        f"{CSR_SIGNER}), store the issued certificate in the slot and write "
        "proxy.yml and client.yml.",
    )
    enroll.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="credentials allowed to create CSRs: an admin kubeconfig or a running "
        "proxy's client.yml (default: $KUBECONFIG, else ~/.kube/config)",
    )
    enroll.add_argument("--context", metavar="NAME", help="context (default: current)")
    enroll.add_argument("--user", required=True, help="the certificate's user (CN)")
    enroll.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a group (O) of the certificate; repeatable",
    )
    enroll.add_argument(
        "--algorithm",
        choices=sorted(ENROLL_ALGORITHMS),
        default="p256",
        help="key type (default: p256; ed25519 needs firmware 5.7)",
    )
    add_certificate_request_options(enroll)
    add_card_write_options(enroll)
    add_output_options(enroll)
    enroll.add_argument(
        "--bind-clusterrole",
        metavar="ROLE",
        help="also create a ClusterRoleBinding of ROLE for the user",
    )
    enroll.add_argument(
        "--allow-renew",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also let the user renew: a ClusterRole and binding that allow "
        "create, get and watch on CertificateSigningRequests and nothing more "
        "(default: on with --bind-clusterrole)",
    )
    enroll.set_defaults(func=cmd_enroll)


def add_renew_command(commands: Any, common: argparse.ArgumentParser) -> None:
    renew = commands.add_parser(
        "renew",
        parents=[common],
        help="a new certificate for the key already on the card",
        description="Request a new certificate for the same on-card key and subject "
        "through the cluster's CSR API and replace the one in the slot; a running "
        "proxy uses it from its next request.",
    )
    renew.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="usually the proxy's client.yml, so the request travels through the "
        "running proxy; or an admin kubeconfig with --approve and --proxy-config "
        "(default: $KUBECONFIG, else ~/.kube/config)",
    )
    renew.add_argument("--context", metavar="NAME", help="context (default: current)")
    renew.add_argument(
        "--proxy-config",
        metavar="PATH",
        help="the proxy.yml naming slot and card (default: beside --kubeconfig)",
    )
    renew.add_argument(
        "--slot", type=slot_arg, help="PIV slot (default: from proxy.yml)"
    )
    renew.add_argument(
        "--if-expiring-within",
        type=parse_duration,
        metavar="DURATION",
        help="do nothing unless the certificate expires within DURATION (e.g. 30d)",
    )
    add_certificate_request_options(renew)
    add_management_key_options(renew)
    renew.add_argument("--pin-file", metavar="PATH", help="read the PIN from this file")
    renew.set_defaults(func=cmd_renew)


def add_status_command(commands: Any, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status",
        parents=[common],
        help="show the YubiKeys, their slot and certificate",
        description="Show each YubiKey, the key and certificate of a slot, and PIN tries left. "
        "Exits 1 when the slot is empty or its certificate expired.",
    )
    status.add_argument(
        "--slot", type=slot_arg, help="PIV slot (default: from --kubeconfig, else 9a)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="the proxy.yml setup wrote: report its slot and card, and check it "
        "(e.g. insecure settings)",
    )
    status.set_defaults(func=cmd_status)


def add_unmerge_command(commands: Any, common: argparse.ArgumentParser) -> None:
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output"
    )
    unmerge = commands.add_parser(
        "unmerge",
        parents=[verbose],
        help="remove what setup --merge added to a kubeconfig",
        description="Remove the context, cluster and user NAME that setup or enroll "
        "--merge added, and give back the current-context --use-context replaced.",
    )
    unmerge.add_argument("name", metavar="NAME", help="the name given to setup")
    unmerge.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="the merged kubeconfig (default: $KUBECONFIG's first file, else "
        "~/.kube/config)",
    )
    unmerge.set_defaults(func=cmd_unmerge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Keep the key that opens a Kubernetes cluster on a YubiKey.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(  # -v before the command; the commands' own -v adds up
        "-v",
        "--verbose",
        action="count",
        default=0,
        dest="leading_verbose",
        help="more output: -v info, -vv debug with an APDU trace",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = card_options()
    for add in (
        add_setup_command,
        add_proxy_command,
        add_shell_command,
        add_enroll_command,
        add_renew_command,
        add_status_command,
        add_unmerge_command,
    ):
        add(commands, common)
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class EscapingFormatter(logging.Formatter):
    """Writes control characters of a message (a request path with terminal
    escapes, say) as \\xNN escapes, never raw."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return super().formatMessage(record).translate(LOG_ESCAPES)


LOG_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def configure_logging(verbosity: int) -> None:
    level = (
        (logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG
    )
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        handler = StderrHandler()
        handler.setFormatter(EscapingFormatter(f"{PROG}: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(text: str) -> tuple[int, ...]:
    """'45.0.3' -> (45, 0, 3); a non-numeric part ends it ('1.0rc1' -> (1,))."""
    numbers = []
    for part in text.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def check_dependencies() -> None:
    """Name each missing or too old package with the command that installs it."""
    import importlib.util

    problems, specs = [], []
    for distribution, module, minimum, exact in REQUIREMENTS:
        spec = f"{distribution}=={exact}" if exact else f"{distribution}>={minimum}"
        try:
            present = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            present = False
        found = installed_version(distribution) if present else None
        if not present:
            problems.append(f"{distribution} (not installed)")
        elif exact and not found:  # code relies on its internals: fail closed
            problems.append(f"{spec} (found a copy without a version)")
        elif found and (
            version_tuple(found) != version_tuple(exact)
            if exact
            else version_tuple(found) < version_tuple(minimum)
        ):
            problems.append(f"{spec} (found {found})")
        else:
            continue
        specs.append(f"'{spec}'")
    if problems:
        raise ProxyError(
            f"cannot import {', '.join(problems)}: install with: {install_command(specs)}"
        )


def install_command(specs: list[str]) -> str:
    """pip inside the running venv; otherwise a new venv (Debian 12 refuses a
    system-wide pip install, PEP 668)."""
    if sys.prefix != sys.base_prefix:
        return f"{sys.executable} -m pip install {' '.join(specs)}"
    venv = f"~/.local/share/{PROG}/venv"
    every = " ".join(
        f"'{d}=={e}'" if e else f"'{d}>={m}'" for d, _, m, e in REQUIREMENTS
    )
    return (
        f"python3 -m venv {venv} && {venv}/bin/pip install {every}, then run "
        f"{venv}/bin/python {sys.argv[0] or 'yk_kube_proxy.py'} (pyscard builds "
        "with gcc, swig, libpcsclite-dev and python3-dev: see the README)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose += args.leading_verbose
    configure_logging(args.verbose)
    # Certificates with serial number 0 (old k3s and client-go CAs, some system
    # roots) still verify; cryptography's warning about them would be a second
    # line on stderr that no user can act on.
    warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't")
    try:
        check_dependencies()
        return args.func(args)
    except ProxyError as exc:
        if args.verbose:
            log.exception("details")
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback with -v
        if args.verbose:
            log.exception("details")
        print(
            f"{PROG}: error: unexpected {type(exc).__name__} (a bug in {PROG}): "
            "run again with -v and report the output",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
