"""Tests for yk_kube_proxy, through the real PC/SC stack.

pyscard -> pcscd -> vpcd (vsmartcard) -> the virtual YubiKey below, which speaks the
vpcd socket protocol. The fixtures start their own pcscd with their own reader
configuration; kubectl and yubico-piv-tool act as independent clients.

Index (each title is a section banner below: search for it)

Machinery:
  M1. The virtual PIV card: a YubiKey 5 PIV applet (NIST SP 800-73-4 + Yubico
      extensions) with a vpcd transport
  M2. The test API server: enough of Kubernetes for the real kubectl (discovery,
      lists, watch, logs, create/delete, exec over WebSocket and SPDY/3.1, the CSR API),
      over TLS
  M3. The PC/SC rig: pcscd with vpcd readers; the cards factory puts virtual cards
      in and takes them out
  M4. A small PKI and kubeconfigs like k3s's and kubeadm's
  M5. Clusters, proxies and clients: the clusters and proxies factories, kubectl, a
      local client, the fault figures
  M6. Go programs from Go's standard library: a crypto/x509 verifier and a TLS
      server configured like kube-apiserver

Tests:
  1. Card layer: TLV and APDU encoding, PivSession in-process against the virtual
      card, finding the card through pcscd
  2. Kubeconfig and the files a user names: read as kubectl reads them, refused in
      one line, never a traceback
  3. setup and status: the key onto the card, what is on the card; names, merge and
      unmerge
  4. proxy: kubectl through the proxy and the card; the API server verified before
      the card signs (Go parity); the local hop
  5. Resilience: the card, pcscd, the network and the client misbehave; presence
  6. enroll and renew: keys born on the card, certificates from the cluster's CSR
      API, RBAC
  7. Command line: arguments, dependencies, the systemd units, the shell, other
      platforms, touch prompts
  8. Benchmark (python -m pytest -m bench -s): figures side by side, no assertions
      on time

The test sections go from the card layer up to the command line. A new test goes
in the section of the feature it exercises, next to its siblings; a helper used by
one section stays in it, one used by several goes in the machinery. Tests own
nothing they must tear down: the cards, proxies and clusters factory fixtures
insert and start for them and remove or stop what is left at teardown.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import http.server
import io
import ipaddress
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import (
    ec,
    ed448,
    ed25519,
    rsa,
    utils,
    x25519,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import yk_kube_proxy as yk

HERE = Path(__file__).resolve().parent


# =============================================================================
# M1. The virtual PIV card: a YubiKey 5 PIV applet (NIST SP 800-73-4 + Yubico
# extensions) with a vpcd transport
# =============================================================================


DEFAULT_MGMT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")
DEFAULT_PIN = b"123456"
DEFAULT_PUK = b"12345678"
DEFAULT_TRIES = 3

ATR = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")

# --- status words -----------------------------------------------------------
SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_AUTH_BLOCKED = 0x6983
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_INCORRECT_P1P2 = 0x6A86
SW_REFERENCE_NOT_FOUND = 0x6A88
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_VERIFY_FAIL = 0x63C0  # | tries left

# --- instructions -------------------------------------------------------------
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE = 0x24
INS_RESET_RETRY = 0x2C
INS_GENERATE = 0x47
INS_AUTHENTICATE = 0x87
INS_SELECT = 0xA4
INS_GET_RESPONSE = 0xC0
INS_GET_DATA = 0xCB
INS_PUT_DATA = 0xDB
INS_MOVE_KEY = 0xF6  # Yubico, fw >= 5.7: P2 source, P1 destination or 0xFF (delete)
INS_GET_METADATA = 0xF7
INS_ATTEST = 0xF9
INS_GET_SERIAL = 0xF8
INS_SET_PIN_RETRIES = 0xFA
INS_RESET = 0xFB
INS_GET_VERSION = 0xFD
INS_IMPORT_KEY = 0xFE
INS_SET_MGMT_KEY = 0xFF

CLA_PLAIN = 0x00
CLA_CHAIN = 0x10

# --- algorithms ---------------------------------------------------------------
ALG_3DES = 0x03
ALG_AES128 = 0x08
ALG_AES192 = 0x0A
ALG_AES256 = 0x0C
ALG_RSA1024 = 0x06
ALG_RSA2048 = 0x07
ALG_RSA3072 = 0x05
ALG_RSA4096 = 0x16
ALG_ECCP256 = 0x11
ALG_ECCP384 = 0x14
ALG_ED25519 = 0xE0
ALG_X25519 = 0xE1  # key agreement only (firmware 5.7)
ALG_PIN_PUK = 0xFF

MGMT_KEY_LENGTHS = {ALG_3DES: 24, ALG_AES128: 16, ALG_AES192: 24, ALG_AES256: 32}
RSA_BITS = {ALG_RSA1024: 1024, ALG_RSA2048: 2048, ALG_RSA3072: 3072, ALG_RSA4096: 4096}
EC_CURVES = {
    ALG_ECCP256: (ec.SECP256R1(), 32, hashes.SHA256()),
    ALG_ECCP384: (ec.SECP384R1(), 48, hashes.SHA384()),
}
ALG_MIN_VERSION = {
    ALG_RSA3072: (5, 7, 0),
    ALG_RSA4096: (5, 7, 0),
    ALG_ED25519: (5, 7, 0),
    ALG_X25519: (5, 7, 0),
}
MIN_VERSION_METADATA = (5, 3, 0)
MIN_VERSION_AES_MGMT = (5, 4, 0)
MIN_VERSION_SERIAL_INS = (5, 0, 0)
MIN_VERSION_MOVE_KEY = (5, 7, 0)
MOVE_KEY_DELETE = 0xFF

# --- key references / slots ------------------------------------------------------
REF_PIN = 0x80
REF_PUK = 0x81
SLOT_MGMT = 0x9B
SLOT_AUTHENTICATION = 0x9A
SLOT_SIGNATURE = 0x9C
SLOT_KEY_MANAGEMENT = 0x9D
SLOT_CARD_AUTH = 0x9E
SLOT_ATTESTATION = 0xF9
RETIRED_SLOTS = range(0x82, 0x96)
KEY_SLOTS = frozenset(
    [
        SLOT_AUTHENTICATION,
        SLOT_SIGNATURE,
        SLOT_KEY_MANAGEMENT,
        SLOT_CARD_AUTH,
        SLOT_ATTESTATION,
        *RETIRED_SLOTS,
    ]
)
SLOT_OBJECTS = {
    SLOT_AUTHENTICATION: 0x5FC105,
    SLOT_SIGNATURE: 0x5FC10A,
    SLOT_KEY_MANAGEMENT: 0x5FC10B,
    SLOT_CARD_AUTH: 0x5FC101,
    SLOT_ATTESTATION: 0x5FFF01,
    **{slot: 0x5FC10D + i for i, slot in enumerate(RETIRED_SLOTS)},
}

PIN_POLICY_DEFAULT = 0x00
PIN_POLICY_NEVER = 0x01
PIN_POLICY_ONCE = 0x02
PIN_POLICY_ALWAYS = 0x03
TOUCH_POLICY_DEFAULT = 0x00
TOUCH_POLICY_NEVER = 0x01
TOUCH_POLICY_ALWAYS = 0x02
TOUCH_POLICY_CACHED = 0x03
TOUCH_CACHE_SECONDS = 15.0

ORIGIN_GENERATED = 0x01
ORIGIN_IMPORTED = 0x02

# --- TLV tags ------------------------------------------------------------------------
TAG_DYN_AUTH = 0x7C
TAG_WITNESS = 0x80
TAG_CHALLENGE = 0x81
TAG_RESPONSE = 0x82
TAG_EXPONENTIATION = 0x85
TAG_PUBLIC_KEY = 0x7F49
TAG_RSA_N = 0x81
TAG_RSA_E = 0x82
TAG_EC_POINT = 0x86
TAG_GEN_TEMPLATE = 0xAC
TAG_GEN_ALGORITHM = 0x80
TAG_PIN_POLICY = 0xAA
TAG_TOUCH_POLICY = 0xAB
TAG_OBJECT_ID = 0x5C
TAG_OBJECT_DATA = 0x53
TAG_IMPORT_EC = 0x06
TAG_IMPORT_ED25519 = 0x07
TAG_IMPORT_X25519 = 0x08

PIV_AID = bytes.fromhex("A000000308000010000100")
PIV_AID_MIN_PREFIX = 5
SELECT_RESPONSE = bytes.fromhex("61114F0600001000010079074F05A000000308")
DISCOVERY_OBJECT = bytes.fromhex("7E124F0BA0000003080000100001005F2F024000")
DISCOVERY_OBJECT_ID = b"\x7e"
SHORT_RESPONSE_MAX = 256
APDU_LOG_LIMIT = 10000
# A YubiKey 5 (firmware 5.1.2, KNOWLEDGE section 2): seconds per APDU, per VERIFY
# with a PIN, and per signature by algorithm. VirtualPiv(**REAL_CARD_TIMINGS).
REAL_CARD_TIMINGS = {
    "apdu_delay": 0.0013,
    "verify_delay": 0.009,
    "sign_delays": {ALG_ECCP256: 0.072, ALG_ECCP384: 0.119, ALG_RSA2048: 0.138},
}


class CardStatus(Exception):
    """Raised by command handlers; carries the status word to return."""

    def __init__(self, sw: int):
        super().__init__(f"SW {sw:04X}")
        self.sw = sw


# --- TLV helpers ------------------------------------------------------------------------
def encode_length(n: int) -> bytes:
    """BER length encoding (short form, 0x81 xx, 0x82 xxxx)."""
    if n < 0x80:
        return bytes([n])
    if n <= 0xFF:
        return bytes([0x81, n])
    return bytes([0x82]) + n.to_bytes(2, "big")


def tlv(tag: int, value: bytes) -> bytes:
    """Encode one TLV; ``tag`` may be a multi-byte tag such as 0x7F49."""
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    return tag_bytes + encode_length(len(value)) + value


def _read_tag(buf: bytes, pos: int) -> tuple[int, int]:
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:
        while True:
            b = buf[pos]
            pos += 1
            tag = (tag << 8) | b
            if not b & 0x80:
                break
    return tag, pos


def _read_length(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    count = first & 0x7F
    if count == 0 or count > 3 or pos + count > len(buf):
        raise CardStatus(SW_WRONG_DATA)
    return int.from_bytes(buf[pos : pos + count], "big"), pos + count


def parse_tlvs(buf: bytes) -> dict[int, bytes]:
    """Parse a flat TLV sequence into ``{tag: value}`` (first occurrence wins)."""
    out: dict[int, bytes] = {}
    pos = 0
    try:
        while pos < len(buf):
            tag, pos = _read_tag(buf, pos)
            length, pos = _read_length(buf, pos)
            value = bytes(buf[pos : pos + length])
            if len(value) != length:
                raise CardStatus(SW_WRONG_DATA)
            out.setdefault(tag, value)
            pos += length
    except IndexError:
        raise CardStatus(SW_WRONG_DATA) from None
    return out


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def _pad_pin(value: bytes) -> bytes:
    return value.ljust(8, b"\xff")


# --- APDU parsing ------------------------------------------------------------------------
@dataclass
class Command:
    """A parsed command APDU."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    extended: bool = False


def parse_apdu(apdu: bytes) -> Command:
    """Parse a short or extended command APDU (ISO 7816-4 cases 1-4)."""
    if len(apdu) < 4:
        raise CardStatus(SW_WRONG_LENGTH)
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if len(body) <= 1:
        return Command(cla, ins, p1, p2, b"")
    if body[0] != 0:
        lc = body[0]
        data, rest = body[1 : 1 + lc], body[1 + lc :]
        if len(data) != lc or len(rest) > 1:
            raise CardStatus(SW_WRONG_LENGTH)
        return Command(cla, ins, p1, p2, bytes(data))
    if len(body) == 3:
        return Command(cla, ins, p1, p2, b"", extended=True)
    lc = int.from_bytes(body[1:3], "big")
    data, rest = body[3 : 3 + lc], body[3 + lc :]
    if lc == 0 or len(data) != lc or len(rest) not in (0, 2):
        raise CardStatus(SW_WRONG_LENGTH)
    return Command(cla, ins, p1, p2, bytes(data), extended=True)


# --- card state records ----------------------------------------------------------------------
@dataclass
class Reference:
    """A PIN or PUK: padded value plus retry counter."""

    value: bytes
    default: bytes
    tries_left: int = DEFAULT_TRIES
    max_tries: int = DEFAULT_TRIES

    @property
    def blocked(self) -> bool:
        """True when no tries are left."""
        return self.tries_left <= 0


@dataclass
class KeySlot:
    """A private key stored in a PIV slot."""

    key: object
    algorithm: int
    pin_policy: int
    touch_policy: int
    origin: int


def _block_cipher(algorithm: int, key: bytes) -> Cipher:
    if algorithm == ALG_3DES:
        return Cipher(TripleDES(key), modes.ECB())
    return Cipher(algorithms.AES(key), modes.ECB())


def _default_pin_policy(slot: int) -> int:
    if slot == SLOT_SIGNATURE:
        return PIN_POLICY_ALWAYS
    if slot == SLOT_CARD_AUTH:
        return PIN_POLICY_NEVER
    return PIN_POLICY_ONCE


def _public_key_tlvs(key) -> bytes:
    """Public key as the inner TLVs of 7F49 (81/82 for RSA, 86 otherwise)."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return tlv(TAG_RSA_N, n) + tlv(TAG_RSA_E, e)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        point = pub.public_bytes(ser.Encoding.X962, ser.PublicFormat.UncompressedPoint)
        return tlv(TAG_EC_POINT, point)
    return tlv(TAG_EC_POINT, pub.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def _rsa_from_crt(p: int, q: int, dp: int, dq: int, qinv: int):
    """Rebuild an RSA private key from its CRT parts (derives d and e)."""
    p1, q1 = p - 1, q - 1
    g = gcd(p1, q1)
    lam = p1 // g * q1
    if (dq - dp) % g:
        raise ValueError("inconsistent CRT exponents")
    m = q1 // g
    k = ((dq - dp) // g) * pow(p1 // g, -1, m) % m
    d = (dp + p1 * k) % lam
    e = pow(d, -1, lam)
    public = rsa.RSAPublicNumbers(e, p * q)
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qinv, public).private_key()


def _rsa_raw(key, block: bytes) -> bytes:
    """Raw RSA private-key operation (CRT), left-padded to the modulus length."""
    nums = key.private_numbers()
    n = nums.public_numbers.n
    size = (n.bit_length() + 7) // 8
    c = int.from_bytes(block, "big")
    if len(block) != size or c >= n:
        raise CardStatus(SW_WRONG_DATA)
    m1 = pow(c, nums.dmp1, nums.p)
    m2 = pow(c, nums.dmq1, nums.q)
    h = nums.iqmp * (m1 - m2) % nums.p
    return (m2 + h * nums.q).to_bytes(size, "big")


class VirtualPiv:
    """Card logic, no I/O: ``process(apdu) -> data || SW1 SW2``.

    Thread-safe (one lock).  Observable attributes for tests: ``sign_count``,
    ``verify_attempts``, ``pin_tries_left``, ``puk_tries_left``,
    ``mgmt_authenticated``, ``pin_verified``, ``apdu_log`` (last 10000 APDUs).

    ``touch(slot) -> bool`` is called for touch policy always/cached (None =
    touch given instantly); ``sign_delay`` seconds are slept per successful
    private-key operation (``sign_delays`` by algorithm take precedence).
    ``apdu_delay`` is slept per APDU, ``verify_delay`` instead of it per VERIFY
    with a PIN, ``power_up_delay`` once before the first APDU after a power-off
    (see REAL_CARD_TIMINGS).  ``select_resets_auth`` (default True): SELECT of the
    PIV AID clears PIN and management-key authentication, like a real YubiKey.
    ``bad_signatures`` (default False): a faulty card whose signatures do not
    verify (the last byte flipped).
    """

    def __init__(
        self,
        *,
        version=(5, 7, 1),
        serial=12345678,
        mgmt_algorithm=ALG_AES192,
        mgmt_key=DEFAULT_MGMT_KEY,
        pin=DEFAULT_PIN,
        puk=DEFAULT_PUK,
        sign_delay=0.0,
        touch: Callable[[int], bool] | None = None,
        select_resets_auth=True,
        apdu_delay=0.0,
        verify_delay=0.0,
        sign_delays: dict[int, float] | None = None,
        power_up_delay=0.0,
    ):
        if MGMT_KEY_LENGTHS.get(mgmt_algorithm) != len(mgmt_key):
            raise ValueError("management key length does not match its algorithm")
        self.version = tuple(version)
        self.serial = serial
        self.mgmt_algorithm = mgmt_algorithm
        self.mgmt_key = bytes(mgmt_key)
        self.mgmt_touch = False
        self.sign_delay = sign_delay
        self.apdu_delay = apdu_delay
        self.verify_delay = verify_delay
        self.sign_delays = dict(sign_delays or {})
        self.power_up_delay = power_up_delay
        self._cold = True
        self.touch = touch
        self.select_resets_auth = select_resets_auth
        self.bad_signatures = False
        self._pin = Reference(_pad_pin(pin), _pad_pin(DEFAULT_PIN))
        self._puk = Reference(_pad_pin(puk), _pad_pin(DEFAULT_PUK))
        self._slots: dict[int, KeySlot] = {}
        self._objects: dict[bytes, bytes] = {}
        self._attestation_key = None
        self._lock = threading.RLock()
        self._last_touch = float("-inf")
        self.sign_count = 0
        self.verify_attempts = 0
        self.apdu_log: list[bytes] = []
        self.power_off()

    # --- public helpers -------------------------------------------------------------------
    @property
    def pin_tries_left(self) -> int:
        """PIN tries remaining (settable, e.g. to simulate a nearly blocked card)."""
        return self._pin.tries_left

    @pin_tries_left.setter
    def pin_tries_left(self, value: int) -> None:
        self._pin.tries_left = value

    @property
    def puk_tries_left(self) -> int:
        """PUK tries remaining (settable)."""
        return self._puk.tries_left

    @puk_tries_left.setter
    def puk_tries_left(self, value: int) -> None:
        self._puk.tries_left = value

    def power_off(self) -> None:
        """Clear volatile state: PIN/mgmt authentication, chaining and response buffers."""
        with self._lock:
            self._clear_auth()
            self._chain: tuple[int, int, int, bytearray] | None = None
            self._pending = b""
            self._cold = True

    def slot_key(self, slot: int):
        """The ``cryptography`` private key in ``slot``, or None."""
        entry = self._slots.get(slot)
        return entry.key if entry else None

    def install_key(
        self,
        slot: int,
        key,
        algorithm: int,
        pin_policy: int = PIN_POLICY_NEVER,
        touch_policy: int = TOUCH_POLICY_NEVER,
        origin: int = ORIGIN_GENERATED,
    ) -> None:
        """Put ``key`` into ``slot`` as another tool (or a newer firmware) would;
        GET METADATA reports ``algorithm`` as given, known to us or not."""
        with self._lock:
            self._slots[slot] = KeySlot(
                key, algorithm, pin_policy, touch_policy, origin
            )

    def slot_info(self, slot: int) -> KeySlot | None:
        """The full :class:`KeySlot` record (algorithm, policies, origin) or None."""
        return self._slots.get(slot)

    def certificate_object(self, slot: int) -> bytes | None:
        """Raw stored value of the certificate object belonging to ``slot``."""
        return self._objects.get(SLOT_OBJECTS[slot].to_bytes(3, "big"))

    def data_object(self, object_id: int) -> bytes | None:
        """Raw stored value of any data object (e.g. 0x5FC102 CHUID)."""
        return self._objects.get(object_id.to_bytes(3, "big"))

    def _clear_auth(self) -> None:
        self.pin_verified = False
        self._pin_fresh = False
        self.mgmt_authenticated = False
        self._witness: bytes | None = None
        self._challenge: bytes | None = None

    # --- APDU entry point ------------------------------------------------------------------
    def process(self, apdu: bytes) -> bytes:
        """Process one command APDU; returns response data followed by SW1 SW2."""
        apdu = bytes(apdu)
        with self._lock:
            self.apdu_log.append(apdu)
            if len(self.apdu_log) > APDU_LOG_LIMIT:
                del self.apdu_log[: len(self.apdu_log) - APDU_LOG_LIMIT]
            self._card_time(apdu)
            try:
                return self._process(parse_apdu(apdu))
            except CardStatus as err:
                return _sw(err.sw)

    def _card_time(self, apdu: bytes) -> None:
        """Sleep as long as a real card takes (signatures: in _key_operation)."""
        delay = self.apdu_delay
        if len(apdu) > 5 and apdu[1] == INS_VERIFY and self.verify_delay:
            delay = self.verify_delay
        if self._cold:
            delay += self.power_up_delay
            self._cold = False
        if delay:
            time.sleep(delay)

    def _process(self, cmd: Command) -> bytes:
        if cmd.cla not in (CLA_PLAIN, CLA_CHAIN):
            raise CardStatus(SW_CLA_NOT_SUPPORTED)
        if cmd.ins == INS_GET_RESPONSE:
            if not self._pending:
                raise CardStatus(SW_CONDITIONS_NOT_SATISFIED)
            return self._emit(self._pending)
        self._pending = b""
        data = self._collect_chain(cmd)
        if data is None:
            return _sw(SW_OK)
        handler = self._DISPATCH.get(cmd.ins)
        if handler is None:
            raise CardStatus(SW_INS_NOT_SUPPORTED)
        result = handler(self, cmd.p1, cmd.p2, data)
        return result + _sw(SW_OK) if cmd.extended else self._emit(result)

    def _collect_chain(self, cmd: Command) -> bytes | None:
        """Accumulate chained data; returns the full data for the last chunk, else None."""
        header = (cmd.ins, cmd.p1, cmd.p2)
        if self._chain is not None and self._chain[:3] != header:
            self._chain = None
        if cmd.cla == CLA_CHAIN:
            if self._chain is None:
                self._chain = (*header, bytearray())
            self._chain[3].extend(cmd.data)
            return None
        if self._chain is None:
            return cmd.data
        data = bytes(self._chain[3]) + cmd.data
        self._chain = None
        return data

    def _emit(self, data: bytes) -> bytes:
        """Short response: first 256 bytes + 61xx if more remain (served by GET RESPONSE)."""
        if len(data) <= SHORT_RESPONSE_MAX:
            self._pending = b""
            return data + _sw(SW_OK)
        head, self._pending = data[:SHORT_RESPONSE_MAX], data[SHORT_RESPONSE_MAX:]
        return head + bytes([0x61, min(len(self._pending), 256) & 0xFF])

    # --- access-control helpers ----------------------------------------------------------------
    def _require_mgmt(self) -> None:
        if not self.mgmt_authenticated:
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)

    def _require_version(self, minimum: tuple) -> None:
        if self.version < minimum:
            raise CardStatus(SW_INS_NOT_SUPPORTED)

    def _reference(self, ref: int) -> Reference:
        if ref == REF_PIN:
            return self._pin
        if ref == REF_PUK:
            return self._puk
        raise CardStatus(SW_REFERENCE_NOT_FOUND)

    @staticmethod
    def _check_reference(ref: Reference, candidate: bytes) -> None:
        """Compare ``candidate`` against a PIN/PUK, maintaining the retry counter."""
        if ref.blocked:
            raise CardStatus(SW_AUTH_BLOCKED)
        if candidate == ref.value:
            ref.tries_left = ref.max_tries
            return
        ref.tries_left -= 1
        raise CardStatus(SW_VERIFY_FAIL | ref.tries_left)

    @staticmethod
    def _new_reference_value(raw: bytes, min_len: int) -> bytes:
        stripped = raw.rstrip(b"\xff")
        if len(stripped) < min_len or b"\xff" in stripped:
            raise CardStatus(SW_WRONG_DATA)
        return raw

    def _require_touch(self, slot: int, policy: int) -> None:
        """Ask the touch hook if the policy needs a touch; 6982 when it times out."""
        if policy not in (TOUCH_POLICY_ALWAYS, TOUCH_POLICY_CACHED):
            return
        now = time.monotonic()
        if (
            policy == TOUCH_POLICY_CACHED
            and now - self._last_touch < TOUCH_CACHE_SECONDS
        ):
            return
        if self.touch is not None and not self.touch(slot):
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)
        self._last_touch = time.monotonic()

    def _authorize_key_use(self, slot: int, entry: KeySlot) -> None:
        """Enforce PIN policy (never/once/always) and touch policy for a key slot."""
        if entry.pin_policy == PIN_POLICY_ALWAYS and not self._pin_fresh:
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)
        if entry.pin_policy == PIN_POLICY_ONCE and not self.pin_verified:
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)
        self._require_touch(slot, entry.touch_policy)
        if entry.pin_policy == PIN_POLICY_ALWAYS:
            self._pin_fresh = False

    # --- simple commands -------------------------------------------------------------------------
    def _cmd_select(self, p1: int, p2: int, data: bytes) -> bytes:
        """SELECT by AID; any prefix (>= 5 bytes) of the PIV AID selects PIV."""
        if p1 != 0x04:
            raise CardStatus(SW_INCORRECT_P1P2)
        if len(data) < PIV_AID_MIN_PREFIX or not PIV_AID.startswith(data):
            raise CardStatus(SW_FILE_NOT_FOUND)
        if self.select_resets_auth:
            self._clear_auth()
        return SELECT_RESPONSE

    def _cmd_get_version(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico GET VERSION: three bytes major.minor.patch."""
        return bytes(self.version)

    def _cmd_get_serial(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico GET SERIAL (fw >= 5): 4 bytes big-endian."""
        self._require_version(MIN_VERSION_SERIAL_INS)
        return self.serial.to_bytes(4, "big")

    # --- PIN / PUK ------------------------------------------------------------------------------
    def _cmd_verify(self, p1: int, p2: int, data: bytes) -> bytes:
        """VERIFY PIN; empty data = status probe; P1=FF resets the verified state."""
        if p2 != REF_PIN or p1 not in (0x00, 0xFF):
            raise CardStatus(SW_REFERENCE_NOT_FOUND if p1 == 0 else SW_INCORRECT_P1P2)
        if p1 == 0xFF:
            self.pin_verified = self._pin_fresh = False
            return b""
        if not data:
            if self._pin.blocked:
                raise CardStatus(SW_AUTH_BLOCKED)
            if self.pin_verified:
                return b""
            raise CardStatus(SW_VERIFY_FAIL | self._pin.tries_left)
        if len(data) != 8:
            raise CardStatus(SW_WRONG_LENGTH)
        self.verify_attempts += 1
        self.pin_verified = self._pin_fresh = False
        self._check_reference(self._pin, data)
        self.pin_verified = self._pin_fresh = True
        return b""

    def _cmd_change_reference(self, p1: int, p2: int, data: bytes) -> bytes:
        """CHANGE REFERENCE DATA for PIN (80) or PUK (81): old || new, 8 bytes each."""
        ref = self._reference(p2)
        if p1 != 0:
            raise CardStatus(SW_INCORRECT_P1P2)
        if len(data) != 16:
            raise CardStatus(SW_WRONG_LENGTH)
        self._check_reference(ref, data[:8])
        ref.value = self._new_reference_value(data[8:], 6)
        return b""

    def _cmd_reset_retry(self, p1: int, p2: int, data: bytes) -> bytes:
        """RESET RETRY COUNTER: PUK || new PIN; unblocks the PIN."""
        if p2 != REF_PIN:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if len(data) != 16:
            raise CardStatus(SW_WRONG_LENGTH)
        self._check_reference(self._puk, data[:8])
        self._pin.value = self._new_reference_value(data[8:], 6)
        self._pin.tries_left = self._pin.max_tries
        return b""

    def _cmd_set_pin_retries(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico SET PIN RETRIES (P1 PIN tries, P2 PUK tries); resets PIN and PUK."""
        self._require_mgmt()
        if not self.pin_verified:
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)
        if not (0 < p1 < 16 and 0 < p2 < 16):
            raise CardStatus(SW_INCORRECT_P1P2)
        self._pin = Reference(self._pin.default, self._pin.default, p1, p1)
        self._puk = Reference(self._puk.default, self._puk.default, p2, p2)
        return b""

    def _cmd_reset(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico RESET: only allowed when both PIN and PUK are blocked."""
        if not (self._pin.blocked and self._puk.blocked):
            raise CardStatus(SW_CONDITIONS_NOT_SATISFIED)
        self._pin = Reference(self._pin.default, self._pin.default)
        self._puk = Reference(self._puk.default, self._puk.default)
        self.mgmt_algorithm = ALG_AES192 if self.version >= (5, 7, 0) else ALG_3DES
        self.mgmt_key = DEFAULT_MGMT_KEY
        self.mgmt_touch = False
        self._slots.clear()
        self._objects.clear()
        self._clear_auth()
        return b""

    # --- management key ------------------------------------------------------------------------
    def _mgmt_cipher(self) -> Cipher:
        return _block_cipher(self.mgmt_algorithm, self.mgmt_key)

    def _mgmt_block_size(self) -> int:
        return 8 if self.mgmt_algorithm == ALG_3DES else 16

    def _mgmt_encrypt(self, block: bytes) -> bytes:
        enc = self._mgmt_cipher().encryptor()
        return enc.update(block) + enc.finalize()

    def _authenticate_mgmt(self, algorithm: int, fields: dict[int, bytes]) -> bytes:
        """GENERAL AUTHENTICATE with 9B: mutual (80/81) or external (81 then 82) form."""
        if algorithm != self.mgmt_algorithm:
            raise CardStatus(SW_WRONG_DATA)
        size = self._mgmt_block_size()
        witness, challenge = fields.get(TAG_WITNESS), fields.get(TAG_CHALLENGE)
        response = fields.get(TAG_RESPONSE)
        if witness == b"" and challenge is None:
            self._witness = os.urandom(size)
            return tlv(
                TAG_DYN_AUTH, tlv(TAG_WITNESS, self._mgmt_encrypt(self._witness))
            )
        if challenge == b"" and witness is None:
            self._challenge = os.urandom(size)
            return tlv(TAG_DYN_AUTH, tlv(TAG_CHALLENGE, self._challenge))
        if witness and challenge and len(challenge) == size:
            expected, self._witness = self._witness, None
            self._finish_mgmt_auth(expected, witness)
            return tlv(TAG_DYN_AUTH, tlv(TAG_RESPONSE, self._mgmt_encrypt(challenge)))
        if response and self._challenge is not None:
            expected, self._challenge = self._mgmt_encrypt(self._challenge), None
            self._finish_mgmt_auth(expected, response)
            return b""
        raise CardStatus(SW_WRONG_DATA)

    def _finish_mgmt_auth(self, expected: bytes | None, got: bytes) -> None:
        if expected is None or expected != got:
            self.mgmt_authenticated = False
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)
        if self.mgmt_touch:
            self._require_touch(SLOT_MGMT, TOUCH_POLICY_ALWAYS)
        self.mgmt_authenticated = True

    def _cmd_set_mgmt_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico SET MANAGEMENT KEY: P1 FF, P2 FF (no touch) / FE (touch)."""
        self._require_mgmt()
        if p1 != 0xFF or p2 not in (0xFE, 0xFF):
            raise CardStatus(SW_INCORRECT_P1P2)
        if len(data) < 3 or data[1] != SLOT_MGMT or data[2] != len(data) - 3:
            raise CardStatus(SW_WRONG_DATA)
        algorithm, key = data[0], data[3:]
        if MGMT_KEY_LENGTHS.get(algorithm) != len(key):
            raise CardStatus(SW_WRONG_DATA)
        if algorithm != ALG_3DES and self.version < MIN_VERSION_AES_MGMT:
            raise CardStatus(SW_WRONG_DATA)
        self.mgmt_algorithm, self.mgmt_key = algorithm, bytes(key)
        self.mgmt_touch = p2 == 0xFE
        return b""

    # --- GENERAL AUTHENTICATE ---------------------------------------------------------------------
    def _cmd_authenticate(self, p1: int, p2: int, data: bytes) -> bytes:
        """GENERAL AUTHENTICATE: management key (9B) or private-key operation."""
        outer = parse_tlvs(data)
        if TAG_DYN_AUTH not in outer:
            raise CardStatus(SW_WRONG_DATA)
        fields = parse_tlvs(outer[TAG_DYN_AUTH])
        if p2 == SLOT_MGMT:
            return self._authenticate_mgmt(p1, fields)
        return self._key_operation(p1, p2, fields)

    def _key_operation(
        self, algorithm: int, slot: int, fields: dict[int, bytes]
    ) -> bytes:
        """Sign/decrypt (tag 81) or ECDH (tag 85) with the key in ``slot``."""
        entry = self._slots.get(slot)
        if slot not in KEY_SLOTS or entry is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if algorithm != entry.algorithm or fields.get(TAG_RESPONSE) != b"":
            raise CardStatus(SW_WRONG_DATA)
        if fields.get(TAG_CHALLENGE) is not None:
            result, is_signature = self._private_op(entry, fields[TAG_CHALLENGE]), True
        elif fields.get(TAG_EXPONENTIATION) is not None:
            result, is_signature = self._ecdh(entry, fields[TAG_EXPONENTIATION]), False
        else:
            raise CardStatus(SW_WRONG_DATA)
        self._authorize_key_use(slot, entry)
        # The signature's time includes the APDU's own, slept in _card_time.
        delay = self.sign_delays.get(entry.algorithm, self.sign_delay) - self.apdu_delay
        if delay > 0:
            time.sleep(delay)
        if is_signature:
            self.sign_count += 1
            if self.bad_signatures:
                result = result[:-1] + bytes([result[-1] ^ 0x01])
        return tlv(TAG_DYN_AUTH, tlv(TAG_RESPONSE, result))

    @staticmethod
    def _private_op(entry: KeySlot, message: bytes) -> bytes:
        """RSA raw op, ECDSA over a prehashed input, or Ed25519 over the message."""
        if entry.algorithm in RSA_BITS:
            return _rsa_raw(entry.key, message)
        if entry.algorithm in EC_CURVES:
            _, size, hash_alg = EC_CURVES[entry.algorithm]
            digest = message[:size].rjust(size, b"\x00")
            return entry.key.sign(digest, ec.ECDSA(utils.Prehashed(hash_alg)))
        if entry.algorithm != ALG_ED25519:
            raise CardStatus(SW_WRONG_DATA)  # X25519 and others cannot sign
        return entry.key.sign(message)

    @staticmethod
    def _ecdh(entry: KeySlot, point: bytes) -> bytes:
        if entry.algorithm == ALG_X25519 and len(point) == 32:
            return entry.key.exchange(x25519.X25519PublicKey.from_public_bytes(point))
        if entry.algorithm not in EC_CURVES:
            raise CardStatus(SW_WRONG_DATA)
        curve = EC_CURVES[entry.algorithm][0]
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except ValueError:
            raise CardStatus(SW_WRONG_DATA) from None
        return entry.key.exchange(ec.ECDH(), peer)

    # --- key import / generation -------------------------------------------------------------
    def _check_key_algorithm(self, algorithm: int) -> None:
        known = (
            algorithm in RSA_BITS
            or algorithm in EC_CURVES
            or algorithm in (ALG_ED25519, ALG_X25519)
        )
        if not known or self.version < ALG_MIN_VERSION.get(algorithm, (0, 0, 0)):
            raise CardStatus(SW_WRONG_DATA)

    def _store_key(
        self, slot: int, key, algorithm: int, fields: dict[int, bytes], origin: int
    ) -> None:
        """Store a key with its (resolved) PIN and touch policies."""
        pin_policy = self._policy(fields, TAG_PIN_POLICY) or _default_pin_policy(slot)
        touch_policy = self._policy(fields, TAG_TOUCH_POLICY) or TOUCH_POLICY_NEVER
        self._slots[slot] = KeySlot(key, algorithm, pin_policy, touch_policy, origin)

    @staticmethod
    def _policy(fields: dict[int, bytes], tag: int) -> int:
        value = fields.get(tag, b"\x00")
        if len(value) != 1 or value[0] > 3:
            raise CardStatus(SW_WRONG_DATA)
        return value[0]

    def _check_slot(self, slot: int) -> None:
        if slot not in KEY_SLOTS:
            raise CardStatus(SW_INCORRECT_P1P2)

    def _cmd_import_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico IMPORT ASYMMETRIC KEY: P1 algorithm, P2 slot, TLV key material."""
        self._require_mgmt()
        self._check_slot(p2)
        self._check_key_algorithm(p1)
        fields = parse_tlvs(data)
        try:
            key = self._parse_import(p1, fields)
        except (ValueError, TypeError, KeyError):
            raise CardStatus(SW_WRONG_DATA) from None
        self._store_key(p2, key, p1, fields, ORIGIN_IMPORTED)
        return b""

    @staticmethod
    def _parse_import(algorithm: int, fields: dict[int, bytes]):
        """Build a private key from import TLVs (RSA CRT 01-05, EC 06, Ed25519 07)."""
        if algorithm in RSA_BITS:
            parts = [int.from_bytes(fields[tag], "big") for tag in (1, 2, 3, 4, 5)]
            key = _rsa_from_crt(*parts)
            if key.key_size != RSA_BITS[algorithm]:
                raise ValueError("wrong modulus size")
            return key
        if algorithm in EC_CURVES:
            curve, size, _ = EC_CURVES[algorithm]
            scalar = fields[TAG_IMPORT_EC]
            if len(scalar) != size:
                raise ValueError("wrong scalar size")
            return ec.derive_private_key(int.from_bytes(scalar, "big"), curve)
        if algorithm == ALG_X25519:
            return x25519.X25519PrivateKey.from_private_bytes(fields[TAG_IMPORT_X25519])
        return ed25519.Ed25519PrivateKey.from_private_bytes(fields[TAG_IMPORT_ED25519])

    def _cmd_generate(self, p1: int, p2: int, data: bytes) -> bytes:
        """GENERATE ASYMMETRIC KEY PAIR: returns 7F49 with the public key."""
        self._require_mgmt()
        self._check_slot(p2)
        outer = parse_tlvs(data)
        if TAG_GEN_TEMPLATE not in outer:
            raise CardStatus(SW_WRONG_DATA)
        # Policies normally sit inside the AC template; tolerate them after it too.
        fields = {**outer, **parse_tlvs(outer[TAG_GEN_TEMPLATE])}
        algorithm = fields.get(TAG_GEN_ALGORITHM, b"")
        if len(algorithm) != 1:
            raise CardStatus(SW_WRONG_DATA)
        self._check_key_algorithm(algorithm[0])
        key = self._new_key(algorithm[0])
        self._store_key(p2, key, algorithm[0], fields, ORIGIN_GENERATED)
        return tlv(TAG_PUBLIC_KEY, _public_key_tlvs(key))

    @staticmethod
    def _new_key(algorithm: int):
        if algorithm in RSA_BITS:
            return rsa.generate_private_key(65537, RSA_BITS[algorithm])
        if algorithm in EC_CURVES:
            return ec.generate_private_key(EC_CURVES[algorithm][0])
        if algorithm == ALG_X25519:
            return x25519.X25519PrivateKey.generate()
        return ed25519.Ed25519PrivateKey.generate()

    def _cmd_move_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico MOVE KEY (fw >= 5.7): the key of slot P2 into the empty slot P1,
        or DELETE KEY with P1 = FF. Not the attestation key; certificates stay
        where they are. Needs mgmt auth."""
        self._require_version(MIN_VERSION_MOVE_KEY)
        self._require_mgmt()
        movable = KEY_SLOTS - {SLOT_ATTESTATION}
        if p2 not in movable or (p1 != MOVE_KEY_DELETE and p1 not in movable):
            raise CardStatus(SW_INCORRECT_P1P2)
        if p2 not in self._slots:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if p1 != MOVE_KEY_DELETE and p1 in self._slots:
            raise CardStatus(SW_CONDITIONS_NOT_SATISFIED)
        entry = self._slots.pop(p2)
        if p1 != MOVE_KEY_DELETE:
            self._slots[p1] = entry
        return b""

    # --- metadata ------------------------------------------------------------------------------
    def _cmd_get_metadata(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico GET METADATA (fw >= 5.3) for PIN, PUK, 9B or a key slot."""
        self._require_version(MIN_VERSION_METADATA)
        if p2 in (REF_PIN, REF_PUK):
            ref = self._reference(p2)
            return (
                tlv(0x01, bytes([ALG_PIN_PUK]))
                + tlv(0x02, b"\x00\x00")
                + tlv(0x05, bytes([ref.value == ref.default]))
                + tlv(0x06, bytes([ref.max_tries, max(ref.tries_left, 0)]))
            )
        if p2 == SLOT_MGMT:
            touch = TOUCH_POLICY_ALWAYS if self.mgmt_touch else TOUCH_POLICY_NEVER
            return (
                tlv(0x01, bytes([self.mgmt_algorithm]))
                + tlv(0x02, bytes([0x01, touch]))
                + tlv(0x05, bytes([self.mgmt_key == DEFAULT_MGMT_KEY]))
            )
        entry = self._slots.get(p2)
        if entry is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        return (
            tlv(0x01, bytes([entry.algorithm]))
            + tlv(0x02, bytes([entry.pin_policy, entry.touch_policy]))
            + tlv(0x03, bytes([entry.origin]))
            + tlv(0x04, _public_key_tlvs(entry.key))
        )

    # --- data objects ----------------------------------------------------------------------------
    @staticmethod
    def _object_id(p1: int, p2: int, fields: dict[int, bytes]) -> bytes:
        if (p1, p2) != (0x3F, 0xFF):
            raise CardStatus(SW_INCORRECT_P1P2)
        object_id = fields.get(TAG_OBJECT_ID)
        if not object_id or len(object_id) > 3:
            raise CardStatus(SW_WRONG_DATA)
        return object_id

    def _cmd_get_data(self, p1: int, p2: int, data: bytes) -> bytes:
        """GET DATA: ``5C <id>`` -> ``53 <value>`` (discovery object 7E returned as is)."""
        object_id = self._object_id(p1, p2, parse_tlvs(data))
        if object_id == DISCOVERY_OBJECT_ID:
            return DISCOVERY_OBJECT
        value = self._objects.get(object_id)
        if value is None:
            raise CardStatus(SW_FILE_NOT_FOUND)
        return tlv(TAG_OBJECT_DATA, value)

    def _cmd_put_data(self, p1: int, p2: int, data: bytes) -> bytes:
        """PUT DATA: ``5C <id> 53 <value>``; empty value deletes. Needs mgmt auth."""
        fields = parse_tlvs(data)
        object_id = self._object_id(p1, p2, fields)
        self._require_mgmt()
        if TAG_OBJECT_DATA not in fields or object_id == DISCOVERY_OBJECT_ID:
            raise CardStatus(SW_WRONG_DATA)
        if fields[TAG_OBJECT_DATA]:
            self._objects[object_id] = fields[TAG_OBJECT_DATA]
        else:
            self._objects.pop(object_id, None)
        return b""

    def _cmd_attest(self, p1: int, p2: int, data: bytes) -> bytes:
        """Yubico ATTEST (INS F9, P1 slot): a certificate for the slot's public key
        signed by the card's attestation key, only for keys generated on the card."""
        entry = self._slots.get(p1)
        if entry is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if entry.origin != ORIGIN_GENERATED:
            raise CardStatus(SW_WRONG_DATA)  # imported keys cannot be attested
        if self._attestation_key is None:
            self._attestation_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name.from_rfc4514_string
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"CN=YubiKey PIV Attestation {p1:02x}"))
            .issuer_name(name("CN=Yubico PIV Attestation"))
            .public_key(entry.key.public_key())
            .serial_number(self.serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(  # Yubico's policy extension: PIN policy, touch policy
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.8"),
                    bytes([entry.pin_policy, entry.touch_policy]),
                ),
                critical=False,
            )
            .sign(self._attestation_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

    _DISPATCH = {
        INS_ATTEST: _cmd_attest,
        INS_SELECT: _cmd_select,
        INS_GET_VERSION: _cmd_get_version,
        INS_GET_SERIAL: _cmd_get_serial,
        INS_GET_METADATA: _cmd_get_metadata,
        INS_VERIFY: _cmd_verify,
        INS_CHANGE_REFERENCE: _cmd_change_reference,
        INS_RESET_RETRY: _cmd_reset_retry,
        INS_SET_PIN_RETRIES: _cmd_set_pin_retries,
        INS_RESET: _cmd_reset,
        INS_AUTHENTICATE: _cmd_authenticate,
        INS_SET_MGMT_KEY: _cmd_set_mgmt_key,
        INS_IMPORT_KEY: _cmd_import_key,
        INS_GENERATE: _cmd_generate,
        INS_MOVE_KEY: _cmd_move_key,
        INS_GET_DATA: _cmd_get_data,
        INS_PUT_DATA: _cmd_put_data,
    }


# --- vpcd transport ---------------------------------------------------------------
VPCD_POWER_OFF = 0x00
VPCD_POWER_ON = 0x01
VPCD_RESET = 0x02
VPCD_GET_ATR = 0x04
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
CONNECT_TIMEOUT = 5.0


class VpcdCard:
    """Connects a :class:`VirtualPiv` to a vpcd reader port from a background thread.

    Connected socket == card inserted; closing it == card removed.  Frames are
    ``uint16 BE length || payload`` in both directions.
    """

    atr = ATR

    def __init__(self, piv: VirtualPiv, port: int, host: str = "127.0.0.1"):
        self.piv = piv
        self.port = port
        self.host = host
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def inserted(self) -> bool:
        """True while the connection to vpcd is alive."""
        return self._thread is not None and self._thread.is_alive()

    def insert(self) -> None:
        """Connect to vpcd (retrying for up to ~5 s) and start serving frames."""
        if self.inserted:
            return
        sock = self._connect()
        self._sock = sock
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), daemon=True, name=f"vpcd-card-{self.port}"
        )
        self._thread.start()

    def remove(self) -> None:
        """Close the socket (card pulled out), join the thread, power the card off."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if sock is not None:
            sock.close()
        self.piv.power_off()

    def __enter__(self) -> VpcdCard:
        self.insert()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @staticmethod
    def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
        """Read exactly ``size`` bytes (TCP_QUICKACK before each recv); None on EOF."""
        buf = bytearray()
        while len(buf) < size:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:
                pass
            chunk = sock.recv(size - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _serve(self, sock: socket.socket) -> None:
        """Frame loop; exits when vpcd closes the connection or the socket is shut."""
        try:
            while True:
                header = self._recv_exact(sock, 2)
                if header is None:
                    break
                payload = self._recv_exact(sock, int.from_bytes(header, "big"))
                if payload is None:
                    break
                reply = self._handle(payload)
                if reply is not None:
                    sock.sendall(len(reply).to_bytes(2, "big") + reply)
        except OSError:
            pass
        finally:
            self.piv.power_off()

    def _handle(self, payload: bytes) -> bytes | None:
        """Control byte (power off/on, reset, get ATR) or APDU -> reply or None."""
        if len(payload) != 1:
            return self.piv.process(payload) if payload else None
        control = payload[0]
        if control in (VPCD_POWER_OFF, VPCD_POWER_ON, VPCD_RESET):
            self.piv.power_off()
            return None
        if control == VPCD_GET_ATR:
            return self.atr
        return None


# =============================================================================
# M2. The test API server: enough of Kubernetes for the real kubectl (discovery, lists,
# watch, logs, create/delete, exec over WebSocket and SPDY/3.1, the CSR API), over TLS
# =============================================================================


# -- constants
# --------------------------------------------------------------------------


DEFAULT_GIT_VERSION = "v1.31.0"
FAKE_VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": DEFAULT_GIT_VERSION,
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
NODE_NAMES = ("node-1", "node-2")
KUBELET_VERSION = "v1.31.0+k3s1"
DEFAULT_NAMESPACES = ("default", "kube-system")
OPENAPI_HASH = "0123456789ABCDEF"
CHUNK_SIZE = 64 * 1024
PATTERN_BLOCK = bytes(range(256)) * (CHUNK_SIZE // 256)  # byte i == i % 256
HANDSHAKE_TIMEOUT = 10.0
JOIN_TIMEOUT = 5.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
)
SPDY_PROTOCOLS = (
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
)
EXEC_SUCCESS = b'{"metadata":{},"status":"Success"}'
CH_STDIN, CH_STDOUT, CH_STDERR, CH_ERROR, CH_RESIZE, CH_CLOSE = 0, 1, 2, 3, 4, 255
WS_OP_CONT, WS_OP_TEXT, WS_OP_BIN = 0x0, 0x1, 0x2
WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG = 0x8, 0x9, 0xA
SPDY_VERSION = 3
SPDY_SYN_STREAM, SPDY_SYN_REPLY, SPDY_RST_STREAM, SPDY_SETTINGS = 1, 2, 3, 4
SPDY_PING, SPDY_GOAWAY, SPDY_HEADERS, SPDY_WINDOW_UPDATE = 6, 7, 8, 9
SPDY_FLAG_FIN = 0x01
SPDY_SEND_WINDOW_UPDATES = True

# SPDY/3 header-compression dictionary (draft-mbelshe-httpbis-spdy-00 /
# SPDY/3 spec, section 2.6.10.1): length-prefixed header names followed by a
# blob of common values.  Built from its parts; checked by length/adler32.
_SPDY_DICT_NAMES = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control "
    "connection content-base content-encoding content-language content-length "
    "content-location content-md5 content-range content-type date etag expect "
    "expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server "
    "te trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status"
).split() + [
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
]
_SPDY_DICT_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414"
    "415416417502504505203 Non-Authoritative Information204 No Content"
    "301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden"
    "404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec"
    " 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,"
    "image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,"
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
SPDY_DICT = (
    b"".join(struct.pack(">I", len(n)) + n.encode() for n in _SPDY_DICT_NAMES)
    + _SPDY_DICT_TAIL.encode()
)
assert len(SPDY_DICT) == 1423 and zlib.adler32(SPDY_DICT) == 0xE3C6A7C2

API_RESOURCES_V1 = [
    {
        "name": "pods",
        "singularName": "pod",
        "namespaced": True,
        "kind": "Pod",
        "verbs": [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
        "shortNames": ["po"],
        "categories": ["all"],
    },
    {
        "name": "pods/log",
        "singularName": "",
        "namespaced": True,
        "kind": "Pod",
        "verbs": ["get"],
    },
    {
        "name": "pods/exec",
        "singularName": "",
        "namespaced": True,
        "kind": "PodExecOptions",
        "verbs": ["create", "get"],
    },
    {
        "name": "nodes",
        "singularName": "node",
        "namespaced": False,
        "kind": "Node",
        "verbs": ["get", "list", "watch"],
        "shortNames": ["no"],
    },
    {
        "name": "namespaces",
        "singularName": "namespace",
        "namespaced": False,
        "kind": "Namespace",
        "verbs": ["create", "delete", "get", "list", "watch"],
        "shortNames": ["ns"],
    },
    {
        "name": "configmaps",
        "singularName": "configmap",
        "namespaced": True,
        "kind": "ConfigMap",
        "verbs": ["create", "delete", "get", "list", "watch"],
        "shortNames": ["cm"],
    },
]
API_RESOURCES_APPS_V1 = [
    {
        "name": "deployments",
        "singularName": "deployment",
        "namespaced": True,
        "kind": "Deployment",
        "verbs": ["get", "list", "watch"],
        "shortNames": ["deploy"],
        "categories": ["all"],
    },
]
TABLE_COLUMNS = {
    "Pod": ["Name", "Ready", "Status", "Restarts", "Age"],
    "Node": ["Name", "Status", "Roles", "Age", "Version"],
}


# --------------------------------------------------------------------------
# PKI helpers
# --------------------------------------------------------------------------
def _now() -> datetime.datetime:
    """Current UTC time."""
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_cert(cert: x509.Certificate) -> bytes:
    """Certificate to PEM bytes."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    """Private key to unencrypted PKCS8 PEM bytes."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_key(kind: str = "p256"):
    """Generate an EC P-256 ('p256') or RSA-2048 ('rsa2048') private key."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {kind!r}")


def make_ca(common_name: str):
    """Create a self-signed EC P-256 CA; returns (cert, key)."""
    key = _new_key("p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_builder(ca_cert, subject: x509.Name, pubkey, days: int):
    """Common leaf certificate builder (validity, basic constraints, AKI)."""
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    not_before = min(
        now - datetime.timedelta(hours=1), not_after - datetime.timedelta(days=1)
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(pubkey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(aki, critical=False)
    )


def make_client_cert(
    ca_cert,
    ca_key,
    cn: str = "system:admin",
    org: str | None = "system:masters",
    key_type: str = "p256",
    days: int = 365,
):
    """Issue a clientAuth certificate; returns (cert_pem, key_pem PKCS8).

    days <= 0 yields an already expired certificate."""
    key = _new_key(key_type)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    subject = x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    usage = x509.KeyUsage(
        True, key_type == "rsa2048", False, False, False, False, False, False, False
    )
    cert = (
        _leaf_builder(ca_cert, subject, key.public_key(), days)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def make_server_cert(ca_cert, ca_key, names=("localhost",), ips=("127.0.0.1",)):
    """Issue a serverAuth EC certificate with DNS/IP SANs; returns (cert_pem, key_pem)."""
    key = _new_key("p256")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "k3s"),
            x509.NameAttribute(NameOID.COMMON_NAME, "k3s"),
        ]
    )
    sans = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        _leaf_builder(ca_cert, subject, key.public_key(), 365)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


@dataclasses.dataclass
class FakePki:
    """PEM material for a fake cluster (separate server and client CAs)."""

    __test__ = False  # not a pytest test class
    server_ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_ca_pem: bytes
    client_ca_key: object
    client_cert_pem: bytes
    client_key_pem: bytes

    def write_kubeconfig(
        self,
        path,
        server_url: str,
        embed: bool = True,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
    ) -> str:
        """Write a kubeconfig for server_url; returns its path.

        embed=True puts the client certificate/key inline (base64
        *-data fields); embed=False writes them to PATH.crt / PATH.key."""
        cert = client_cert_pem or self.client_cert_pem
        key = client_key_pem or self.client_key_pem
        path = os.fspath(path)
        if embed:
            user = {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}
        else:
            _write(path + ".crt", cert)
            _write(path + ".key", key)
            user = {"client-certificate": path + ".crt", "client-key": path + ".key"}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": server_url,
                        "certificate-authority-data": _b64(self.server_ca_pem),
                    },
                }
            ],
            "users": [{"name": "fake", "user": user}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {
                        "cluster": "fake",
                        "user": "fake",
                        "namespace": "default",
                    },
                }
            ],
            "preferences": {},
        }
        _write(path, json.dumps(cfg, indent=2).encode())  # JSON is valid YAML
        return path


def _b64(data: bytes) -> str:
    """Base64-encode bytes to str."""
    return base64.b64encode(data).decode()


def _write(path: str, data: bytes) -> None:
    """Write bytes to a file with 0600 permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_test_pki(
    server_names=("localhost",),
    server_ips=("127.0.0.1",),
    client_key="p256",
    client_cn="system:admin",
    client_org="system:masters",
    client_days=365,
) -> FakePki:
    """Create a k3s-like PKI: server CA + server cert, client CA + client cert."""
    ts = int(time.time())
    server_ca, server_ca_key = make_ca(f"k3s-server-ca@{ts}")
    client_ca, client_ca_key = make_ca(f"k3s-client-ca@{ts}")
    srv_cert, srv_key = make_server_cert(
        server_ca, server_ca_key, server_names, server_ips
    )
    cli_cert, cli_key = make_client_cert(
        client_ca, client_ca_key, client_cn, client_org, client_key, client_days
    )
    return FakePki(
        _pem_cert(server_ca),
        srv_cert,
        srv_key,
        _pem_cert(client_ca),
        client_ca_key,
        cli_cert,
        cli_key,
    )


# --------------------------------------------------------------------------
# Kubernetes object helpers
# --------------------------------------------------------------------------
def _ts(t: float) -> str:
    """RFC3339 timestamp (seconds) for a unix time."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _age(t: float) -> str:
    """kubectl-style short age string."""
    s = max(0, int(time.time() - t))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def status_obj(code: int, reason: str, message: str, details=None) -> dict:
    """A metav1.Status failure object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


def _list_obj(kind: str, api_version: str, rv: str, items: list) -> dict:
    """A typed list object."""
    return {
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": rv},
        "items": items,
    }


def _meta(name: str, namespace: str | None, rv: int, created: float) -> dict:
    """ObjectMeta with uid, resourceVersion and creationTimestamp."""
    meta = {
        "name": name,
        "uid": str(uuid.uuid4()),
        "resourceVersion": str(rv),
        "creationTimestamp": _ts(created),
    }
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def _make_node(name: str, rv: int, created: float) -> dict:
    """A Ready node object."""
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": dict(
            _meta(name, None, rv, created),
            labels={
                "kubernetes.io/hostname": name,
                "node-role.kubernetes.io/control-plane": "true",
            },
        ),
        "spec": {"podCIDR": "10.42.0.0/24"},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": _ts(created),
                    "lastTransitionTime": _ts(created),
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "containerd://1.7.20",
                "osImage": "Fake Linux",
                "kernelVersion": "6.0.0",
            },
        },
    }


def _complete_pod(pod: dict, name: str, namespace: str, rv: int, now: float) -> dict:
    """Fill server-side fields of a pod (metadata, Running status)."""
    pod = json.loads(json.dumps(pod))
    pod["kind"], pod["apiVersion"] = "Pod", "v1"
    meta = pod.setdefault("metadata", {})
    meta.update(_meta(name, namespace, rv, now))
    spec = pod.setdefault("spec", {})
    containers = spec.setdefault("containers", [{"name": "main", "image": "busybox"}])
    spec.setdefault("nodeName", NODE_NAMES[0])
    started = {"running": {"startedAt": _ts(now)}}
    pod["status"] = {
        "phase": "Running",
        "podIP": "10.42.0.10",
        "hostIP": "127.0.0.1",
        "startTime": _ts(now),
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": _ts(now)}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [
            {
                "name": c.get("name", "main"),
                "ready": True,
                "started": True,
                "restartCount": 0,
                "image": c.get("image", ""),
                "imageID": "",
                "state": started,
            }
            for c in containers
        ],
    }
    return pod


def _row_cells(obj: dict) -> list:
    """Table cells for a Pod or Node (other kinds: name + age)."""
    meta = obj["metadata"]
    created = _parse_ts(meta.get("creationTimestamp"))
    if obj.get("kind") == "Pod":
        statuses = obj.get("status", {}).get("containerStatuses", [])
        ready = sum(1 for s in statuses if s.get("ready"))
        return [
            meta["name"],
            f"{ready}/{len(statuses)}",
            obj.get("status", {}).get("phase", "Pending"),
            0,
            _age(created),
        ]
    if obj.get("kind") == "Node":
        return [
            meta["name"],
            "Ready",
            "control-plane",
            _age(created),
            obj["status"]["nodeInfo"]["kubeletVersion"],
        ]
    return [meta["name"], _age(created)]


def _parse_ts(value: str | None) -> float:
    """Parse an RFC3339 seconds timestamp to unix time (0 if missing)."""
    if not value:
        return 0.0
    return (
        datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.timezone.utc)
        .timestamp()
    )


def to_table(kind: str, objs: list, rv: str) -> dict:
    """Convert objects to a meta.k8s.io/v1 Table (rows carry PartialObjectMetadata)."""
    cols = TABLE_COLUMNS.get(kind, ["Name", "Age"])
    defs = [
        {
            "name": c,
            "type": "integer" if c == "Restarts" else "string",
            "format": "name" if c == "Name" else "",
            "description": c,
            "priority": 0,
        }
        for c in cols
    ]
    rows = [
        {
            "cells": _row_cells(o),
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            },
        }
        for o in objs
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }


def _field_match(obj: dict, selector: str) -> bool:
    """Evaluate a simple fieldSelector (metadata.name / metadata.namespace, = or !=)."""
    for term in filter(None, (selector or "").split(",")):
        neg = "!=" in term
        key, _, val = term.partition("!=" if neg else "=")
        val = val.lstrip("=")
        actual = obj["metadata"].get(key.strip().split(".", 1)[-1], "")
        if (actual == val) == neg:
            return False
    return True


def _label_match(obj: dict, selector: str) -> bool:
    """Evaluate a simple equality labelSelector (k=v,k2=v2)."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, eq, val = term.partition("=")
        if eq and labels.get(key.strip()) != val.lstrip("=").strip():
            return False
        if not eq and key.strip() not in labels:
            return False
    return True


# --------------------------------------------------------------------------
# Cluster state (thread-safe)
# --------------------------------------------------------------------------
class _State:
    """Pods, nodes, event log and log lines, guarded by one condition variable."""

    def __init__(self):
        """Create empty state with two nodes."""
        self.cond = threading.Condition()
        self.rv = 1
        self.created = time.time()
        self.nodes = [_make_node(n, 1, self.created) for n in NODE_NAMES]
        self.pods: dict[tuple, dict] = {}
        self.events: list[tuple] = []  # (rv, type, obj)
        self.logs: dict[tuple, list] = {}
        self.log_epoch = 0
        self.stopped = False

    def _next_rv(self) -> int:
        """Increment and return the resource version (caller holds the lock)."""
        self.rv += 1
        return self.rv

    def add_pod(self, name: str, namespace: str, body: dict | None = None):
        """Add a pod; returns (pod, None) or (None, 'exists')."""
        with self.cond:
            if (namespace, name) in self.pods:
                return None, "exists"
            pod = _complete_pod(
                body or {}, name, namespace, self._next_rv(), time.time()
            )
            self.pods[(namespace, name)] = pod
            self.events.append((self.rv, "ADDED", pod))
            self.cond.notify_all()
            return pod, None

    def delete_pod(self, name: str, namespace: str):
        """Delete a pod; returns the deleted object or None."""
        with self.cond:
            pod = self.pods.pop((namespace, name), None)
            if pod is None:
                return None
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self._next_rv())
            self.events.append((self.rv, "DELETED", pod))
            self.logs.pop((namespace, name), None)
            self.cond.notify_all()
            return pod

    def list_pods(self, namespace: str | None):
        """Return (resourceVersion, pods) for a namespace or all namespaces."""
        with self.cond:
            pods = [
                p
                for (ns, _), p in sorted(self.pods.items())
                if namespace is None or ns == namespace
            ]
            return str(self.rv), pods

    def append_log(self, namespace: str, pod: str, line: str) -> None:
        """Append a log line and wake followers."""
        with self.cond:
            self.logs.setdefault((namespace, pod), []).append(
                line if line.endswith("\n") else line + "\n"
            )
            self.cond.notify_all()

    def bump_log_epoch(self) -> None:
        """End all current follow streams."""
        with self.cond:
            self.log_epoch += 1
            self.cond.notify_all()

    def stop(self) -> None:
        """Mark stopped and wake every waiter."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


@dataclasses.dataclass
class RequestRecord:
    """One observed HTTP request."""

    method: str
    path: str
    headers: dict
    client_subject: str
    tls_version: str
    alpn: str | None
    client_certificate: bytes = b""  # DER of the peer's certificate

    def __getitem__(self, key):
        """Allow dict-style access (record['path'])."""
        return getattr(self, key)


class _ExecDone(Exception):
    """Raised to end an exec session."""


# --------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    """Per-connection handler: TLS handshake, then HTTP/1.1 keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = "fake-apiserver"
    sys_version = ""

    # ---- connection lifecycle ------------------------------------------
    def setup(self) -> None:
        """Do the TLS handshake (in this thread), then set up rfile/wfile."""
        fake: FakeApiServer = self.server.fake
        self.tls_ok = False
        raw = self.request
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go servers do
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            self.request = fake.ssl_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.request.settimeout(None)
        self.connection = self.request
        self.tls_ok = True
        self.peer_subject = _peer_subject(self.request)
        fake._conn_opened(self.request)
        super().setup()

    def handle(self) -> None:
        """Serve requests only when the handshake succeeded."""
        if self.tls_ok:
            try:
                super().handle()
            except (OSError, ValueError):
                pass

    def finish(self) -> None:
        """Close the TLS socket and forget the connection."""
        if not self.tls_ok:
            return
        try:
            super().finish()
        except (OSError, ValueError):
            pass
        self.server.fake._conn_closed(self.request)
        try:
            self.request.close()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002
        """Silence default logging."""

    # ---- dispatch -------------------------------------------------------
    def do_GET(self) -> None:
        """All methods go through _dispatch."""
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        """Record the request, read its body, route it (or hang up, see drop_next)."""
        fake: FakeApiServer = self.server.fake
        fake._record(self)
        self.body = self._read_body()
        if fake.take_drop():
            self.close_connection = True  # as a server that timed the connection out
            return _shutdown_quietly(self.connection)
        url = urllib.parse.urlsplit(self.path)
        self.query_all = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.query = {k: v[-1] for k, v in self.query_all.items()}
        path = url.path
        if fake.path_prefix:
            if not (
                path == fake.path_prefix or path.startswith(fake.path_prefix + "/")
            ):
                return self.send_status(
                    404, "NotFound", "the server could not find the requested resource"
                )
            path = path[len(fake.path_prefix) :] or "/"
        try:
            _route(self, fake, path.rstrip("/") or "/")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug here: report it as 500, close
            import traceback

            traceback.print_exc()
            self.close_connection = True
            self.send_status(500, "InternalError", f"fake apiserver error: {exc!r}")
        finally:
            fake._stream_ended(self)

    def _read_body(self) -> bytes:
        """Read a Content-Length or chunked request body."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # ---- response helpers -------------------------------------------------
    def send_bytes(
        self, code: int, data: bytes, ctype: str = "application/json"
    ) -> None:
        """Send a complete response with Content-Length."""
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, code: int, obj) -> None:
        """Send a JSON response."""
        self.send_bytes(code, json.dumps(obj, separators=(",", ":")).encode())

    def send_status(self, code: int, reason: str, message: str, details=None) -> None:
        """Send a metav1.Status failure response."""
        self.send_json(code, status_obj(code, reason, message, details))

    def start_chunked(self, ctype: str) -> None:
        """Start a chunked streaming response (watched for the client's hang-up)."""
        self.server.fake._stream_started(self)
        self.server.fake.watch_hangup(self)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        """Write one HTTP chunk (one send call, no buffering)."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        """Write the terminating chunk."""
        self.wfile.write(b"0\r\n\r\n")
        self.server.fake._stream_ended(self)

    def wants_table(self) -> bool:
        """True when the Accept header asks for a meta.k8s.io Table."""
        return "as=Table" in (self.headers.get("Accept") or "")


def _peer_subject(sock: ssl.SSLSocket) -> str:
    """RFC4514 subject of the peer certificate ('' if none)."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        return ""
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


# --------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------
NOT_FOUND_MSG = "the server could not find the requested resource"


def _route(h: _Handler, fake: FakeApiServer, path: str) -> None:
    """Route a request path (prefix already stripped)."""
    parts = path.strip("/").split("/") if path != "/" else []
    simple = _SIMPLE_ROUTES.get(path)
    if simple and h.command in ("GET", "HEAD"):
        return simple(h, fake)
    if parts[:2] == ["api", "v1"] and len(parts) > 2:
        return _route_core(h, fake, parts[2:])
    if parts[:3] == ["apis", "apps", "v1"] and len(parts) > 3:
        return h.send_json(
            200, _list_obj("DeploymentList", "apps/v1", str(fake.state.rv), [])
        )
    if parts[:2] == ["apis", "certificates.k8s.io"]:
        return route_certificates(h, fake, parts)
    if path == "/apis/authentication.k8s.io/v1/selfsubjectreviews":
        return _self_subject_review(h, fake)
    if parts[:2] == ["apis", "rbac.authorization.k8s.io"] and fake_has_csr_api(fake):
        return _route_rbac(h, fake, parts)
    if parts[:2] == ["apis", "authorization.k8s.io"] and fake_has_csr_api(fake):
        return route_authorization(h, fake, parts)
    h.send_status(404, "NotFound", NOT_FOUND_MSG)


RBAC_GV = {"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"}


def fake_has_csr_api(fake) -> bool:
    return getattr(fake, "csrs", None) is not None


def _route_rbac(h: _Handler, fake, parts: list) -> None:
    """Just enough of rbac.authorization.k8s.io/v1 for `kubectl create` and `get`
    of ClusterRoles and ClusterRoleBindings (fake.cluster_roles, a dict, and
    fake.cluster_role_bindings, a list), authorized like the CSR API."""
    if parts[2:] == ["v1"]:
        return h.send_json(
            200,
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": RBAC_GV["groupVersion"],
                "resources": [
                    {
                        "name": plural,
                        "singularName": kind.lower(),
                        "namespaced": False,
                        "kind": kind,
                        "verbs": ["create", "delete", "get", "list"],
                    }
                    for plural, kind in RBAC_RESOURCES.items()
                ],
            },
        )
    plural, name = (parts[3:] + ["", ""])[:2]
    if parts[2:3] != ["v1"] or plural not in RBAC_RESOURCES or len(parts) > 5:
        return h.send_status(404, "NotFound", NOT_FOUND_MSG)
    verb = "create" if h.command == "POST" and not name else "get"
    if (h.command, bool(name)) not in (("POST", False), ("GET", True)):
        return _method_not_allowed(h)
    if not authorize(h, fake, verb, RBAC_GROUP, plural, name):
        return
    with fake.state.cond:
        stored = {
            o["metadata"]["name"]: o
            for o in (
                fake.cluster_role_bindings
                if plural == "clusterrolebindings"
                else fake.cluster_roles.values()
            )
        }
        if name:
            if name not in stored:
                return h.send_status(
                    404,
                    "NotFound",
                    f'{plural}.{RBAC_GROUP} "{name}" not found',
                    {"name": name, "group": RBAC_GROUP, "kind": plural},
                )
            return h.send_json(200, stored[name])
        body = (
            rbac_from_protobuf(h.body)
            if h.body.startswith(K8S_PROTOBUF_MAGIC)
            else json.loads(h.body or b"{}")  # the handler has read it
        )
        name = body.get("metadata", {}).get("name", "")
        if name in stored:
            return h.send_status(
                409,
                "AlreadyExists",
                f'{plural}.{RBAC_GROUP} "{name}" already exists',
                {"name": name, "group": RBAC_GROUP, "kind": plural},
            )
        body["metadata"]["uid"] = str(uuid.uuid4())
        if plural == "clusterrolebindings":
            fake.cluster_role_bindings.append(body)
        else:
            fake.cluster_roles[name] = body
    h.send_json(201, body)


def _route_core(h: _Handler, fake: FakeApiServer, rest: list) -> None:
    """Route /api/v1/... paths."""
    if rest[0] == "namespaces" and len(rest) >= 3:
        ns, resource, tail = rest[1], rest[2], rest[3:]
        if resource == "pods":
            return _route_pods(h, fake, ns, tail)
        if resource == "configmaps" and not tail:
            return h.send_json(
                200, _list_obj("ConfigMapList", "v1", str(fake.state.rv), [])
            )
    elif rest[0] == "pods" and len(rest) == 1:
        return _pods_collection(h, fake, None)
    elif rest[0] == "nodes":
        return _nodes(h, fake, rest[1] if len(rest) > 1 else None)
    elif rest[0] == "namespaces" and len(rest) <= 2:
        return _namespaces(h, fake, rest[1] if len(rest) > 1 else None)
    h.send_status(404, "NotFound", NOT_FOUND_MSG)


def _route_pods(h: _Handler, fake: FakeApiServer, ns: str, tail: list) -> None:
    """Route /api/v1/namespaces/{ns}/pods[/name[/sub]]."""
    if not tail:
        return _pods_collection(h, fake, ns)
    name, sub = tail[0], (tail[1] if len(tail) > 1 else "")
    with fake.state.cond:
        pod = fake.state.pods.get((ns, name))
    if pod is None:
        return h.send_status(
            404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
        )
    if sub == "" and h.command in ("GET", "HEAD"):
        return h.send_json(200, pod)
    if sub == "" and h.command == "DELETE":
        return h.send_json(200, fake.state.delete_pod(name, ns) or pod)
    if sub == "log" and h.command == "GET":
        return _pod_log(h, fake, ns, name)
    if sub == "exec" and h.command in ("GET", "POST"):
        return _pod_exec(h, fake)
    if sub == "portforward" and h.command in ("GET", "POST"):
        return _pod_portforward(h, fake)
    h.send_status(405, "MethodNotAllowed", "the server does not allow this method")


def _self_subject_review(h: _Handler, fake) -> None:
    """POST authentication.k8s.io/v1 SelfSubjectReview (kubectl auth whoami): the
    user and groups kube-apiserver derives from the client certificate."""
    if h.command != "POST":
        return h.send_status(
            405, "MethodNotAllowed", "the server does not allow this method"
        )
    username, groups = _peer_identity(h)
    h.send_json(
        201,
        {
            "kind": "SelfSubjectReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": _ts(time.time())},
            "status": {"userInfo": {"username": username, "groups": groups}},
        },
    )


def _version(h: _Handler, fake) -> None:
    """GET /version."""
    h.send_json(200, fake.version_info)


def _api(h: _Handler, fake) -> None:
    """GET /api (legacy APIVersions; also served to aggregated-discovery requests)."""
    h.send_json(
        200,
        {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{fake.host}:{fake.port}"}
            ],
        },
    )


def _apis(h: _Handler, fake) -> None:
    """GET /apis (APIGroupList with apps/v1)."""
    gv = {"groupVersion": "apps/v1", "version": "v1"}
    h.send_json(
        200,
        {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{"name": "apps", "versions": [gv], "preferredVersion": gv}]
            + (
                [
                    apis_group_entry(),
                    {
                        "name": "rbac.authorization.k8s.io",
                        "versions": [RBAC_GV],
                        "preferredVersion": RBAC_GV,
                    },
                    {
                        "name": AUTHZ_GROUP,
                        "versions": [AUTHZ_GV],
                        "preferredVersion": AUTHZ_GV,
                    },
                ]
                if fake_has_csr_api(fake)
                else []
            ),
        },
    )


def _api_v1(h: _Handler, fake) -> None:
    """GET /api/v1 (APIResourceList)."""
    h.send_json(
        200,
        {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": API_RESOURCES_V1,
        },
    )


def _apis_apps_v1(h: _Handler, fake) -> None:
    """GET /apis/apps/v1 (APIResourceList)."""
    h.send_json(
        200,
        {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apps/v1",
            "resources": API_RESOURCES_APPS_V1,
        },
    )


def _healthz(h: _Handler, fake) -> None:
    """GET /healthz, /readyz, /livez."""
    h.send_bytes(200, b"ok", "text/plain; charset=utf-8")


def _bytes(h: _Handler, fake) -> None:
    """GET /bytes?n=N: N pattern bytes with Content-Length, in 64 KiB writes."""
    n = int(h.query.get("n", "0"))
    h.send_response(200)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(n))
    h.end_headers()
    while n > 0 and h.command != "HEAD":
        chunk = PATTERN_BLOCK[: min(n, CHUNK_SIZE)]
        h.wfile.write(chunk)
        n -= len(chunk)


def _chunked(h: _Handler, fake) -> None:
    """GET /chunked?n=N: N pattern bytes, chunked in 64 KiB chunks."""
    n = int(h.query.get("n", "0"))
    h.start_chunked("application/octet-stream")
    while n > 0:
        chunk = PATTERN_BLOCK[: min(n, CHUNK_SIZE)]
        h.write_chunk(chunk)
        n -= len(chunk)
    h.end_chunked()


def _slow(h: _Handler, fake) -> None:
    """GET /slow?seconds=S: sleep S seconds (interrupted by stop) then answer."""
    seconds = float(h.query.get("seconds", "1"))
    fake._stop_event.wait(seconds)
    h.send_json(200, {"slept": seconds})


def _openapi_v3_root(h: _Handler, fake) -> None:
    """GET /openapi/v3: group-version index (kubectl create uses it to
    check server-side fieldValidation support)."""
    paths = {
        gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={OPENAPI_HASH}"}
        for gv in ("api/v1", "apis/apps/v1")
    }
    h.send_json(200, {"paths": paths})


def _openapi_v3_gv(h: _Handler, fake) -> None:
    """GET /openapi/v3/api/v1 or /apis/apps/v1: minimal OpenAPI v3 document
    whose PATCH operations accept the fieldValidation query parameter."""
    group = "apps" if "/apps/" in h.path else ""
    base = "/apis/apps/v1" if group else "/api/v1"
    resources = API_RESOURCES_APPS_V1 if group else API_RESOURCES_V1
    params = [
        {"name": n, "in": "query", "schema": {"type": "string"}}
        for n in ("dryRun", "fieldManager", "fieldValidation", "force")
    ]
    paths = {}
    for r in resources:
        if "/" in r["name"]:
            continue
        ns = "/namespaces/{namespace}" if r["namespaced"] else ""
        gvk = {"group": group, "version": "v1", "kind": r["kind"]}
        op = {
            "operationId": f"patch{r['kind']}",
            "parameters": params,
            "x-kubernetes-group-version-kind": gvk,
            "x-kubernetes-action": "patch",
            "responses": {"200": {"description": "OK"}},
        }
        paths[f"{base}{ns}/{r['name']}/{{name}}"] = {"patch": op}
        paths[f"{base}{ns}/{r['name']}"] = {
            "post": dict(
                op, operationId=f"create{r['kind']}", **{"x-kubernetes-action": "post"}
            )
        }
    h.send_json(
        200,
        {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": fake.version_info["gitVersion"]},
            "paths": paths,
            "components": {"schemas": {}},
        },
    )


_SIMPLE_ROUTES = {
    "/openapi/v3": _openapi_v3_root,
    "/openapi/v3/api/v1": _openapi_v3_gv,
    "/openapi/v3/apis/apps/v1": _openapi_v3_gv,
    "/version": _version,
    "/api": _api,
    "/apis": _apis,
    "/api/v1": _api_v1,
    "/apis/apps/v1": _apis_apps_v1,
    "/healthz": _healthz,
    "/readyz": _healthz,
    "/livez": _healthz,
    "/bytes": _bytes,
    "/chunked": _chunked,
    "/slow": _slow,
}


def _nodes(h: _Handler, fake, name: str | None) -> None:
    """GET /api/v1/nodes[/name] (list, get or watch)."""
    nodes = fake.state.nodes
    if name is not None:
        node = next((n for n in nodes if n["metadata"]["name"] == name), None)
        if node is None:
            return h.send_status(
                404,
                "NotFound",
                f'nodes "{name}" not found',
                {"name": name, "kind": "nodes"},
            )
        return h.send_json(
            200, to_table("Node", [node], "1") if h.wants_table() else node
        )
    if _is_watch(h):
        return _watch_static(h, fake, "Node", nodes)
    rv = str(fake.state.rv)
    if h.wants_table():
        return h.send_json(200, to_table("Node", nodes, rv))
    h.send_json(200, _list_obj("NodeList", "v1", rv, nodes))


def _namespaces(h: _Handler, fake, name: str | None) -> None:
    """GET /api/v1/namespaces[/name]."""
    with fake.state.cond:
        names = sorted(set(DEFAULT_NAMESPACES) | {ns for ns, _ in fake.state.pods})
    objs = [
        {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": _meta(n, None, 1, fake.state.created),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        for n in names
    ]
    if name is not None:
        obj = next((o for o in objs if o["metadata"]["name"] == name), None)
        if obj is None:
            return h.send_status(
                404,
                "NotFound",
                f'namespaces "{name}" not found',
                {"name": name, "kind": "namespaces"},
            )
        return h.send_json(200, obj)
    if h.wants_table():
        return h.send_json(200, to_table("Namespace", objs, str(fake.state.rv)))
    h.send_json(200, _list_obj("NamespaceList", "v1", str(fake.state.rv), objs))


def _is_watch(h: _Handler) -> bool:
    """True for ?watch=true/1."""
    return h.query.get("watch", "").lower() in ("true", "1")


def _pods_collection(h: _Handler, fake, ns: str | None) -> None:
    """List, watch or create pods."""
    if h.command == "POST" and ns is not None:
        return _create_pod(h, fake, ns)
    if h.command not in ("GET", "HEAD"):
        return h.send_status(
            405, "MethodNotAllowed", "the server does not allow this method"
        )
    if _is_watch(h):
        return _watch_pods(h, fake, ns)
    rv, pods = fake.state.list_pods(ns)
    pods = [
        p
        for p in pods
        if _field_match(p, h.query.get("fieldSelector", ""))
        and _label_match(p, h.query.get("labelSelector", ""))
    ]
    if h.wants_table():
        return h.send_json(200, to_table("Pod", pods, rv))
    h.send_json(200, _list_obj("PodList", "v1", rv, pods))


def _create_pod(h: _Handler, fake, ns: str) -> None:
    """POST a pod (JSON body); 201, 409 AlreadyExists or 400."""
    try:
        body = json.loads(h.body or b"{}")
        name = body["metadata"]["name"]
    except (ValueError, KeyError, TypeError):
        return h.send_status(
            400, "BadRequest", "invalid pod body (JSON with metadata.name required)"
        )
    body["metadata"]["namespace"] = body["metadata"].get("namespace") or ns
    pod, err = fake.state.add_pod(name, ns, body)
    if err:
        return h.send_status(
            409,
            "AlreadyExists",
            f'pods "{name}" already exists',
            {"name": name, "kind": "pods"},
        )
    h.send_json(201, pod)


# --------------------------------------------------------------------------
# Watch and logs (chunked streams)
# --------------------------------------------------------------------------
def _watch_event(h: _Handler, etype: str, obj: dict) -> bytes:
    """Serialize one watch event line (object as Table row if requested)."""
    if h.wants_table() and etype != "BOOKMARK":
        obj = to_table(obj.get("kind", ""), [obj], obj["metadata"]["resourceVersion"])
    return (
        json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode()
        + b"\n"
    )


def _watch_deadline(h: _Handler) -> float:
    """Absolute deadline from timeoutSeconds (or far future)."""
    secs = h.query.get("timeoutSeconds")
    return time.monotonic() + (float(secs) if secs else 10**9)


def _watch_pods(h: _Handler, fake, ns: str | None) -> None:
    """Chunked watch: initial ADDED (when no/zero resourceVersion) then live events."""
    state, fsel = fake.state, h.query.get("fieldSelector", "")
    lsel = h.query.get("labelSelector", "")

    def want(o: dict) -> bool:
        return (
            (ns is None or o["metadata"].get("namespace") == ns)
            and _field_match(o, fsel)
            and _label_match(o, lsel)
        )

    start_rv = h.query.get("resourceVersion", "")
    with state.cond:
        if start_rv in ("", "0"):
            initial = [p for p in state.pods.values() if want(p)]
            last = state.rv
        else:
            initial, last = [], int(start_rv)
    h.start_chunked("application/json")
    for pod in initial:
        h.write_chunk(_watch_event(h, "ADDED", pod))
    deadline = _watch_deadline(h)
    while True:
        with state.cond:
            state.cond.wait_for(
                lambda: (
                    state.stopped or state.rv > last or time.monotonic() >= deadline
                ),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if state.stopped or time.monotonic() >= deadline:
                break
            events = [e for e in state.events if e[0] > last]
            last = state.rv
        for _, etype, obj in events:
            if want(obj):
                h.write_chunk(_watch_event(h, etype, obj))
    h.end_chunked()


def _watch_static(h: _Handler, fake, kind: str, objs: list) -> None:
    """Watch of a static collection (nodes): initial ADDED, then idle until end."""
    h.start_chunked("application/json")
    if h.query.get("resourceVersion", "") in ("", "0"):
        for obj in objs:
            h.write_chunk(_watch_event(h, "ADDED", obj))
    deadline = _watch_deadline(h)
    with fake.state.cond:
        fake.state.cond.wait_for(
            lambda: fake.state.stopped or time.monotonic() >= deadline,
            timeout=max(0.0, deadline - time.monotonic()),
        )
    h.end_chunked()


def _pod_log(h: _Handler, fake, ns: str, name: str) -> None:
    """Pod logs: plain text, or a chunked follow stream."""
    state = fake.state
    with state.cond:
        lines = list(state.logs.get((ns, name), []))
        epoch = state.log_epoch
    if h.query.get("follow", "").lower() not in ("true", "1"):
        return h.send_bytes(200, "".join(lines).encode(), "text/plain")
    h.start_chunked("text/plain")
    h.write_chunk("".join(lines).encode())
    sent = len(lines)
    while True:
        with state.cond:
            state.cond.wait_for(
                lambda: (
                    state.stopped
                    or state.log_epoch != epoch
                    or (ns, name) not in state.pods
                    or len(state.logs.get((ns, name), [])) > sent
                )
            )
            new = state.logs.get((ns, name), [])[sent:]
            done = (
                state.stopped
                or state.log_epoch != epoch
                or (ns, name) not in state.pods
            )
        sent += len(new)
        h.write_chunk("".join(new).encode())
        if done:
            break
    h.end_chunked()


# --------------------------------------------------------------------------
# Exec: upgrade negotiation
# --------------------------------------------------------------------------
def _header_tokens(h: _Handler, name: str) -> list:
    """All comma-separated tokens of (possibly repeated) header `name`."""
    values = h.headers.get_all(name) or []
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _pod_exec(h: _Handler, fake) -> None:
    """Pod exec: upgrade to WebSocket or SPDY/3.1 and run a fake `cat`."""
    fake.watch_hangup(h)
    upgrade = (h.headers.get("Upgrade") or "").lower()
    if upgrade == "websocket":
        return _exec_websocket(h, fake)
    if upgrade.startswith("spdy/3.1"):
        return _exec_spdy(h, fake)
    h.send_status(400, "BadRequest", "Upgrade request required")


def _exec_websocket(h: _Handler, fake) -> None:
    """WebSocket handshake (RFC 6455) with a k8s channel subprotocol."""
    proto = _ws_accept(h, WS_PROTOCOLS)
    if proto is not None:
        fake._note_exec("websocket", proto)
        _WsExecSession(h, proto).run()


def _ws_accept(h: _Handler, protocols: tuple) -> str | None:
    """Answer a WebSocket upgrade with the first of `protocols` the client offers
    (101), or refuse it (400, None)."""
    offered = _header_tokens(h, "Sec-WebSocket-Protocol")
    proto = next((p for p in protocols if p in offered), None)
    key = h.headers.get("Sec-WebSocket-Key")
    if (
        not key
        or proto is None
        or (h.headers.get("Upgrade") or "").lower() != "websocket"
    ):
        h.send_status(
            400, "BadRequest", f"unsupported websocket subprotocols {offered}"
        )
        return None
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    h.send_response(101, "Switching Protocols")
    h.send_header("Upgrade", "websocket")
    h.send_header("Connection", "Upgrade")
    h.send_header("Sec-WebSocket-Accept", accept)
    h.send_header("Sec-WebSocket-Protocol", proto)
    h.end_headers()
    h.close_connection = True
    return proto


def _pod_portforward(h: _Handler, fake) -> None:
    """Port-forward over WebSocket (v4.channel.k8s.io, as kube-apiserver offers it
    to the Python client): each port's bytes are echoed back, as by an echo server
    in the pod."""
    if _ws_accept(h, ("v4.channel.k8s.io",)) is not None:
        fake._note_exec("portforward", "v4.channel.k8s.io")
        _WsPortForwardSession(h, "v4.channel.k8s.io").run()


def _exec_spdy(h: _Handler, fake) -> None:
    """SPDY/3.1 upgrade with X-Stream-Protocol-Version negotiation."""
    offered = _header_tokens(h, "X-Stream-Protocol-Version")
    proto = next((p for p in SPDY_PROTOCOLS if p in offered), None)
    if offered and proto is None:
        return h.send_status(
            403, "Forbidden", f"unsupported stream protocols {offered}"
        )
    h.send_response(101, "Switching Protocols")
    h.send_header("Connection", "Upgrade")
    h.send_header("Upgrade", "SPDY/3.1")
    if proto:
        h.send_header("X-Stream-Protocol-Version", proto)
    h.end_headers()
    h.close_connection = True
    fake._note_exec("spdy", proto or "")
    _SpdyExecSession(h, proto or "channel.k8s.io").run()


def _exec_stdin_enabled(query: dict, name: str) -> bool:
    """Whether exec query parameter `name` (stdin/stdout/stderr/tty) is true."""
    return query.get(name, "").lower() in ("true", "1")


@dataclasses.dataclass
class _ExecPlan:
    """What the fake command does: fixed output, echo stdin?, exit code."""

    output: bytes = b""
    echo_stdin: bool = True
    exit_code: int = 0


def _exec_plan(command: list) -> _ExecPlan:
    """Fake commands: `echo ARGS`, `false` (exit 1), `exit N`; anything else is `cat`."""
    name = command[0] if command else "cat"
    if name == "echo":
        return _ExecPlan((" ".join(command[1:]) + "\n").encode(), False, 0)
    if name == "false":
        return _ExecPlan(b"", False, 1)
    if name == "exit":
        return _ExecPlan(b"", False, int(command[1]) if len(command) > 1 else 0)
    return _ExecPlan()


def _exec_status(command: list, code: int) -> bytes:
    """v4+ status JSON for the error channel/stream."""
    if code == 0:
        return EXEC_SUCCESS
    msg = (
        f"command terminated with non-zero exit code: error executing command "
        f"{command}, exit code {code}"
    )
    return json.dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": msg,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        },
        separators=(",", ":"),
    ).encode()


# --------------------------------------------------------------------------
# Exec over WebSocket
# --------------------------------------------------------------------------
class _WsExecSession:
    """cat over the k8s WebSocket channel protocol (v4/v5 binary framing)."""

    def __init__(self, h: _Handler, proto: str):
        """Bind to the upgraded connection."""
        self.rfile, self.wfile = h.rfile, h.wfile
        self.proto = proto
        self.stdout = _exec_stdin_enabled(h.query, "stdout")
        self.stdin = _exec_stdin_enabled(h.query, "stdin")
        self.command = h.query_all.get("command", [])
        self.plan = _exec_plan(self.command)

    def run(self) -> None:
        """Echo stdin to stdout until stdin closes (v5) or the client closes."""
        try:
            if self.plan.output and self.stdout:
                self._send_frame(WS_OP_BIN, bytes([CH_STDOUT]) + self.plan.output)
            if not self.stdin or not self.plan.echo_stdin:
                self._finish()
            while True:
                opcode, payload = self._read_message()
                if opcode == WS_OP_CLOSE:
                    self._send_frame(WS_OP_CLOSE, payload[:2])
                    return
                if opcode == WS_OP_BIN and payload:
                    self._on_channel_data(payload[0], payload[1:])
        except (_ExecDone, EOFError, OSError, ValueError):
            return

    def _on_channel_data(self, channel: int, data: bytes) -> None:
        """Handle one channel message from the client."""
        if channel == CH_STDIN and data and self.stdout and self.plan.echo_stdin:
            self._send_frame(WS_OP_BIN, bytes([CH_STDOUT]) + data)
        elif channel == CH_CLOSE and data[:1] == bytes([CH_STDIN]):
            self._finish()

    def _finish(self) -> None:
        """Send the Success status on the error channel, then a close frame."""
        status = _exec_status(self.command, self.plan.exit_code)
        self._send_frame(WS_OP_BIN, bytes([CH_ERROR]) + status)
        self._send_frame(WS_OP_CLOSE, struct.pack(">H", 1000))
        self._drain_until_close()
        raise _ExecDone()

    def _drain_until_close(self) -> None:
        """Read (and drop) client frames until its close frame or EOF (max 5 s)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            opcode, _ = self._read_message()
            if opcode == WS_OP_CLOSE:
                return

    def _read_exact(self, n: int) -> bytes:
        """Read exactly n bytes or raise EOFError."""
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise EOFError
        return data

    def _read_frame(self):
        """Read one frame: (fin, opcode, unmasked payload)."""
        b0, b1 = self._read_exact(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._read_exact(8))[0]
        mask = self._read_exact(4) if b1 & 0x80 else b""
        payload = self._read_exact(length)
        if mask:
            payload = _ws_unmask(payload, mask)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def _read_message(self):
        """Read a complete message (reassembling fragments, answering pings)."""
        fin, opcode, payload = self._read_frame()
        while True:
            if opcode == WS_OP_PING:
                self._send_frame(WS_OP_PONG, payload)
            elif opcode != WS_OP_PONG:
                break
            fin, opcode, payload = self._read_frame()
        while not fin:
            fin, _, more = self._read_frame()
            payload += more
        return opcode, payload

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        """Send one unmasked server frame."""
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)


class _WsPortForwardSession(_WsExecSession):
    """Port i has data channel 2i and error channel 2i+1; each channel's first
    frame carries the port number (little-endian). Data comes back unchanged."""

    def run(self) -> None:
        ports = [int(p) for p in self.query_ports]
        try:
            for i, port in enumerate(ports):
                for channel in (2 * i, 2 * i + 1):
                    self._send_frame(
                        WS_OP_BIN, bytes([channel]) + struct.pack("<H", port)
                    )
            while True:
                opcode, payload = self._read_message()
                if opcode == WS_OP_CLOSE:
                    self._send_frame(WS_OP_CLOSE, payload[:2])
                    return
                if opcode == WS_OP_BIN and payload[:1] and payload[0] % 2 == 0:
                    self.echoed += len(payload) - 1
                    self._send_frame(WS_OP_BIN, payload)
        except (EOFError, OSError, ValueError):
            return

    def __init__(self, h: _Handler, proto: str):
        super().__init__(h, proto)
        self.query_ports = h.query.get("ports", "").split(",")
        self.echoed = 0


def _ws_unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR-unmask a WebSocket payload (fast, via big integers)."""
    n = len(payload)
    if n == 0:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        n, "big"
    )


# --------------------------------------------------------------------------
# Exec over SPDY/3.1
# --------------------------------------------------------------------------
class _SpdyExecSession:
    """cat over SPDY/3.1 streams (k8s remotecommand v1-v4 stream protocols)."""

    def __init__(self, h: _Handler, proto: str):
        """Bind to the upgraded connection; create zlib header contexts."""
        self.rfile, self.wfile = h.rfile, h.wfile
        self.proto = proto
        self.inflater = zlib.decompressobj(zdict=SPDY_DICT)
        self.deflater = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zdict=SPDY_DICT)
        self.streams: dict[str, int] = {}  # streamtype -> stream id
        self.expected = {"error"} | {
            n for n in ("stdin", "stdout", "stderr") if _exec_stdin_enabled(h.query, n)
        }
        if _exec_stdin_enabled(h.query, "tty"):
            self.expected = (self.expected - {"stderr"}) | {"resize"}
        self.command = h.query_all.get("command", [])
        self.plan = _exec_plan(self.command)
        self.pending_stdout: list[bytes] = (
            [self.plan.output] if self.plan.output else []
        )
        self.stdin_done = "stdin" not in self.expected or not self.plan.echo_stdin
        self.finished = False

    def run(self) -> None:
        """Frame loop until the client goes away."""
        try:
            while True:
                head = self._read_exact(8)
                word, flags_len = struct.unpack(">II", head)
                flags, length = flags_len >> 24, flags_len & 0xFFFFFF
                payload = self._read_exact(length)
                if word & 0x80000000:
                    self._on_control(word & 0xFFFF, flags, payload)
                else:
                    self._on_data(word & 0x7FFFFFFF, flags, payload)
        except (_ExecDone, EOFError, OSError, ValueError, zlib.error):
            return

    def _read_exact(self, n: int) -> bytes:
        """Read exactly n bytes or raise EOFError."""
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise EOFError
        return data

    # ---- frames in ----------------------------------------------------------
    def _on_control(self, ftype: int, flags: int, payload: bytes) -> None:
        """Handle a control frame."""
        if ftype == SPDY_SYN_STREAM:
            sid = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            headers = self._decode_headers(payload[10:])
            self._on_syn_stream(sid, headers, flags)
        elif ftype in (SPDY_SYN_REPLY, SPDY_HEADERS):
            self._decode_headers(payload[4:])  # keep the zlib context in sync
        elif ftype == SPDY_PING:
            self._send_control(SPDY_PING, 0, payload)
        elif ftype == SPDY_GOAWAY:
            raise _ExecDone()
        elif ftype == SPDY_RST_STREAM:
            sid = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == self.streams.get("stdin"):
                self._stdin_closed()
        # SETTINGS and WINDOW_UPDATE: nothing to do (no flow control enforced)

    def _on_syn_stream(self, sid: int, headers: dict, flags: int) -> None:
        """Record the stream by its streamtype and reply."""
        stype = headers.get("streamtype", "")
        self.streams[stype] = sid
        self._send_control(
            SPDY_SYN_REPLY, 0, struct.pack(">I", sid) + self._encode_headers({})
        )
        if stype == "stdin" and flags & SPDY_FLAG_FIN:
            self._stdin_closed()
        self._maybe_start()

    def _on_data(self, sid: int, flags: int, data: bytes) -> None:
        """Echo stdin data to stdout; handle stdin FIN."""
        if sid == self.streams.get("stdin"):
            if data and self.plan.echo_stdin:
                self._send_stdout(data)
                if SPDY_SEND_WINDOW_UPDATES:
                    self._send_control(
                        SPDY_WINDOW_UPDATE, 0, struct.pack(">II", sid, len(data))
                    )
            if flags & SPDY_FLAG_FIN:
                self._stdin_closed()

    # ---- exec logic -----------------------------------------------------------
    def _expected_streams(self) -> bool:
        """True once every stream implied by the query exists."""
        return self.expected <= set(self.streams)

    def _maybe_start(self) -> None:
        """Flush buffered output, finish if stdin already closed."""
        if not self._expected_streams():
            return
        for data in self.pending_stdout:
            if "stdout" in self.streams:
                self._send_data(self.streams["stdout"], data, 0)
        self.pending_stdout.clear()
        if self.stdin_done:
            self._finish()

    def _send_stdout(self, data: bytes) -> None:
        """Send to stdout now, or buffer until the stream exists."""
        if "stdout" not in self.expected:
            return
        if "stdout" in self.streams and self._expected_streams():
            self._send_data(self.streams["stdout"], data, 0)
        else:
            self.pending_stdout.append(data)

    def _stdin_closed(self) -> None:
        """stdin reached EOF: finish when all output streams are known."""
        self.stdin_done = True
        if self._expected_streams():
            self._finish()

    def _finish(self) -> None:
        """Send Success on the error stream and FIN all server-side streams."""
        if self.finished:
            return
        self.finished = True
        for stype in ("stdout", "stderr"):
            if stype in self.streams:
                self._send_data(self.streams[stype], b"", SPDY_FLAG_FIN)
        status = _exec_status(self.command, self.plan.exit_code)
        if not self.proto.startswith("v4"):  # v1-v3: plain error text
            status = (
                b""
                if self.plan.exit_code == 0
                else json.loads(status)["message"].encode()
            )
        self._send_data(self.streams["error"], status, SPDY_FLAG_FIN)

    # ---- frames out -------------------------------------------------------------
    def _decode_headers(self, block: bytes) -> dict:
        """Decompress and parse a name/value header block."""
        raw = self.inflater.decompress(block)
        count, pos, out = struct.unpack(">I", raw[:4])[0], 4, {}
        for _ in range(count):
            nlen = struct.unpack(">I", raw[pos : pos + 4])[0]
            name = raw[pos + 4 : pos + 4 + nlen].decode().lower()
            pos += 4 + nlen
            vlen = struct.unpack(">I", raw[pos : pos + 4])[0]
            out[name] = raw[pos + 4 : pos + 4 + vlen].decode().split("\x00")[0]
            pos += 4 + vlen
        return out

    def _encode_headers(self, headers: dict) -> bytes:
        """Build and compress a name/value header block (persistent context)."""
        raw = struct.pack(">I", len(headers))
        for k, v in headers.items():
            raw += struct.pack(">I", len(k)) + k.encode()
            raw += struct.pack(">I", len(v)) + v.encode()
        return self.deflater.compress(raw) + self.deflater.flush(zlib.Z_SYNC_FLUSH)

    def _send_control(self, ftype: int, flags: int, payload: bytes) -> None:
        """Write a control frame."""
        head = struct.pack(
            ">HHI", 0x8000 | SPDY_VERSION, ftype, (flags << 24) | len(payload)
        )
        self.wfile.write(head + payload)

    def _send_data(self, sid: int, data: bytes, flags: int) -> None:
        """Write a data frame (split at 16 MiB-1 if needed)."""
        while len(data) > 0xFFFFFF:
            self._send_data(sid, data[:0xFFFFFF], 0)
            data = data[0xFFFFFF:]
        head = struct.pack(">II", sid & 0x7FFFFFFF, (flags << 24) | len(data))
        self.wfile.write(head + data)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------
class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Threading TCP server; TLS is done per connection in the handler thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    block_on_close = False

    def process_request(self, request, client_address) -> None:
        """Start a daemon thread per connection and remember it for join."""
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=True,
        )
        self.fake._track_thread(t)
        t.start()

    def handle_error(self, request, client_address) -> None:
        """Ignore per-connection errors (peer went away, etc.)."""


class FakeApiServer:
    """A fake kube-apiserver over TLS requiring client certificates."""

    def __init__(
        self,
        *,
        server_cert_pem: bytes,
        server_key_pem: bytes,
        client_ca_pem: bytes,
        host: str = "127.0.0.1",
        tls_versions: tuple = ("1.2", "1.3"),
        path_prefix: str = "",
        git_version: str = DEFAULT_GIT_VERSION,
    ):
        """Configure TLS (CERT_REQUIRED against client_ca_pem) and state.

        git_version is what /version reports; note that the gcloud kubectl
        *dispatcher* (the installed kubectl here) execs the kubectl.1.xx binary that
        matches the server's minor version."""
        self.host = host
        major, minor = git_version.lstrip("v").split(".")[:2]
        self.version_info = dict(
            FAKE_VERSION, gitVersion=git_version, major=major, minor=minor
        )
        self.path_prefix = path_prefix.rstrip("/")
        self.ssl_context = _make_ssl_context(
            server_cert_pem, server_key_pem, client_ca_pem, tls_versions
        )
        self.state = _State()
        self.port = 0
        self.url = ""
        self.requests: list[RequestRecord] = []
        self.exec_sessions: list[tuple] = []  # (transport, subprotocol)
        self.hangups: list[tuple] = []  # (path, time.monotonic()) of streams' ends
        self.hangup_seen = threading.Condition()
        self.drop_next = 0  # requests to answer by closing the connection
        self._handshakes = 0
        self._lock = threading.Lock()
        self._conns: set = set()
        self._threads: list[threading.Thread] = []
        self._stop_event = threading.Event()
        self._streams = 0  # chunked responses not yet ended
        self._streams_ended = threading.Condition(self._lock)
        self._server: _TCPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Bind an ephemeral port and serve in a background thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        _TCPServer.address_family = family
        srv = _TCPServer((self.host, 0), _Handler, bind_and_activate=True)
        srv.fake = self
        self._server = srv
        self.port = srv.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"https://{host}:{self.port}{self.path_prefix}"
        self._serve_thread = threading.Thread(
            target=srv.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fake-apiserver",
            daemon=True,
        )
        self._serve_thread.start()

    def stop(self) -> None:
        """Stop accepting, end streams, close connections, join threads."""
        if self._server is None:
            return
        self._stop_event.set()
        self.state.stop()
        self._server.shutdown()
        self._server.server_close()
        with self._streams_ended:  # woken by stop, streams write their last chunk
            self._streams_ended.wait_for(lambda: self._streams == 0, JOIN_TIMEOUT)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for sock in conns:
            _shutdown_quietly(sock)
        for t in threads:
            t.join(JOIN_TIMEOUT)
        self._serve_thread.join(JOIN_TIMEOUT)
        self._server = None

    def __enter__(self):
        """Context manager: start."""
        self.start()
        return self

    def __exit__(self, *exc):
        """Context manager: stop."""
        self.stop()

    # ---- observation -------------------------------------------------------
    @property
    def handshakes(self) -> int:
        """Number of completed TLS handshakes."""
        with self._lock:
            return self._handshakes

    def _conn_opened(self, sock) -> None:
        """Count a completed handshake and track the connection."""
        with self._lock:
            self._handshakes += 1
            self._conns.add(sock)

    def _stream_started(self, h: _Handler) -> None:
        with self._lock:
            h.streaming = True
            self._streams += 1

    def _stream_ended(self, h: _Handler) -> None:
        """Count a stream as ended (once: after its last chunk or its error)."""
        with self._lock:
            if getattr(h, "streaming", False):
                h.streaming = False
                self._streams -= 1
                self._streams_ended.notify_all()

    def _conn_closed(self, sock) -> None:
        """Forget a connection."""
        with self._lock:
            self._conns.discard(sock)

    def _track_thread(self, t: threading.Thread) -> None:
        """Remember a connection thread (pruning finished ones)."""
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _record(self, h: _Handler) -> None:
        """Append a RequestRecord for the current request."""
        sock = h.request
        headers: dict = {}
        for k, v in h.headers.items():  # repeated headers are joined with ", "
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        rec = RequestRecord(
            h.command,
            h.path,
            headers,
            h.peer_subject,
            sock.version() or "",
            sock.selected_alpn_protocol(),
            sock.getpeercert(binary_form=True) or b"",
        )
        with self._lock:
            self.requests.append(rec)

    def take_drop(self) -> bool:
        with self._lock:
            if self.drop_next <= 0:
                return False
            self.drop_next -= 1
            return True

    def close_connections(self) -> None:
        """Close every open connection, as a server's idle timeout does."""
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            _shutdown_quietly(sock)

    def watch_hangup(self, h: _Handler) -> None:
        """Record when the client of a stream closes its connection (POLLRDHUP, as
        a real server's read loop notices it), in ``hangups``."""
        fd, path = h.connection.fileno(), h.path

        def watch() -> None:
            poller = select.poll()
            poller.register(fd, select.POLLRDHUP)
            while not self._stop_event.is_set():
                if poller.poll(100):
                    with self.hangup_seen:
                        self.hangups.append((path, time.monotonic()))
                        self.hangup_seen.notify_all()
                    return

        threading.Thread(target=watch, daemon=True).start()

    def wait_hangups(self, count: int, timeout: float = 30) -> list:
        with self.hangup_seen:
            if not self.hangup_seen.wait_for(
                lambda: len(self.hangups) >= count, timeout
            ):
                raise AssertionError(f"hang-ups seen: {self.hangups}")
            return list(self.hangups)

    def _note_exec(self, transport: str, proto: str) -> None:
        """Remember which exec transport/subprotocol was negotiated."""
        with self._lock:
            self.exec_sessions.append((transport, proto))

    # ---- state mutation ----------------------------------------------------
    def add_pod(self, name: str, namespace: str = "default") -> None:
        """Create a Running pod; watchers get ADDED."""
        self.state.add_pod(name, namespace)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Delete a pod; watchers get DELETED."""
        self.state.delete_pod(name, namespace)

    def append_log(self, pod: str, line: str, namespace: str = "default") -> None:
        """Append a log line; follow streams get it immediately."""
        self.state.append_log(namespace, pod, line)

    def close_logs(self) -> None:
        """End all currently open `logs -f` streams."""
        self.state.bump_log_epoch()


def _make_ssl_context(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes, tls_versions: tuple
) -> ssl.SSLContext:
    """Server SSLContext: given versions, CERT_REQUIRED, ALPN http/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    chosen = sorted(versions[v] for v in tls_versions)
    ctx.minimum_version, ctx.maximum_version = chosen[0], chosen[-1]
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=client_ca_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    _load_cert_chain_from_memory(ctx, cert_pem, key_pem)
    return ctx


def _load_cert_chain_from_memory(
    ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes
) -> None:
    """load_cert_chain needs files: use a private temp dir, removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fake-apiserver-") as d:
        cert_path, key_path = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        _write(cert_path, cert_pem)
        _write(key_path, key_pem)
        ctx.load_cert_chain(cert_path, key_path)


def _shutdown_quietly(sock) -> None:
    """shutdown(SHUT_RDWR) a socket, ignoring errors."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


__all__ = [
    "PATTERN_BLOCK",
    "SPDY_DICT",
    "FakeApiServer",
    "FakePki",
    "RequestRecord",
    "make_ca",
    "make_client_cert",
    "make_server_cert",
    "make_test_pki",
    "status_obj",
    "to_table",
]


# -- the certificates.k8s.io/v1 CSR API (enroll and renew) --------------------


# --------------------------------------------------------------------------
# certificates.k8s.io/v1 constants
# --------------------------------------------------------------------------
CSR_GROUP = "certificates.k8s.io"
CSR_GV = "certificates.k8s.io/v1"
CSR_RESOURCE = "certificatesigningrequests"
CSR_KIND = "CertificateSigningRequest"
CSR_QUALIFIED = f"{CSR_RESOURCE}.{CSR_GROUP}"  # for NotFound/AlreadyExists/...
KUBE_APISERVER_CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client"
CSR_MIN_EXPIRATION = 600  # apiserver validation
CSR_MAX_DURATION = 365 * 24 * 3600  # --cluster-signing-duration default (1y)
CSR_BACKDATE = datetime.timedelta(minutes=1)
CSR_KNOWN_USAGES = (  # certificates.AllKeyUsages (sorted)
    "any",
    "cert sign",
    "client auth",
    "code signing",
    "content commitment",
    "crl sign",
    "data encipherment",
    "decipher only",
    "digital signature",
    "email protection",
    "encipher only",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "key agreement",
    "key encipherment",
    "microsoft sgc",
    "netscape sgc",
    "ocsp signing",
    "s/mime",
    "server auth",
    "signing",
    "timestamping",
)
CSR_CLIENT_OPTIONAL_USAGES = ("digital signature", "key encipherment")
SYSTEM_MASTERS = "system:masters"
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apiserver SimpleNameGenerator
_CSR_VERBS = ["create", "delete", "get", "list", "patch"]
_CSR_VERBS += ["update", "watch"]
API_RESOURCES_CERTIFICATES_V1 = [
    {
        "name": "certificatesigningrequests",
        "singularName": "certificatesigningrequest",
        "namespaced": False,
        "kind": CSR_KIND,
        "verbs": _CSR_VERBS,
        "shortNames": ["csr"],
        "storageVersionHash": "95fRKMXA+00=",
    },
    {
        "name": "certificatesigningrequests/approval",
        "singularName": "",
        "namespaced": False,
        "kind": CSR_KIND,
        "verbs": ["get", "patch", "update"],
    },
    {
        "name": "certificatesigningrequests/status",
        "singularName": "",
        "namespaced": False,
        "kind": CSR_KIND,
        "verbs": ["get", "patch", "update"],
    },
]
CSR_TABLE_COLUMNS = (
    ("Name", "string", "name"),
    ("Age", "string", ""),
    ("SignerName", "string", ""),
    ("Requestor", "string", ""),
    ("RequestedDuration", "string", ""),
    ("Condition", "string", ""),
)


# --------------------------------------------------------------------------
# Installation, test hooks
# --------------------------------------------------------------------------
def csr_install(fake, client_ca_cert, client_ca_key) -> None:
    """Enable the CSR API on a FakeApiServer; the signer is the client CA.

    client_ca_cert: x509.Certificate or PEM bytes (FakePki.client_ca_pem);
    client_ca_key: private key object (FakePki.client_ca_key) or PEM bytes."""
    if isinstance(client_ca_cert, (bytes, str)):
        client_ca_cert = x509.load_pem_x509_certificate(_as_bytes(client_ca_cert))
    if isinstance(client_ca_key, (bytes, str)):
        client_ca_key = serialization.load_pem_private_key(
            _as_bytes(client_ca_key), None
        )
    fake.csr_signer = (client_ca_cert, client_ca_key)
    fake.csrs = {}  # name -> object (guarded by fake.state.cond)
    fake.csr_events = []  # (rv, type, obj) for watches
    fake.csr_sign_delay = 0.0
    fake.csr_issue_override = None
    fake.csr_usage_check = "signer"  # or "create" (422 at create)
    fake.cluster_roles = {}  # name -> ClusterRole
    fake.cluster_role_bindings = []  # ClusterRoleBindings, in creation order
    fake.access_reviews = []  # (user, resourceAttributes, allowed)
    fake.authorization_log = []  # (user, verb, group, resource, name)


def csr_get(fake, name: str) -> dict | None:
    """A deep copy of the stored CSR (None if absent)."""
    with fake.state.cond:
        obj = fake.csrs.get(name)
        return copy.deepcopy(obj) if obj is not None else None


def csr_wait(fake, predicate=None, timeout: float = 10.0) -> dict:
    """Wait until some CSR satisfies predicate(obj) (default: any CSR exists);
    returns a copy of it.  Raises TimeoutError."""
    predicate = predicate or (lambda obj: True)
    deadline = time.monotonic() + timeout
    with fake.state.cond:
        while True:
            for obj in fake.csrs.values():
                if predicate(obj):
                    return copy.deepcopy(obj)
            left = deadline - time.monotonic()
            if left <= 0 or fake.state.stopped:
                raise TimeoutError("no matching CertificateSigningRequest")
            fake.state.cond.wait(left)


def csr_approve(fake, name: str, message: str = "approved by the test") -> dict:
    """Server-side approval (as kubectl certificate approve); returns the object.

    No-op if already approved; ValueError if denied, KeyError if absent."""
    return _add_decision(fake, name, "Approved", "TestApprove", message)


def csr_deny(fake, name: str, message: str = "") -> dict:
    """Server-side denial; returns the object (ValueError if approved)."""
    return _add_decision(fake, name, "Denied", "TestDeny", message)


def _add_decision(fake, name, ctype, reason, message) -> dict:
    """Append an Approved/Denied condition and kick the signer."""
    other = "Denied" if ctype == "Approved" else "Approved"
    with fake.state.cond:
        obj = fake.csrs.get(name)
        if obj is None:
            raise KeyError(name)
        if _has_condition(obj, other):
            raise ValueError(f"certificate signing request {name!r} is already {other}")
        if not _has_condition(obj, ctype):
            now = _ts(time.time())
            obj["status"].setdefault("conditions", []).append(
                {
                    "type": ctype,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastUpdateTime": now,
                    "lastTransitionTime": now,
                }
            )
            _csr_store(fake, obj, "MODIFIED")
        result = copy.deepcopy(obj)
    _csr_kick_signer(fake, name)
    return result


# --------------------------------------------------------------------------
# RBAC for the CSR API, as kube-apiserver enforces it: the RBAC authorizer
# (system:masters keeps all), the approval admission check of the signer's
# `approve` verb, and SelfSubjectAccessReview answered from the same bindings
# --------------------------------------------------------------------------
AUTHZ_GROUP = "authorization.k8s.io"
AUTHZ_GV = {"groupVersion": f"{AUTHZ_GROUP}/v1", "version": "v1"}
RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_RESOURCES = {
    "clusterroles": "ClusterRole",
    "clusterrolebindings": "ClusterRoleBinding",
}
# The built-in roles --bind-clusterrole names in the tests, reduced to what they
# grant on the cluster-scoped resources authorized here (view/edit/admin: none).
BUILTIN_CLUSTER_ROLES = {
    "cluster-admin": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
    "view": [],
    "edit": [],
    "admin": [],
}


def _rule_allows(rule: dict, verb: str, group: str, resource: str, name: str) -> bool:
    def has(key: str, value: str) -> bool:
        return bool({"*", value} & set(rule.get(key) or []))

    names = rule.get("resourceNames") or []
    return (
        has("verbs", verb)
        and has("apiGroups", group)
        and has("resources", resource)
        and (not names or name in names)
    )


def _subject_matches(subject: dict, user: str, groups: list) -> bool:
    if subject.get("kind") == "User":
        return subject.get("name") == user
    return subject.get("kind") == "Group" and subject.get("name") in groups


def rbac_allowed_by(fake, user, groups, verb, group, resource, name="") -> str:
    """Why kube-apiserver would allow it ('' when it would not); ``resource``
    carries the subresource as resource/sub."""
    if SYSTEM_MASTERS in groups:
        return "the system:masters group"
    if (verb, group, resource) == ("create", AUTHZ_GROUP, "selfsubjectaccessreviews"):
        return 'ClusterRoleBinding "system:basic-user"'  # every authenticated user
    for binding in fake.cluster_role_bindings:
        if not any(_subject_matches(s, user, groups) for s in binding["subjects"]):
            continue
        role = binding["roleRef"]["name"]
        rules = (fake.cluster_roles.get(role) or {}).get("rules")
        if rules is None:
            rules = BUILTIN_CLUSTER_ROLES.get(role, [])
        if any(_rule_allows(r, verb, group, resource, name) for r in rules):
            return (
                f'ClusterRoleBinding "{binding["metadata"]["name"]}" of ClusterRole '
                f'"{role}"'
            )
    return ""


def authorize(h, fake, verb: str, group: str, resource: str, name: str = "") -> bool:
    """The RBAC authorizer: True, or a 403 like kube-apiserver's has been sent."""
    user, groups = _peer_identity(h)
    fake.authorization_log.append((user, verb, group, resource, name))
    if rbac_allowed_by(fake, user, groups, verb, group, resource, name):
        return True
    base = resource.split("/")[0]
    qualified = f"{base}.{group}" if group else base
    h.send_status(
        403,
        "Forbidden",
        f"{qualified}{f' {json.dumps(name)}' if name else ''} is forbidden: User "
        f'"{user}" cannot {verb} resource "{resource}" in API group "{group}" at the '
        "cluster scope",
        {**({"name": name} if name else {}), "group": group, "kind": base},
    )
    return False


def csr_request_verb(h, name: str) -> tuple[str, str]:
    """(verb, name) of a CSR API request as kube-apiserver's RequestInfo sees it:
    a list or watch whose fieldSelector is metadata.name=X concerns X."""
    if name:
        verbs = {"GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch"}
        return verbs.get(h.command, h.command.lower()), name
    if h.command == "POST":
        return "create", ""
    selector = h.query.get("fieldSelector", "")
    named = selector.removeprefix("metadata.name=") if "," not in selector else ""
    return ("watch" if _is_watch(h) else "list"), (named if named != selector else "")


def signer_approval_allowed(h, fake, obj: dict) -> bool:
    """The CSR approval admission plugin: any update of /approval needs the
    `approve` verb on the signer (its name, or its domain/*)."""
    signer = obj["spec"]["signerName"]
    user, groups = _peer_identity(h)
    for name in (signer, signer.split("/")[0] + "/*"):
        if rbac_allowed_by(fake, user, groups, "approve", CSR_GROUP, "signers", name):
            return True
    h.send_status(
        403,
        "Forbidden",
        f'{CSR_QUALIFIED} "{obj["metadata"]["name"]}" is forbidden: user not '
        f'permitted to approve requests with signerName "{signer}"',
        {"name": obj["metadata"]["name"], "group": CSR_GROUP, "kind": CSR_RESOURCE},
    )
    return False


def rbac_from_protobuf(data: bytes) -> dict:
    """A protobuf ClusterRole or ClusterRoleBinding (`kubectl create clusterrole`
    and `clusterrolebinding` send them so) -> its JSON form."""
    envelope = _pb_fields(data[len(K8S_PROTOBUF_MAGIC) :])
    type_meta = _pb_fields(envelope.get(1, [b""])[-1])
    obj = _pb_fields(envelope.get(2, [b""])[-1])
    kind = _pb_str(type_meta, 2) or ""
    body = {
        "apiVersion": _pb_str(type_meta, 1) or f"{RBAC_GROUP}/v1",
        "kind": kind,
        "metadata": {"name": _pb_str(_pb_fields(obj.get(1, [b""])[-1]), 1) or ""},
    }

    def strings(fields: dict, keys: tuple) -> dict:
        return {
            key: [v.decode() for v in fields[num]]
            for num, key in enumerate(keys, 1)
            if fields.get(num)
        }

    if kind == "ClusterRole":
        keys = ("verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs")
        body["rules"] = [strings(_pb_fields(r), keys) for r in obj.get(2, [])]
        return body
    subjects = [_pb_fields(x) for x in obj.get(2, [])]
    body["subjects"] = [
        {k: _pb_str(f, n) for n, k in enumerate(("kind", "apiGroup", "name"), 1)}
        for f in subjects
    ]
    ref = _pb_fields(obj.get(3, [b""])[-1])
    body["roleRef"] = {
        k: _pb_str(ref, n) for n, k in enumerate(("apiGroup", "kind", "name"), 1)
    }
    return body


def route_authorization(h, fake, parts: list) -> None:
    """authorization.k8s.io/v1: discovery and SelfSubjectAccessReview."""
    if parts[2:] == ["v1"]:
        return h.send_json(
            200,
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": AUTHZ_GV["groupVersion"],
                "resources": [
                    {
                        "name": "selfsubjectaccessreviews",
                        "singularName": "selfsubjectaccessreview",
                        "namespaced": False,
                        "kind": "SelfSubjectAccessReview",
                        "verbs": ["create"],
                    }
                ],
            },
        )
    if parts[2:] != ["v1", "selfsubjectaccessreviews"] or h.command != "POST":
        return h.send_status(404, "NotFound", NOT_FOUND_MSG)
    body = json.loads(h.body or b"{}")
    attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
    resource = attrs.get("resource", "")
    if attrs.get("subresource"):
        resource += "/" + attrs["subresource"]
    user, groups = _peer_identity(h)
    why = rbac_allowed_by(
        fake,
        user,
        groups,
        attrs.get("verb", ""),
        attrs.get("group", ""),
        resource,
        attrs.get("name", ""),
    )
    fake.access_reviews.append((user, attrs, bool(why)))
    status = {"allowed": bool(why)}
    if why:
        status["reason"] = f'RBAC: allowed by {why} to User "{user}"'
    h.send_json(
        201,
        {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": AUTHZ_GV["groupVersion"],
            "metadata": {"creationTimestamp": None},
            "spec": body.get("spec") or {},
            "status": status,
        },
    )


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------
def apis_group_entry() -> dict:
    """The certificates.k8s.io APIGroup entry for GET /apis."""
    gv = {"groupVersion": CSR_GV, "version": "v1"}
    return {"name": CSR_GROUP, "versions": [gv], "preferredVersion": gv}


def _csr_resource_list() -> dict:
    """GET /apis/certificates.k8s.io/v1."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": CSR_GV,
        "resources": API_RESOURCES_CERTIFICATES_V1,
    }


OPENAPI_V3_CSR_PATH = "apis/certificates.k8s.io/v1"


def openapi_v3_csr(h, fake) -> None:
    """GET /openapi/v3/apis/certificates.k8s.io/v1: a minimal document whose
    create/patch operations accept fieldValidation, so that kubectl create
    without --validate=false relies on server-side validation."""
    params = [
        {"name": n, "in": "query", "schema": {"type": "string"}}
        for n in ("dryRun", "fieldManager", "fieldValidation", "force")
    ]
    gvk = {"group": CSR_GROUP, "version": "v1", "kind": CSR_KIND}

    def op(action: str, verb: str) -> dict:
        return {
            "operationId": f"{verb}CertificatesV1{CSR_KIND}",
            "parameters": params,
            "x-kubernetes-group-version-kind": gvk,
            "x-kubernetes-action": action,
            "responses": {"200": {"description": "OK"}},
        }

    base = f"/{OPENAPI_V3_CSR_PATH}/{CSR_RESOURCE}"
    paths = {
        base: {"post": op("post", "create")},
        base + "/{name}": {"patch": op("patch", "patch")},
        base + "/{name}/approval": {"patch": op("patch", "patch")},
        base + "/{name}/status": {"patch": op("patch", "patch")},
    }
    h.send_json(
        200,
        {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": fake.version_info["gitVersion"]},
            "paths": paths,
            "components": {"schemas": {}},
        },
    )


# --------------------------------------------------------------------------
# Protobuf request bodies: client-go's typed clientset (kubectl certificate
# approve|deny) PUTs application/vnd.kubernetes.protobuf.  Decoded to the
# JSON form; responses are always JSON (the client also Accepts JSON).
# --------------------------------------------------------------------------
K8S_PROTOBUF_MAGIC = b"k8s\x00"


def _pb_fields(data: bytes) -> dict:
    """Protobuf wire format -> {field number: [values]} (varint -> int,
    length-delimited -> bytes; fixed32/64 -> bytes)."""
    out: dict = {}
    pos = 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            value = data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value = data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(num, []).append(value)
    return out


def _pb_str(fields: dict, num: int) -> str | None:
    """Last string value of a field (None when absent)."""
    return fields[num][-1].decode() if num in fields else None


def _pb_time(raw: bytes) -> str | None:
    """metav1.Time {seconds=1, nanos=2} -> RFC3339 (None for the zero time,
    which client-go sends as an empty Timestamp)."""
    seconds = _pb_fields(raw).get(1, [0])[-1]
    return _ts(seconds - (1 << 64 if seconds >> 63 else 0)) if seconds else None


def _pb_map(values: list) -> dict:
    """map<string,string> entries (key=1, value=2)."""
    out = {}
    for entry in values:
        f = _pb_fields(entry)
        out[_pb_str(f, 1) or ""] = _pb_str(f, 2) or ""
    return out


def _csr_from_protobuf(data: bytes) -> dict:
    """A protobuf-encoded CertificateSigningRequest (runtime.Unknown envelope)
    -> its JSON form (metadata subset, spec, status)."""
    envelope = _pb_fields(data[len(K8S_PROTOBUF_MAGIC) :])
    type_meta = _pb_fields(envelope.get(1, [b""])[-1])
    obj = _pb_fields(envelope.get(2, [b""])[-1])
    m = _pb_fields(obj.get(1, [b""])[-1])
    meta = {
        k: _pb_str(m, n)
        for k, n in (
            ("name", 1),
            ("generateName", 2),
            ("uid", 5),
            ("resourceVersion", 6),
        )
        if _pb_str(m, n)
    }
    if 8 in m and _pb_time(m[8][-1]):
        meta["creationTimestamp"] = _pb_time(m[8][-1])
    if 11 in m:
        meta["labels"] = _pb_map(m[11])
    if 12 in m:
        meta["annotations"] = _pb_map(m[12])
    if 14 in m:
        meta["finalizers"] = [v.decode() for v in m[14]]
    s = _pb_fields(obj.get(2, [b""])[-1])
    spec: dict = {}
    if 1 in s:
        spec["request"] = base64.b64encode(s[1][-1]).decode()
    for key, num in (("signerName", 7), ("username", 2), ("uid", 3)):
        if _pb_str(s, num):
            spec[key] = _pb_str(s, num)
    if 8 in s:
        spec["expirationSeconds"] = s[8][-1] - (1 << 64 if s[8][-1] >> 63 else 0)
    for key, num in (("usages", 5), ("groups", 4)):
        if num in s:
            spec[key] = [v.decode() for v in s[num]]
    st = _pb_fields(obj.get(3, [b""])[-1])
    status: dict = {}
    conditions = []
    for raw in st.get(1, []):
        c = _pb_fields(raw)
        cond = {
            k: _pb_str(c, n) or ""
            for k, n in (("type", 1), ("status", 6), ("reason", 2), ("message", 3))
        }
        for k, n in (("lastUpdateTime", 4), ("lastTransitionTime", 5)):
            if n in c and _pb_time(c[n][-1]):
                cond[k] = _pb_time(c[n][-1])
        conditions.append(cond)
    if conditions:
        status["conditions"] = conditions
    if 2 in st:
        status["certificate"] = base64.b64encode(st[2][-1]).decode()
    return {
        "apiVersion": _pb_str(type_meta, 1) or CSR_GV,
        "kind": _pb_str(type_meta, 2) or CSR_KIND,
        "metadata": meta,
        "spec": spec,
        "status": status,
    }


# --------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------
def route_certificates(h, fake, parts: list) -> None:
    """Route /apis/certificates.k8s.io[/v1[/certificatesigningrequests[/NAME[/SUB]]]]."""
    if getattr(fake, "csrs", None) is None:  # install() not called
        return h.send_status(
            404, "NotFound", "the server could not find the requested resource"
        )
    read = h.command in ("GET", "HEAD")
    rest = parts[3:]
    if len(parts) == 2 and read:
        return h.send_json(
            200, dict(apis_group_entry(), kind="APIGroup", apiVersion="v1")
        )
    if parts[2:3] != ["v1"]:
        return h.send_status(
            404, "NotFound", "the server could not find the requested resource"
        )
    if not rest and read:
        return h.send_json(200, _csr_resource_list())
    if not rest or rest[0] != CSR_RESOURCE or len(rest) > 3:
        return h.send_status(
            404, "NotFound", "the server could not find the requested resource"
        )
    name, sub = (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
    verb, named = csr_request_verb(h, name)
    resource = CSR_RESOURCE + (f"/{sub}" if sub else "")
    if not authorize(h, fake, verb, CSR_GROUP, resource, named):
        return
    if len(rest) == 1:
        if h.command == "POST":
            return _csr_create(h, fake)
        if read:
            return _csr_watch(h, fake) if _is_watch(h) else _csr_list(h, fake)
        return _method_not_allowed(h)
    if sub not in ("", "approval", "status"):
        return h.send_status(
            404, "NotFound", "the server could not find the requested resource"
        )
    with fake.state.cond:
        obj = copy.deepcopy(fake.csrs.get(name))
    if obj is None:
        return _csr_not_found(h, name)
    if read:
        if h.wants_table():
            return h.send_json(
                200, _csr_table([obj], obj["metadata"]["resourceVersion"])
            )
        return h.send_json(200, obj)
    if h.command == "DELETE" and not sub:
        return _csr_delete(h, fake, name)
    if h.command in ("PUT", "PATCH"):
        if sub == "approval" and not signer_approval_allowed(h, fake, obj):
            return
        return _csr_update(h, fake, name, sub, obj)
    _method_not_allowed(h)


def _method_not_allowed(h) -> None:
    """405 MethodNotAllowed Status."""
    h.send_status(405, "MethodNotAllowed", "the server does not allow this method")


def _csr_not_found(h, name: str) -> None:
    """404 NotFound Status, worded like the apiserver."""
    h.send_status(
        404,
        "NotFound",
        f'{CSR_QUALIFIED} "{name}" not found',
        {"name": name, "group": CSR_GROUP, "kind": CSR_RESOURCE},
    )


# --------------------------------------------------------------------------
# Create
# --------------------------------------------------------------------------
class _FieldError(Exception):
    """One apimachinery field.Error (reason, field, message body)."""

    def __init__(self, reason: str, field: str, body: str):
        super().__init__(f"{field}: {body}")
        self.reason, self.field, self.body = reason, field, body


def _invalid(field: str, value, detail: str) -> _FieldError:
    """field.Invalid."""
    return _FieldError(
        "FieldValueInvalid", field, f"Invalid value: {_go_value(value)}: {detail}"
    )


def _required(field: str, detail: str = "") -> _FieldError:
    """field.Required."""
    return _FieldError(
        "FieldValueRequired",
        field,
        "Required value" + (f": {detail}" if detail else ""),
    )


def _not_supported(field: str, value, supported) -> _FieldError:
    """field.NotSupported."""
    quoted = ", ".join(json.dumps(s) for s in supported)
    return _FieldError(
        "FieldValueNotSupported",
        field,
        f"Unsupported value: {json.dumps(value)}: supported values: {quoted}",
    )


def _go_value(value) -> str:
    """Render a value as apimachinery's field.Error does (%#v for []byte)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (bytes, bytearray)):
        return "[]byte{" + ", ".join(f"0x{b:x}" for b in value) + "}"
    return json.dumps(value, separators=(",", ":"))


def _send_invalid(h, name: str, errors: list) -> None:
    """422 Invalid Status (apierrors.NewInvalid)."""
    msgs = [str(e) for e in errors]
    agg = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    h.send_status(
        422,
        "Invalid",
        f'{CSR_KIND}.{CSR_GROUP} "{name}" is invalid: {agg}',
        {
            "name": name,
            "group": CSR_GROUP,
            "kind": CSR_KIND,
            "causes": [
                {"reason": e.reason, "message": e.body, "field": e.field}
                for e in errors
            ],
        },
    )


def _peer_identity(h) -> tuple:
    """(username, groups) that kube-apiserver derives from the client certificate."""
    der = h.request.getpeercert(binary_form=True)
    if not der:
        return "system:anonymous", ["system:unauthenticated"]
    subject = x509.load_der_x509_certificate(der).subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return (cns[0].value if cns else ""), orgs + ["system:authenticated"]


def _parse_csr_pem(pem: bytes) -> x509.CertificateSigningRequest:
    """certificates.ParseCSR + CheckSignature; ValueError with Go's wording."""
    begin = pem.find(b"-----BEGIN ")
    if begin < 0 or not pem[begin:].startswith(b"-----BEGIN CERTIFICATE REQUEST-----"):
        raise ValueError("PEM block type must be CERTIFICATE REQUEST")
    try:
        req = x509.load_pem_x509_csr(pem[begin:])
        key = req.public_key()
    except ValueError as exc:
        raise ValueError(f"x509: malformed certificate request ({exc})") from None
    if not req.is_signature_valid:
        if isinstance(key, rsa.RSAPublicKey):
            raise ValueError("crypto/rsa: verification error")
        if isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("x509: ECDSA verification failure")
        if isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError("x509: Ed25519 verification failure")
        raise ValueError("x509: signature verification failure")
    return req


def _client_usage_error(usages: list) -> str | None:
    """The kube-apiserver-client signer's usage check (None when fine)."""
    for usage in usages:
        if usage != "client auth" and usage not in CSR_CLIENT_OPTIONAL_USAGES:
            return f"invalid usage for client certificate: {usage}"
    if "client auth" not in usages:
        return "missing required usage for client certificate: client auth"
    return None


def _validate_csr(fake, body: dict) -> tuple:
    """Strategy validation of a new CSR; returns (errors, x509 request or None)."""
    errors: list = []
    spec = body.get("spec") or {}
    req = None
    raw = spec.get("request")
    if not raw:
        errors.append(_required("spec.request"))
    else:
        pem = base64.b64decode(raw)
        try:
            req = _parse_csr_pem(pem)
        except ValueError as exc:
            errors.append(_invalid("spec.request", pem, str(exc)))
    usages = spec.get("usages") or []
    if not usages:
        errors.append(_required("spec.usages"))
    seen = set()
    for i, usage in enumerate(usages):
        if usage not in CSR_KNOWN_USAGES:
            errors.append(_not_supported(f"spec.usages[{i}]", usage, CSR_KNOWN_USAGES))
        elif usage in seen:
            errors.append(
                _FieldError(
                    "FieldValueDuplicate",
                    f"spec.usages[{i}]",
                    f"Duplicate value: {json.dumps(usage)}",
                )
            )
        seen.add(usage)
    signer = spec.get("signerName") or ""
    if not signer:
        errors.append(_required("spec.signerName"))
    elif (
        signer.count("/") < 1
        or signer.startswith("/")
        or "." not in signer.split("/")[0]
    ):
        errors.append(
            _invalid(
                "spec.signerName",
                signer,
                "should be a domain with at least two segments separated by dots",
            )
        )
    exp = spec.get("expirationSeconds")
    if exp is not None and exp < CSR_MIN_EXPIRATION:
        errors.append(
            _invalid(
                "spec.expirationSeconds",
                exp,
                "may not specify a duration less than 600 seconds (10 minutes)",
            )
        )
    if (
        getattr(fake, "csr_usage_check", "signer") == "create"
        and signer == KUBE_APISERVER_CLIENT_SIGNER
        and usages
        and not errors
    ):
        problem = _client_usage_error(usages)
        if problem:
            errors.append(_invalid("spec.usages", usages, problem))
    return errors, req


def _decode_body(h, kind_expected: bool = True):
    """JSON (or Kubernetes protobuf) body -> dict, or None after sending 400."""
    try:
        if h.body.startswith(K8S_PROTOBUF_MAGIC):
            body = _csr_from_protobuf(h.body)
        else:
            body = json.loads(h.body or b"{}")
        if not isinstance(body, dict):
            raise TypeError("not an object")
        meta = body.setdefault("metadata", {})
        body.setdefault("spec", {})
        if not isinstance(meta, dict) or not isinstance(body["spec"], dict):
            raise TypeError("metadata/spec must be objects")
        req = body["spec"].get("request")
        if req is not None:
            base64.b64decode(req, validate=True)
        exp = body["spec"].get("expirationSeconds")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int)):
            raise ValueError("spec.expirationSeconds: expected an integer")
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        h.send_status(
            400,
            "BadRequest",
            f'{CSR_KIND} in version "v1" cannot be handled as a {CSR_KIND}: {exc}',
        )
        return None
    if kind_expected and (
        body.get("kind", CSR_KIND) != CSR_KIND
        or body.get("apiVersion", CSR_GV) != CSR_GV
    ):
        h.send_status(
            400,
            "BadRequest",
            f"the API version in the data ({body.get('apiVersion')}) does not match "
            f"the expected API version ({CSR_GV})",
        )
        return None
    return body


def _csr_create(h, fake) -> None:
    """POST a CertificateSigningRequest: validate, admit, store; 201."""
    body = _decode_body(h)
    if body is None:
        return
    meta = body["metadata"]
    name = meta.get("name") or ""
    if not name and meta.get("generateName"):
        name = meta["generateName"] + "".join(
            random.choice(_NAME_SUFFIX_ALPHABET) for _ in range(5)
        )
    if not name:
        return _send_invalid(
            h, "", [_required("metadata.name", "name or generateName is required")]
        )
    if name in (".", "..") or "/" in name or "%" in name:
        return _send_invalid(
            h, name, [_invalid("metadata.name", name, "may not contain '/' or '%'")]
        )
    errors, req = _validate_csr(fake, body)
    if errors:
        return _send_invalid(h, name, errors)
    spec = body["spec"]
    if spec["signerName"] == KUBE_APISERVER_CLIENT_SIGNER:  # admission
        orgs = req.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if any(a.value == SYSTEM_MASTERS for a in orgs):
            return h.send_status(
                403,
                "Forbidden",
                f'{CSR_QUALIFIED} "{name}" is forbidden: use of '
                f"{KUBE_APISERVER_CLIENT_SIGNER} signer with {SYSTEM_MASTERS} group "
                "is not allowed",
                {"name": name, "group": CSR_GROUP, "kind": CSR_RESOURCE},
            )
    username, groups = _peer_identity(h)
    for key in ("uid", "extra", "username", "groups"):
        spec.pop(key, None)
    spec["username"], spec["groups"] = username, groups
    now = time.time()
    obj_meta = {
        k: v
        for k, v in meta.items()
        if k in ("labels", "annotations", "finalizers", "generateName")
    }
    obj_meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_ts(now))
    obj = {
        "kind": CSR_KIND,
        "apiVersion": CSR_GV,
        "metadata": obj_meta,
        "spec": spec,
        "status": {},
    }
    with fake.state.cond:
        if name in fake.csrs:
            return h.send_status(
                409,
                "AlreadyExists",
                f'{CSR_QUALIFIED} "{name}" already exists',
                {"name": name, "group": CSR_GROUP, "kind": CSR_RESOURCE},
            )
        _csr_store(fake, obj, "ADDED")
        obj = copy.deepcopy(obj)
    h.send_json(201, obj)


def _csr_store(fake, obj: dict, etype: str) -> None:
    """Store obj with a new resourceVersion and record a watch event
    (caller holds fake.state.cond)."""
    obj["metadata"]["resourceVersion"] = str(fake.state._next_rv())
    name = obj["metadata"]["name"]
    if etype == "DELETED":
        fake.csrs.pop(name, None)
    else:
        fake.csrs[name] = obj
    fake.csr_events.append((fake.state.rv, etype, copy.deepcopy(obj)))
    fake.state.cond.notify_all()


# --------------------------------------------------------------------------
# List, watch, delete
# --------------------------------------------------------------------------
def _csr_selected(h, obj: dict) -> bool:
    """fieldSelector / labelSelector filter."""
    return _field_match(obj, h.query.get("fieldSelector", "")) and _label_match(
        obj, h.query.get("labelSelector", "")
    )


def _csr_list(h, fake) -> None:
    """GET the collection (CertificateSigningRequestList or Table)."""
    with fake.state.cond:
        rv = str(fake.state.rv)
        objs = [copy.deepcopy(o) for _, o in sorted(fake.csrs.items())]
    objs = [o for o in objs if _csr_selected(h, o)]
    if h.wants_table():
        return h.send_json(200, _csr_table(objs, rv))
    h.send_json(
        200,
        {
            "kind": "CertificateSigningRequestList",
            "apiVersion": CSR_GV,
            "metadata": {"resourceVersion": rv},
            "items": objs,
        },
    )


def _csr_watch_line(h, etype: str, obj: dict) -> bytes:
    """One watch event line (a Table row when a Table was asked for)."""
    if h.wants_table():
        obj = _csr_table([obj], obj["metadata"]["resourceVersion"])
    return (
        json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode()
        + b"\n"
    )


def _csr_watch(h, fake) -> None:
    """Chunked watch: initial ADDED (no/zero resourceVersion), then live events."""
    state = fake.state
    start_rv = h.query.get("resourceVersion", "")
    with state.cond:
        if start_rv in ("", "0"):
            initial = [copy.deepcopy(o) for _, o in sorted(fake.csrs.items())]
            last = state.rv
        else:
            initial, last = [], int(start_rv)
    h.start_chunked("application/json")
    for obj in initial:
        if _csr_selected(h, obj):
            h.write_chunk(_csr_watch_line(h, "ADDED", obj))
    deadline = _watch_deadline(h)
    while True:
        with state.cond:
            state.cond.wait_for(
                lambda last=last: (
                    state.stopped
                    or (fake.csr_events and fake.csr_events[-1][0] > last)
                    or time.monotonic() >= deadline
                ),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if state.stopped or time.monotonic() >= deadline:
                break
            events = [e for e in fake.csr_events if e[0] > last]
            last = events[-1][0] if events else last
        for _, etype, obj in events:
            if _csr_selected(h, obj):
                h.write_chunk(_csr_watch_line(h, etype, obj))
    h.end_chunked()


def _csr_delete(h, fake, name: str) -> None:
    """DELETE one CSR; answers a Success Status as the apiserver does."""
    with fake.state.cond:
        obj = fake.csrs.get(name)
        if obj is None:
            return _csr_not_found(h, name)
        _csr_store(fake, obj, "DELETED")
    h.send_json(
        200,
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": CSR_GROUP,
                "kind": CSR_RESOURCE,
                "uid": obj["metadata"]["uid"],
            },
        },
    )


# --------------------------------------------------------------------------
# Update: main resource (metadata only), /approval (conditions), /status
# --------------------------------------------------------------------------
def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch (also used for strategic merge patches,
    which is equivalent for the metadata maps and condition lists here)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _conflict(h, name: str) -> None:
    """409 Conflict (stale resourceVersion)."""
    h.send_status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {CSR_QUALIFIED} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        {"name": name, "group": CSR_GROUP, "kind": CSR_RESOURCE},
    )


def _has_condition(obj: dict, ctype: str) -> bool:
    """True when status.conditions has a condition of this type."""
    return any(c.get("type") == ctype for c in obj["status"].get("conditions") or [])


def _validate_conditions(old: dict, new_conditions: list, sub: str) -> list:
    """validateConditions + the approval/status update rules."""
    errors, seen = [], set()
    for i, cond in enumerate(new_conditions):
        ctype, status = cond.get("type", ""), cond.get("status", "")
        if not ctype:
            errors.append(_required(f"status.conditions[{i}].type"))
        elif ctype in seen:
            errors.append(
                _FieldError(
                    "FieldValueDuplicate",
                    f"status.conditions[{i}].type",
                    f"Duplicate value: {json.dumps(ctype)}",
                )
            )
        seen.add(ctype)
        allowed = (
            ["True"]
            if ctype in ("Approved", "Denied", "Failed")
            else [
                "False",
                "True",
                "Unknown",
            ]
        )
        if status not in allowed:
            errors.append(
                _not_supported(f"status.conditions[{i}].status", status, allowed)
            )
    if "Approved" in seen and "Denied" in seen:
        errors.append(
            _invalid(
                "status.conditions",
                [c.get("type") for c in new_conditions],
                "Approved and Denied conditions are mutually exclusive",
            )
        )
    for ctype in ("Approved", "Denied"):
        had = _has_condition(old, ctype)
        if had and ctype not in seen:
            errors.append(
                _FieldError(
                    "FieldValueForbidden",
                    "status.conditions",
                    f"Forbidden: updates may not remove a condition of type {json.dumps(ctype)}",
                )
            )
        if sub == "status" and not had and ctype in seen:
            errors.append(
                _FieldError(
                    "FieldValueForbidden",
                    "status.conditions",
                    f"Forbidden: updates may not add a condition of type {json.dumps(ctype)}",
                )
            )
    return errors


def _csr_update(h, fake, name: str, sub: str, current: dict) -> None:
    """PUT/PATCH the object, its approval or its status subresource."""
    if h.command == "PATCH":
        try:
            patch = json.loads(h.body or b"{}")
        except ValueError as exc:
            return h.send_status(400, "BadRequest", f"invalid patch: {exc}")
        if not isinstance(patch, dict):  # JSON patch (list) is not supported here
            return h.send_status(
                415, "UnsupportedMediaType", "only merge patches are supported"
            )
        body = _merge_patch(current, patch)
    else:
        body = _decode_body(h)
        if body is None:
            return
    body.setdefault("status", {})
    rv = (body.get("metadata") or {}).get("resourceVersion")
    with fake.state.cond:
        old = fake.csrs.get(name)
        if old is None:
            return _csr_not_found(h, name)
        if rv and rv != old["metadata"]["resourceVersion"]:
            return _conflict(h, name)
        obj = copy.deepcopy(old)
        new_status = body.get("status") or {}
        if sub in ("approval", "status"):
            conditions = copy.deepcopy(new_status.get("conditions") or [])
            errors = _validate_conditions(old, conditions, sub)
            new_cert = new_status.get("certificate")
            if sub == "status" and new_cert:
                old_cert = old["status"].get("certificate")
                if old_cert and old_cert != new_cert:
                    errors.append(
                        _FieldError(
                            "FieldValueForbidden",
                            "status.certificate",
                            "Forbidden: updates may not modify existing certificate content",
                        )
                    )
                else:
                    try:
                        x509.load_pem_x509_certificates(base64.b64decode(new_cert))
                    except ValueError as exc:
                        errors.append(
                            _invalid(
                                "status.certificate", "<certificate data>", str(exc)
                            )
                        )
            if errors:
                return _send_invalid(h, name, errors)
            now = _ts(time.time())
            for cond in conditions:  # populateConditionTimestamps
                cond["lastUpdateTime"] = cond.get("lastUpdateTime") or now
                cond["lastTransitionTime"] = cond.get("lastTransitionTime") or now
            if conditions:
                obj["status"]["conditions"] = conditions
            else:
                obj["status"].pop("conditions", None)
            if sub == "status" and new_cert:
                obj["status"]["certificate"] = new_cert
        else:  # main resource: only labels/annotations/finalizers change
            new_meta = body.get("metadata") or {}
            for key in ("labels", "annotations", "finalizers"):
                if new_meta.get(key):
                    obj["metadata"][key] = new_meta[key]
                else:
                    obj["metadata"].pop(key, None)
        _csr_store(fake, obj, "MODIFIED")
        obj = copy.deepcopy(obj)
    if sub == "approval":  # the response shows the pre-signing object, like a
        _csr_kick_signer(fake, name)  # real cluster; delay 0 signs before it
    h.send_json(200, obj)


# --------------------------------------------------------------------------
# The signing controller
# --------------------------------------------------------------------------
def _csr_kick_signer(fake, name: str) -> None:
    """Issue the certificate now (delay 0) or from a thread after csr_sign_delay."""
    delay = float(getattr(fake, "csr_sign_delay", 0) or 0)
    with fake.state.cond:
        obj = fake.csrs.get(name)
        uid = obj["metadata"]["uid"] if obj else None
    if uid is None:
        return
    if delay <= 0:
        return _csr_sign(fake, name, uid)

    def later():
        if not fake._stop_event.wait(delay):
            _csr_sign(fake, name, uid)

    t = threading.Thread(target=later, name=f"csr-signer-{name}", daemon=True)
    fake._track_thread(t)
    t.start()


def _csr_signable(obj: dict | None, uid: str) -> bool:
    """Approved, not denied/failed, not yet issued, same object."""
    return (
        obj is not None
        and obj["metadata"]["uid"] == uid
        and _has_condition(obj, "Approved")
        and not _has_condition(obj, "Denied")
        and not _has_condition(obj, "Failed")
        and not obj["status"].get("certificate")
    )


def _csr_sign(fake, name: str, uid: str) -> None:
    """What the csrsigning controller does for kubernetes.io/kube-apiserver-client."""
    with fake.state.cond:
        obj = copy.deepcopy(fake.csrs.get(name))
    if not _csr_signable(obj, uid):
        return
    spec = obj["spec"]
    if spec.get("signerName") != KUBE_APISERVER_CLIENT_SIGNER:
        return  # another signer's business: stays approved, never issued
    req = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    failure = _client_usage_error(spec.get("usages") or [])
    pem = None
    if failure is None:
        try:
            override = getattr(fake, "csr_issue_override", None)
            pem = override(obj, req) if override else issue_client_cert(fake, obj, req)
            pem = _as_bytes(pem)
        except Exception as exc:  # noqa: BLE001 - surfaced as a Failed condition
            failure = f"error signing certificate: {exc}"
    with fake.state.cond:
        current = fake.csrs.get(name)
        if not _csr_signable(current, uid):
            return
        if failure is not None:
            now = _ts(time.time())
            current["status"].setdefault("conditions", []).append(
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "SignerValidationFailure",
                    "message": failure,
                    "lastUpdateTime": now,
                    "lastTransitionTime": now,
                }
            )
        else:
            current["status"]["certificate"] = base64.b64encode(pem).decode()
        _csr_store(fake, current, "MODIFIED")


def issue_client_cert(fake, obj: dict, req: x509.CertificateSigningRequest) -> bytes:
    """Sign req with the client CA: CSR subject, SANs and key; clientAuth;
    validity now-1min .. now+min(expirationSeconds, 1y) (capped at the CA's end)."""
    ca_cert, ca_key = fake.csr_signer
    spec = obj["spec"]
    now = datetime.datetime.now(datetime.timezone.utc)
    seconds = min(
        int(spec.get("expirationSeconds") or CSR_MAX_DURATION), CSR_MAX_DURATION
    )
    not_after = min(
        now + datetime.timedelta(seconds=seconds), ca_cert.not_valid_after_utc
    )
    usages = spec.get("usages") or []
    builder = (
        x509.CertificateBuilder()
        .subject_name(req.subject)
        .issuer_name(ca_cert.subject)
        .public_key(req.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CSR_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
    )
    if any(u in usages for u in CSR_CLIENT_OPTIONAL_USAGES):
        builder = builder.add_extension(
            x509.KeyUsage(
                "digital signature" in usages,
                False,
                "key encipherment" in usages,
                False,
                False,
                False,
                False,
                False,
                False,
            ),
            critical=True,
        )
    try:
        sans = req.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(sans.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    algo = (
        None
        if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
        else hashes.SHA256()
    )
    cert = builder.sign(ca_key, algo)
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------
# Table output (kubectl get csr)
# --------------------------------------------------------------------------
def _human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _csr_condition_text(obj: dict) -> str:
    """The CONDITION column: Approved/Denied/Failed[,Issued] or Pending."""
    types = [c.get("type") for c in obj["status"].get("conditions") or []]
    parts = [t for t in ("Approved", "Denied", "Failed") if t in types]
    if obj["status"].get("certificate"):
        parts.append("Issued")
    return ",".join(parts) if parts else "Pending"


def _csr_table(objs: list, rv: str) -> dict:
    """meta.k8s.io/v1 Table with the apiserver's CSR columns."""
    defs = [
        {"name": n, "type": t, "format": f, "description": n, "priority": 0}
        for n, t, f in CSR_TABLE_COLUMNS
    ]
    rows = []
    for o in objs:
        exp = o["spec"].get("expirationSeconds")
        rows.append(
            {
                "cells": [
                    o["metadata"]["name"],
                    _human_duration(
                        time.time() - _parse_ts(o["metadata"]["creationTimestamp"])
                    ),
                    o["spec"].get("signerName", ""),
                    o["spec"].get("username", ""),
                    _human_duration(exp) if exp else "<none>",
                    _csr_condition_text(o),
                ],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }


def _as_bytes(data) -> bytes:
    """str or bytes -> bytes."""
    return data.encode() if isinstance(data, str) else bytes(data)


# =============================================================================
# M3. The PC/SC rig: pcscd with vpcd readers; the cards factory puts virtual cards in
# and takes them out
# =============================================================================


def vpcd_driver() -> Path:
    """Where the vsmartcard-vpcd package put its PC/SC driver."""
    listing = subprocess.run(
        ["dpkg", "-L", "vsmartcard-vpcd"], capture_output=True, text=True, check=True
    ).stdout.split()
    return Path(next(p for p in listing if p.endswith("/libifdvpcd.so")))


YUBIKEY_READER = "Yubico YubiKey OTP+FIDO+CCID"
OTHER_READER = "Generic Smart Card Reader"


def free_port_pair() -> int:
    """A port P with P and P+1 free on loopback (vpcd listens on both)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports on loopback")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def pcsc_readers() -> dict[str, bool]:
    """{reader name: card present} as pcscd sees it now."""
    context = yk.PcscContext()
    try:
        return {name: context.card_present(name) for name in context.readers()}
    finally:
        context.close()


def pcscd_alive() -> bool:
    try:
        yk.PcscContext().close()
    except yk.CardError:
        return False
    return True


class PcscRig:
    """pcscd with two vpcd entries: a YubiKey-named one (readers '... 00 00' and
    '... 00 01') and a generic one (a copy of the driver, as pcscd needs)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.yubikey_port = free_port_pair()
        self.other_port = free_port_pair()
        self.process: subprocess.Popen | None = None

    def reader(self, index: int = 0, generic: bool = False) -> str:
        return f"{OTHER_READER if generic else YUBIKEY_READER} 00 {index:02d}"

    def port(self, index: int = 0, generic: bool = False) -> int:
        return (self.other_port if generic else self.yubikey_port) + index

    def start(self) -> None:
        if pcscd_alive():
            raise RuntimeError("another pcscd is running: stop it before the tests")
        confdir = self.workdir / "reader.conf.d"
        confdir.mkdir(exist_ok=True)
        driver_copy = self.workdir / "libifdvpcd-copy.so"
        driver = vpcd_driver()
        shutil.copy(driver, driver_copy)
        for name, port, lib in (
            (YUBIKEY_READER, self.yubikey_port, driver),
            (OTHER_READER, self.other_port, driver_copy),
        ):
            (confdir / name.split()[0].lower()).write_text(
                f'FRIENDLYNAME "{name}"\nDEVICENAME /dev/null:{port}\n'
                f"LIBPATH {lib}\nCHANNELID {port}\n"
            )
        log = open(self.workdir / "pcscd.log", "wb")
        self.process = subprocess.Popen(
            ["pcscd", "-f", "-c", str(confdir)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_until(
            lambda: len(self._safe_readers()) == 4, 20, "pcscd and its 4 readers"
        )

    def _safe_readers(self) -> dict[str, bool]:
        if self.process and self.process.poll() is not None:
            log = (self.workdir / "pcscd.log").read_text(errors="replace")
            raise RuntimeError(
                f"pcscd exited with {self.process.returncode}: {log[-2000:]}"
            )
        try:
            return pcsc_readers()
        except yk.CardError:
            return {}

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def insert(
        self, piv: VirtualPiv, index: int = 0, generic: bool = False
    ) -> VpcdCard:
        card = VpcdCard(piv, self.port(index, generic))
        card.insert()
        name = self.reader(index, generic)
        wait_until(lambda: pcsc_readers().get(name), 10, f"card in {name!r}")
        return card

    def remove(self, card: VpcdCard, index: int = 0, generic: bool = False) -> None:
        card.remove()
        name = self.reader(index, generic)
        wait_until(lambda: not pcsc_readers().get(name), 10, f"{name!r} to be empty")


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    rig = PcscRig(tmp_path_factory.mktemp("pcsc"))
    rig.start()
    yield rig
    rig.stop()


@pytest.fixture
def card57(cards):
    """A YubiKey 5.7 (AES-192 management key) in the first YubiKey reader."""
    return cards(
        VirtualPiv(version=(5, 7, 1), serial=31000001, mgmt_algorithm=0x0A)
    ).piv


@pytest.fixture
def card54(cards):
    """An older YubiKey 5.4 (3DES management key) in the first YubiKey reader."""
    return cards(
        VirtualPiv(version=(5, 4, 3), serial=21000002, mgmt_algorithm=0x03)
    ).piv


class InsertedCard:
    """A virtual card in one of the rig's readers, to pull out and put back (in
    the same or another reader) as a user would."""

    def __init__(self, rig: PcscRig, piv: VirtualPiv, index: int, generic: bool):
        self.rig, self.piv, self.index, self.generic = rig, piv, index, generic
        self.vpcd: VpcdCard | None = None

    @property
    def inserted(self) -> bool:
        return self.vpcd is not None and self.vpcd.inserted

    def insert(self, index: int | None = None) -> None:
        """Put the card in (into reader ``index`` when given) and wait for pcscd."""
        self.remove()
        self.index = self.index if index is None else index
        self.vpcd = self.rig.insert(self.piv, self.index, self.generic)

    def remove(self, wait: bool = True) -> None:
        """Pull the card out and wait until pcscd sees the reader empty; with
        ``wait=False`` nothing waits (the next insert or the teardown does)."""
        if self.vpcd is not None and not wait:
            self.vpcd.remove()
        elif self.vpcd is not None:
            self.rig.remove(self.vpcd, self.index, self.generic)
            self.vpcd = None


@pytest.fixture
def cards(rig):
    """Factory: ``cards(piv, index=0, generic=False)`` inserts a virtual card and
    returns its InsertedCard; every card still in is removed at teardown."""
    with contextlib.ExitStack() as teardown:

        def insert(piv: VirtualPiv, index: int = 0, generic: bool = False):
            card = InsertedCard(rig, piv, index, generic)
            card.insert()
            teardown.callback(card.remove)
            return card

        yield insert


@pytest.fixture
def card52(rig):
    """A YubiKey 5.2: no GET METADATA, but ATTEST for keys generated on it."""
    piv = VirtualPiv(version=(5, 2, 7), serial=21000052, mgmt_algorithm=0x03)
    inserted = rig.insert(piv)
    yield piv
    rig.remove(inserted)


# =============================================================================
# M4. A small PKI and kubeconfigs like k3s's and kubeadm's
# =============================================================================


NOW = datetime.datetime.now(datetime.timezone.utc)


def new_key(kind: str):
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, int(kind.removeprefix("rsa")))


def make_cert(
    subject_key,
    issuer_key,
    subject: str,
    issuer: str,
    *,
    ca=False,
    days=365,
    start_days=-1,
    sans=(),
):
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(x509.Name.from_rfc4514_string(issuer))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=start_days))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    algorithm = (
        None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    )
    return builder.sign(issuer_key, algorithm)


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclasses.dataclass
class Identity:
    ca_key: object
    ca_cert: x509.Certificate
    key: object
    cert: x509.Certificate


def make_identity(
    kind: str = "p256",
    days: int = 365,
    subject: str = "CN=system:admin,O=system:masters",
) -> Identity:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = make_cert(
        ca_key, ca_key, "CN=k3s-client-ca", "CN=k3s-client-ca", ca=True, days=3650
    )
    key = new_key(kind)
    start = -1 if days > 0 else days - 30
    cert = make_cert(
        key, ca_key, subject, "CN=k3s-client-ca", days=days, start_days=start
    )
    return Identity(ca_key, ca_cert, key, cert)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(
    path: Path,
    ident: Identity,
    *,
    inline: bool = True,
    namespace: str | None = "team-a",
    user: dict | None = None,
    server: str = "https://127.0.0.1:6443",
    extra_cluster=None,
) -> Path:
    """A kubeconfig with one context 'default' (k3s style when inline, kubeadm-like
    file paths relative to the kubeconfig's folder otherwise)."""
    if user is None:
        if inline:
            user = {
                "client-certificate-data": b64(pem(ident.cert)),
                "client-key-data": b64(pem(ident.key)),
            }
        else:
            (path.parent / "pki").mkdir(exist_ok=True)
            (path.parent / "pki" / "admin.crt").write_bytes(pem(ident.cert))
            (path.parent / "pki" / "admin.key").write_bytes(pem(ident.key))
            user = {
                "client-certificate": "pki/admin.crt",
                "client-key": "pki/admin.key",
            }
    cluster = {
        "server": server,
        "certificate-authority-data": b64(pem(ident.ca_cert)),
        **(extra_cluster or {}),
    }
    context = {"cluster": "default", "user": "default"}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default", "cluster": cluster}],
        "contexts": [{"name": "default", "context": context}],
        "current-context": "default",
        "users": [{"name": "default", "user": user}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(*argv: str, capsys=None) -> tuple[int, str, str]:
    """main() in-process; returns (exit code, stdout, stderr)."""
    code = yk.main(list(argv))
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


# =============================================================================
# M5. Clusters, proxies and clients: the clusters and proxies factories, kubectl, a
# local client, the fault figures
# =============================================================================


@dataclasses.dataclass
class Cluster:
    """A test API server and the kubeconfig that reaches it with a client key."""

    api: FakeApiServer
    ident: Identity
    kubeconfig: Path
    server_ca: x509.Certificate


def make_server_pki(names=("localhost",), ips=("127.0.0.1",), days=365):
    ca_key = new_key("p256")
    ca = make_cert(
        ca_key, ca_key, "CN=k3s-server-ca", "CN=k3s-server-ca", ca=True, days=3650
    )
    key = new_key("p256")
    sans = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(i)) for i in ips
    ]
    start = -1 if days > 0 else days - 30
    cert = make_cert(
        key,
        ca_key,
        "CN=k3s",
        "CN=k3s-server-ca",
        sans=sans,
        days=days,
        start_days=start,
    )
    return ca, cert, key


def start_cluster(
    tmp_path: Path,
    kind: str = "p256",
    tls_versions=("1.2", "1.3"),
    path_prefix: str = "",
    server_pki=None,
    subject: str = "CN=system:admin,O=system:masters",
    **cluster_extra,
) -> Cluster:
    ident = make_identity(kind, subject=subject)
    server_ca, server_cert, server_key = server_pki or make_server_pki()
    api = FakeApiServer(
        server_cert_pem=pem(server_cert),
        server_key_pem=pem(server_key),
        client_ca_pem=pem(ident.ca_cert),
        tls_versions=tls_versions,
        path_prefix=path_prefix,
        git_version="v1.32.0",
    )
    api.start()
    path = write_kubeconfig(
        tmp_path / "cluster.yaml",
        ident,
        server=f"https://127.0.0.1:{api.port}{path_prefix}",
        extra_cluster=cluster_extra,
    )
    doc = yaml.safe_load(path.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = b64(pem(server_ca))
    path.write_text(yaml.safe_dump(doc))
    return Cluster(api, ident, path, server_ca)


class ProxyProcess:
    """`yubikey-kube-proxy proxy` as a user runs it, on a free loopback port."""

    def __init__(self, workdir: Path, *extra: str, env=None) -> None:
        self.workdir = workdir
        self.stderr_path = workdir / "proxy.stderr"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "yk_kube_proxy.py"),
                "proxy",
                "--kubeconfig",
                str(workdir / "proxy.yml"),
                "--listen",
                "127.0.0.1:0",
                "-v",
                *extra,
            ],
            stderr=open(self.stderr_path, "wb"),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            wait_until(
                lambda: (
                    "listening on" in self.stderr() or self.process.poll() is not None
                ),
                30,
                "the proxy to listen",
            )
            lines = self.stderr().splitlines()
            line = next((x for x in lines if "listening on" in x), "")
            if not line:
                raise AssertionError(f"proxy did not start: {self.stderr()}")
        except AssertionError:
            self.stop()  # never left running by a start that failed
            raise
        self.port = int(line.split("://127.0.0.1:")[1].split()[0])
        self.client_config = workdir / f"client-{self.port}.yml"
        doc = yaml.safe_load((workdir / "client.yml").read_text())
        server = doc["clusters"][0]["cluster"]["server"]
        doc["clusters"][0]["cluster"]["server"] = (
            server.rsplit(":", 1)[0] + f":{self.port}"
        )
        self.client_config.write_text(yaml.safe_dump(doc))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kubectl(
    proxy: ProxyProcess,
    *args: str,
    input: str | None = None,  # noqa: A002 - subprocess.run's name
    env=None,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(proxy.client_config),
            "--request-timeout",
            "30s",
            *args,
        ],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cluster(tmp_path):
    cluster = start_cluster(tmp_path)
    yield cluster
    cluster.api.stop()


def setup_and_proxy(
    cluster: Cluster, workdir: Path, *setup_extra: str, proxy_extra=()
) -> ProxyProcess:
    code = yk.main(
        [
            "setup",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--output-dir",
            str(workdir),
            *setup_extra,
        ]
    )
    assert code == 0
    return ProxyProcess(workdir, *proxy_extra)


@pytest.fixture
def proxied(card57, cluster, tmp_path, capsys):
    """kubectl -> proxy (mutual TLS on loopback) -> API server, key on the card."""
    proxy = setup_and_proxy(cluster, tmp_path / "yk")
    capsys.readouterr()
    yield proxy
    proxy.stop()


class Proxies:
    """The ``proxies`` factory: every proxy it starts is stopped at teardown."""

    def __init__(self, teardown: contextlib.ExitStack) -> None:
        self._teardown = teardown

    def __call__(self, workdir: Path, *extra: str, env=None) -> ProxyProcess:
        """``proxy --kubeconfig workdir/proxy.yml *extra`` (see ProxyProcess)."""
        return self._owned(lambda: ProxyProcess(workdir, *extra, env=env))

    def setup(
        self, cluster: Cluster, workdir: Path, *setup_extra: str, proxy_extra=()
    ) -> ProxyProcess:
        """``setup`` into workdir, then the proxy (see setup_and_proxy)."""
        return self._owned(
            lambda: setup_and_proxy(
                cluster, workdir, *setup_extra, proxy_extra=proxy_extra
            )
        )

    def _owned(self, start: Callable[[], ProxyProcess]) -> ProxyProcess:
        proxy = start()
        self._teardown.callback(proxy.stop)
        return proxy


@pytest.fixture
def proxies():
    """Factory: ``proxies(workdir, *extra)`` or ``proxies.setup(cluster, workdir,
    *setup_extra)`` starts a ProxyProcess that is stopped at teardown."""
    with contextlib.ExitStack() as teardown:
        yield Proxies(teardown)


@pytest.fixture
def clusters():
    """Factory: ``clusters(folder, **start_cluster options)`` starts a test API
    server and its kubeconfig in folder; each is stopped at teardown."""
    with contextlib.ExitStack() as teardown:

        def start(folder: Path, **options) -> Cluster:
            started = start_cluster(folder, **options)
            teardown.callback(started.api.stop)
            return started

        yield start


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def setup_args(kubeconfig: Path, out: Path, *extra: str) -> list[str]:
    return ["setup", "--kubeconfig", str(kubeconfig), "--output-dir", str(out), *extra]


FAULT_FIGURES: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def fault_figures(request):
    """Print the figures of the Go parity tests and of the fault suite (with the
    fuzz and flood tests) at the end of the run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    for title, lines in (
        ("Go parity figures", TLS_FIGURES),
        ("fault suite figures", FAULT_FIGURES),
    ):
        if lines:
            with capture.global_and_fixture_disabled():
                reporter.write_line("")
                reporter.write_sep("=", title)
                for line in lines:
                    reporter.write_line(line)


class LocalClient:
    """An HTTPS client holding the local hop's client certificate from client.yml."""

    def __init__(self, proxy: ProxyProcess) -> None:
        doc = yaml.safe_load(proxy.client_config.read_text())
        self.context = ssl.create_default_context(
            cadata=base64.b64decode(
                doc["clusters"][0]["cluster"]["certificate-authority-data"]
            ).decode()
        )
        user = doc["users"][0]["user"]
        bundle = proxy.workdir / "local-client.pem"
        bundle.write_bytes(
            base64.b64decode(user["client-certificate-data"])
            + base64.b64decode(user["client-key-data"])
        )
        self.context.load_cert_chain(bundle)
        self.port = proxy.port

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=60
        )

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def process_counts(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return (len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")))


def wait_for_counts(pid: int, baseline: tuple[int, int], timeout: float = 15) -> None:
    wait_until(
        lambda: process_counts(pid) <= baseline,
        timeout,
        f"threads and sockets back to {baseline} (now {process_counts(pid)})",
    )


# =============================================================================
# M6. Go programs from Go's standard library: a crypto/x509 verifier and a TLS server
# configured like kube-apiserver
# =============================================================================


# kubectl is a Go program: a server it accepts must work through the proxy, and a
# server it refuses must never get a card signature. The tests build two small Go
# programs from Go's standard library (Debian's golang-go): a verifier that gives
# Go's verdict on a generated corpus of chains, and a TLS server configured like
# kube-apiserver's secure serving, in front of the test API server.

GO_VERIFIER = r"""
package main

import (
	"bufio"
	"crypto/x509"
	"encoding/json"
	"os"
)

type job struct {
	Roots [][]byte `json:"roots"`
	Chain [][]byte `json:"chain"`
	Name  string   `json:"name"`
}

// verdict is what crypto/tls (so kubectl) decides: "" to accept, else Go's error.
func verdict(j job) string {
	roots := x509.NewCertPool()
	for _, der := range j.Roots {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return "root: " + err.Error()
		}
		roots.AddCert(c)
	}
	var certs []*x509.Certificate
	for _, der := range j.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return err.Error()
		}
		certs = append(certs, c)
	}
	intermediates := x509.NewCertPool()
	for _, c := range certs[1:] {
		intermediates.AddCert(c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: intermediates, DNSName: j.Name}
	if _, err := certs[0].Verify(opts); err != nil {
		return err.Error()
	}
	return ""
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<26)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var j job
		if err := json.Unmarshal(in.Bytes(), &j); err != nil {
			panic(err)
		}
		out.Encode(map[string]string{"error": verdict(j)})
	}
}
"""

GO_APISERVER = r"""
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
)

func read(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		panic(err)
	}
	return data
}

func pool(path string) *x509.CertPool {
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(read(path)) {
		panic("no certificates in " + path)
	}
	return p
}

var versions = map[uint16]string{tls.VersionTLS12: "1.2", tls.VersionTLS13: "1.3"}

func main() {
	cert := flag.String("cert", "", "serving certificate (PEM)")
	key := flag.String("key", "", "its key (PKCS#8 PEM)")
	impostor := flag.String("impostor-key", "", "serve the certificate with this other key")
	clientCA := flag.String("client-ca", "", "CA of the client certificates")
	backend := flag.String("backend", "", "URL of the test API server behind")
	backendCA := flag.String("backend-ca", "", "its CA")
	backendCert := flag.String("backend-cert", "", "our client certificate for it")
	backendKey := flag.String("backend-key", "", "its key")
	maxVersion := flag.String("max", "1.3", "highest TLS version: 1.1, 1.2 or 1.3")
	suites := flag.String("suites", "", "TLS 1.2 suites: rsa (static RSA) or ecdhe; default Go's")
	flag.Parse()

	pair, err := tls.X509KeyPair(read(*cert), read(*key))
	if err != nil {
		panic(err)
	}
	if *impostor != "" {
		block, _ := pem.Decode(read(*impostor))
		other, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			panic(err)
		}
		pair.PrivateKey = other // the genuine certificate, someone else's key
	}
	// kube-apiserver's secure serving: client certificates requested, not
	// verified by crypto/tls; its x509 authenticator checks them itself.
	config := &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequestClientCert,
		NextProtos:   []string{"h2", "http/1.1"},
		MinVersion:   tls.VersionTLS12,
		MaxVersion:   map[string]uint16{"1.1": tls.VersionTLS11, "1.2": tls.VersionTLS12, "1.3": tls.VersionTLS13}[*maxVersion],
	}
	if config.MaxVersion < tls.VersionTLS12 { // an outdated server, for a negative test
		config.MinVersion = tls.VersionTLS10
	}
	server := &http.Server{TLSConfig: config}
	switch *suites {
	case "rsa": // HTTP/2 needs ECDHE: HTTP/1.1 only
		config.CipherSuites = []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_256_GCM_SHA384}
		config.NextProtos = []string{"http/1.1"}
		server.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	case "ecdhe":
		config.CipherSuites = []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}
	}
	clients := pool(*clientCA)
	var proxy *httputil.ReverseProxy
	if *backend != "" {
		target, _ := url.Parse(*backend)
		ours, err := tls.LoadX509KeyPair(*backendCert, *backendKey)
		if err != nil {
			panic(err)
		}
		proxy = httputil.NewSingleHostReverseProxy(target)
		proxy.FlushInterval = -1
		proxy.Transport = &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool(*backendCA), Certificates: []tls.Certificate{ours},
		}}
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer := r.TLS.PeerCertificates
		intermediates := x509.NewCertPool()
		for _, c := range peer[min(1, len(peer)):] {
			intermediates.AddCert(c)
		}
		if len(peer) == 0 || proxy == nil {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		opts := x509.VerifyOptions{Roots: clients, Intermediates: intermediates,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		if _, err := peer[0].Verify(opts); err != nil {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		r.Header.Set("X-Go-Client", peer[0].Subject.String())
		r.Header.Set("X-Go-Tls", versions[r.TLS.Version])
		r.Header.Set("X-Go-Alpn", r.TLS.NegotiatedProtocol)
		r.Header.Set("X-Go-Resumed", strconv.FormatBool(r.TLS.DidResume))
		r.Header.Set("X-Go-Cipher", tls.CipherSuiteName(r.TLS.CipherSuite))
		proxy.ServeHTTP(w, r)
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Printf("listening on %d\n", listener.Addr().(*net.TCPAddr).Port)
	server.Handler = handler
	panic(server.ServeTLS(listener, "", ""))
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
"""


@pytest.fixture(scope="session")
def go_build(tmp_path_factory):
    """Builds a Go program from source, standard library only, with Go's caches
    under pytest's temporary directory; fails (never skips) without Go."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go parity tests need Go: install it with "
            "'sudo apt-get install -y golang-go' (the README's test command does)"
        )
    root = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GOCACHE": str(root / "cache"),
        "GOPATH": str(root / "path"),
        "GOTMPDIR": str(root),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "HOME": str(root),
    }
    built: dict[str, Path] = {}

    def build(name: str, source: str) -> Path:
        if name not in built:
            folder = root / name
            folder.mkdir()
            (folder / "main.go").write_text(source)
            done = subprocess.run(
                [go, "build", "-o", str(folder / name), "main.go"],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr
            built[name] = folder / name
        return built[name]

    return build


def go_serving_pki(kind: str, names=("localhost",), ips_=("127.0.0.1",), days=365):
    """A serving CA and certificate with a key of the given kind (p256, rsa2048)."""
    ca_key = new_key("p256")
    ca_cert = make_cert(
        ca_key, ca_key, "CN=go-apiserver-ca", "CN=go-apiserver-ca", ca=True, days=3650
    )
    key = new_key(kind)
    sans = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(i)) for i in ips_
    ]
    start = -1 if days > 0 else days - 30
    cert = make_cert(
        key,
        ca_key,
        "CN=kube-apiserver",
        "CN=go-apiserver-ca",
        sans=sans,
        days=days,
        start_days=start,
    )
    return (ca_key, ca_cert), cert, key


@dataclasses.dataclass
class GoFront:
    process: subprocess.Popen
    port: int
    cluster: Cluster  # its kubeconfig reaches the Go server; .api is the server behind


@contextlib.contextmanager
def go_apiserver(
    tmp_path,
    go_build,
    serving="p256",
    max_version="1.3",
    pki=None,
    extra=(),
    **cluster_extra,
):
    """kubectl -> proxy -> Go TLS server (kube-apiserver's settings) -> test API server."""
    binary = go_build("goapiserver", GO_APISERVER)
    backend = start_cluster(tmp_path)
    folder = tmp_path / "go"
    folder.mkdir(exist_ok=True)
    (ca_key, ca_cert), cert, key = pki or go_serving_pki(serving)
    ident = backend.ident
    front_key = new_key("p256")
    front_cert = make_cert(
        front_key, ident.ca_key, "CN=system:admin,O=system:masters", "CN=k3s-client-ca"
    )
    files = {
        "cert": pem(cert),
        "key": pem(key),
        "client-ca": pem(ident.ca_cert),
        "backend-ca": pem(backend.server_ca),
        "backend-cert": pem(front_cert),
        "backend-key": pem(front_key),
    }
    argv = [str(binary), "-max", max_version, "-backend", backend.api.url, *extra]
    for flag, data in files.items():
        (folder / f"{flag}.pem").write_bytes(data)
        argv += [f"-{flag}", str(folder / f"{flag}.pem")]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=open(folder / "stderr", "wb"), text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on "), (folder / "stderr").read_text()
        port = int(line.split()[-1])
        doc = yaml.safe_load(backend.kubeconfig.read_text())
        cluster_doc = doc["clusters"][0]["cluster"]
        cluster_doc["server"] = f"https://127.0.0.1:{port}"
        cluster_doc["certificate-authority-data"] = b64(pem(ca_cert))
        cluster_doc.update(cluster_extra)
        backend.kubeconfig.write_text(yaml.safe_dump(doc))
        yield GoFront(process, port, backend)
    finally:
        process.kill()
        process.wait()
        backend.api.stop()


@contextlib.contextmanager
def proxy_through(front: GoFront, workdir: Path):
    proxy = setup_and_proxy(front.cluster, workdir)
    try:
        yield proxy
    finally:
        proxy.stop()


# =============================================================================
# 1. Card layer: TLV and APDU encoding, PivSession in-process against the virtual card,
# finding the card through pcscd
# =============================================================================


def test_ber_lengths_and_tlvs_encode_exact_bytes():
    assert yk.tlv(0x80, b"") == b"\x80\x00"
    assert yk.tlv(0x53, b"a" * 127)[:2] == b"\x53\x7f"
    assert yk.tlv(0x53, b"a" * 128)[:3] == b"\x53\x81\x80"
    assert yk.tlv(0x53, b"a" * 256)[:4] == b"\x53\x82\x01\x00"
    assert yk.tlv(0x7F49, b"\x86\x01\x04") == b"\x7f\x49\x03\x86\x01\x04"
    assert yk.tlv(0x5C, (0x5FC105).to_bytes(3, "big")) == bytes.fromhex("5c035fc105")
    data = yk.tlv(0x7C, yk.tlv(0x82) + yk.tlv(0x81, b"\x01\x02"))
    assert data == bytes.fromhex("7c06820081020102")
    assert yk.parse_tlvs(data) == {0x7C: bytes.fromhex("820081020102")}
    assert yk.parse_tlvs(bytes.fromhex("7f4903860104")) == {0x7F49: b"\x86\x01\x04"}
    with pytest.raises(ValueError, match="runs past the end"):
        yk.parse_tlvs(b"\x53\x05abc")


def test_apdu_framing_pin_block_and_padding():
    assert yk.encode_apdu(0, 0xFD, 0, 0, b"", True) == bytes.fromhex("00fd000000")
    assert yk.encode_apdu(0x10, 0xDB, 0x3F, 0xFF, b"\x01", False) == bytes.fromhex(
        "10db3fff0101"
    )
    assert yk.pin_block("123456") == b"123456\xff\xff"
    with pytest.raises(yk.ConfigError, match="6 to 8 characters"):
        yk.pin_block("12345")
    block = yk.pkcs1v15_block(b"\xab" * 32, "sha256", 256)
    assert len(block) == 256 and block[:2] == b"\x00\x01"
    assert block.endswith(
        bytes.fromhex("003031300d060960864801650304020105000420") + b"\xab" * 32
    )
    assert set(block[2:-52]) == {0xFF}
    assert yk.ecdsa_input(b"\x01" * 64, 32) == b"\x01" * 32
    assert yk.ecdsa_input(b"\x01" * 20, 32) == b"\x00" * 12 + b"\x01" * 20


def test_slots_pair_key_reference_and_object():
    assert yk.parse_slot("9a") == yk.Slot(0x9A, 0x5FC105)
    assert yk.parse_slot("0x9E") == yk.Slot(0x9E, 0x5FC101)
    assert yk.parse_slot("82").object_id == 0x5FC10D
    assert yk.parse_slot("95").object_id == 0x5FC120
    with pytest.raises(
        yk.ConfigError, match="unknown PIV slot '9f': use 9a, 9c, 9d, 9e"
    ):
        yk.parse_slot("9f")


def test_pcscd_not_running_says_how_to_start_it(tmp_path):
    env = {**os.environ, "PCSCLITE_CSOCK_NAME": str(tmp_path / "nothing.comm")}
    done = subprocess.run(
        [sys.executable, str(HERE / "yk_kube_proxy.py"), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == (
        "yubikey-kube-proxy: error: cannot reach the PC/SC daemon (pcscd): start it with "
        "'sudo systemctl start pcscd.socket' (or install the pcscd package)\n"
    )


# -- PivSession in-process: the PIV session against the virtual card, no pcscd ---------


class DirectTransport:
    """The Transport seam wired straight to the card's APDU handler (no pcscd, no
    vpcd): the bytes PivSession sends are exactly the bytes the card sees."""

    def __init__(self, card) -> None:
        self.card = card

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        reply = self.card.process(apdu)
        return reply[:-2], int.from_bytes(reply[-2:], "big")

    @contextlib.contextmanager
    def transaction(self):
        yield

    def close(self) -> None:
        self.card.power_off()


DIRECT_READER = "Direct 00 00"
SLOT_9A = yk.SLOTS["9a"]


def direct_session(**card) -> tuple[yk.PivSession, VirtualPiv]:
    """A SELECTed PivSession on a fresh virtual card, and the card."""
    piv = VirtualPiv(**card)
    session = yk.PivSession(DirectTransport(piv), DIRECT_READER)
    session.select()
    return session, piv


def test_session_select_reads_the_version_and_refuses_a_card_without_piv():
    session, piv = direct_session(version=(5, 4, 3))
    assert session.version == (5, 4, 3)
    assert piv.apdu_log == [
        bytes.fromhex("00a4040005a00000030800"),
        bytes.fromhex("00fd000000"),
    ]
    not_piv = types.SimpleNamespace(process=lambda apdu: b"\x6a\x82")
    with pytest.raises(yk.CardError) as refused:
        yk.PivSession(DirectTransport(not_piv), DIRECT_READER).select()
    assert type(refused.value) is yk.CardError
    assert str(refused.value) == (
        "the card in reader 'Direct 00 00' has no PIV application (SW 6A82): "
        "is it a YubiKey 4 or 5?"
    )


@pytest.mark.parametrize("version", [(5, 7, 1), (5, 2, 7)], ids=["metadata", "probe"])
def test_session_pin_tries_verify_and_block(version):
    session, piv = direct_session(version=version)
    assert session.pin_tries_left() == 3 and piv.verify_attempts == 0
    if version < (5, 3, 0):  # the empty VERIFY probe, which costs no try
        assert piv.apdu_log[-1] == bytes.fromhex("00200080")
    assert not session.pin_verified()
    with pytest.raises(yk.ConfigError, match="a PIV PIN has 6 to 8 characters"):
        session.verify_pin("12345")
    assert piv.verify_attempts == 0
    with pytest.raises(yk.PinError) as wrong:
        session.verify_pin("654321")
    assert str(wrong.value) == (
        "wrong PIN: the YubiKey has 2 tries left before it blocks the PIN; "
        "check the PIN (or the PIN file) and try again"
    )
    assert wrong.value.attempts_remaining == 2 and piv.verify_attempts == 1
    assert session.pin_tries_left() == 2 and piv.verify_attempts == 1
    session.verify_pin("123456")
    assert session.pin_verified() and piv.pin_tries_left == 3
    # Once verified, the probe answers 9000, which tells no count.
    assert session.pin_tries_left() == (3 if version >= (5, 3, 0) else None)
    blocked = (
        "the PIN is blocked: unblock it with the PUK ('ykman piv access unblock-pin' "
        "or 'yubico-piv-tool -a unblock-pin')"
    )
    for left in (2, 1, 0):
        with pytest.raises(yk.PinError) as wrong:
            session.verify_pin("654321")
        assert wrong.value.attempts_remaining == left
    assert str(wrong.value) == blocked  # 63C0: the last try went
    with pytest.raises(yk.PinError) as wrong:
        session.verify_pin("123456")  # 6983: even the right PIN
    assert str(wrong.value) == blocked and wrong.value.attempts_remaining == 0
    assert session.pin_tries_left() == 0 and piv.verify_attempts == 6
    assert not session.pin_verified()


MGMT_CASES = {
    "3des-5.2": ((5, 2, 7), ALG_3DES, DEFAULT_MGMT_KEY),
    "3des-5.4": ((5, 4, 3), ALG_3DES, bytes(range(24))),
    "aes128": ((5, 7, 1), ALG_AES128, bytes(range(16))),
    "aes192": ((5, 7, 1), ALG_AES192, DEFAULT_MGMT_KEY),
    "aes256": ((5, 7, 1), ALG_AES256, bytes(range(32))),
}


@pytest.mark.parametrize("version, algorithm, key", MGMT_CASES.values(), ids=MGMT_CASES)
def test_session_management_key_3des_and_aes(version, algorithm, key):
    session, piv = direct_session(
        version=version, mgmt_algorithm=algorithm, mgmt_key=key
    )
    assert session.management_algorithm() == algorithm
    default = None if version < (5, 3, 0) else key == DEFAULT_MGMT_KEY
    assert session.management_key_is_default() is default
    wrong = bytes(b ^ 0x55 for b in key)
    with pytest.raises(yk.ManagementKeyError) as refused:
        session.authenticate(wrong)
    assert str(refused.value) == (
        "the YubiKey rejected the management key: pass the card's key with "
        "--management-key-file PATH or YKP_MANAGEMENT_KEY (the factory key is the "
        "default)"
    )
    assert not piv.mgmt_authenticated
    with pytest.raises(yk.ManagementKeyError) as refused:
        session.authenticate(key[:-8])
    name = yk.ALGORITHM_NAMES[yk.KeyAlgorithm(algorithm)]
    assert str(refused.value) == (
        f"this YubiKey's management key is {name} ({len(key)} bytes) but the key "
        f"given has {len(key) - 8} bytes: pass the right one with "
        "--management-key-file PATH"
    )
    session.authenticate(key)
    assert piv.mgmt_authenticated
    step1 = bytes([0x00, 0x87, algorithm, 0x9B, 0x04]) + bytes.fromhex("7c02800000")
    assert piv.apdu_log[-2] == step1


class LyingPiv(VirtualPiv):
    """A card that answers our management-key challenge wrongly."""

    def _authenticate_mgmt(self, algorithm, fields):
        reply = super()._authenticate_mgmt(algorithm, fields)
        if fields.get(TAG_CHALLENGE):
            reply = reply[:-1] + bytes([reply[-1] ^ 1])
        return reply


def test_session_card_answering_the_challenge_wrongly_is_not_trusted():
    piv = LyingPiv()
    session = yk.PivSession(DirectTransport(piv), DIRECT_READER)
    session.select()
    with pytest.raises(yk.ManagementKeyError) as refused:
        session.authenticate(DEFAULT_MGMT_KEY)
    assert str(refused.value) == (
        "the card's answer to our management-key challenge is wrong: "
        "this is not the YubiKey it claims to be, or it is faulty"
    )


def verify_signature(public_key, signature: bytes, message: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import padding

    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(signature, message)


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048", "ed25519"])
def test_session_import_then_sign_with_chaining(kind):
    session, piv = direct_session(version=(5, 7, 1))
    key = new_key(kind)
    session.authenticate(DEFAULT_MGMT_KEY)
    start = len(piv.apdu_log)
    session.import_key(SLOT_9A, key, yk.PinPolicy.NEVER, yk.TouchPolicy.NEVER)
    algorithm = yk.key_algorithm(key)
    data = yk.import_key_data(key) + bytes.fromhex("aa0101ab0101")
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)]
    sent = [bytes([0x10, 0xFE, algorithm, 0x9A, 255]) + c for c in chunks[:-1]]
    last = bytes([0x00, 0xFE, algorithm, 0x9A, len(chunks[-1])]) + chunks[-1]
    assert piv.apdu_log[start:] == sent + [last]
    assert bool(sent) == (kind == "rsa2048")  # CLA 10 on all but the last 255
    meta = session.slot_metadata(SLOT_9A)
    assert (meta.algorithm, meta.pin_policy, meta.touch_policy, meta.origin) == (
        algorithm,
        yk.PinPolicy.NEVER,
        yk.TouchPolicy.NEVER,
        "imported",
    )
    message = b"the card signs this"
    signature = yk.sign_message(session, SLOT_9A, algorithm, message)
    verify_signature(key.public_key(), signature, message)
    assert piv.sign_count == 1


def test_session_get_response_collects_a_long_certificate():
    session, piv = direct_session()
    ident = make_identity("rsa4096")
    der = ident.cert.public_bytes(serialization.Encoding.DER)
    assert session.get_certificate(SLOT_9A) is None  # 6A82: none yet
    session.authenticate(DEFAULT_MGMT_KEY)
    session.put_certificate(SLOT_9A, der)
    start = len(piv.apdu_log)
    assert session.get_certificate(SLOT_9A) == der
    answer = len(yk.tlv(0x53, yk.tlv(0x70, der) + bytes.fromhex("710100fe00")))
    more = -(-answer // 256) - 1
    assert more >= 2
    assert piv.apdu_log[start + 1 :] == [bytes.fromhex("00c0000000")] * more


def test_session_status_words_become_typed_errors():
    session, piv = direct_session(version=(5, 4, 3), serial=21000002)
    assert session.get_serial() == 21000002
    assert session.slot_metadata(SLOT_9A) is None  # 6A88 is "empty", not an error
    with pytest.raises(yk.ApduError) as refused:
        session.sign_raw(SLOT_9A, yk.KeyAlgorithm.ECCP256, b"\x01" * 32)
    assert refused.value.sw == 0x6A88 and str(refused.value) == (
        "the YubiKey refused a signature with slot 9a (reader 'Direct 00 00'): "
        "referenced data not found (SW 6A88)"
    )
    key = new_key("p256")
    with pytest.raises(yk.ApduError) as refused:
        session.import_key(SLOT_9A, key, yk.PinPolicy.ONCE, yk.TouchPolicy.NEVER)
    assert refused.value.sw == 0x6982 and str(refused.value) == (
        "the YubiKey refused the key import into slot 9a (reader 'Direct 00 00'): "
        "security status not satisfied (SW 6982)"
    )
    assert piv.slot_key(0x9A) is None
    with pytest.raises(yk.ConfigError) as refused:
        session.import_key(
            SLOT_9A, new_key("ed25519"), yk.PinPolicy.ONCE, yk.TouchPolicy.NEVER
        )
    assert str(refused.value) == (
        "Ed25519 keys need YubiKey firmware 5.7.0 or later; this card has 5.4.3"
    )
    assert piv.slot_key(0x9A) is None
    session.authenticate(DEFAULT_MGMT_KEY)
    session.import_key(SLOT_9A, key, yk.PinPolicy.ONCE, yk.TouchPolicy.NEVER)
    with pytest.raises(yk.CardError) as refused:
        yk.sign_message(session, SLOT_9A, yk.KeyAlgorithm.ECCP256, b"message")
    assert type(refused.value) is yk.CardError and str(refused.value) == (
        "the YubiKey refused to sign with slot 9a: the PIN was not verified or the "
        "key was not touched in time"
    )
    assert piv.sign_count == 0
    with pytest.raises(yk.ApduError) as refused:
        session.send(0x99, 0, 0)
    assert refused.value.sw == 0x6D00 and str(refused.value) == (
        "the YubiKey refused command 99 (reader 'Direct 00 00'): instruction not "
        "supported (SW 6D00)"
    )
    assert refused.value.http_status == 503
    old, _ = direct_session(version=(4, 3, 7))
    assert old.get_serial() is None and old.management_key_is_default() is None


# -- card selection and PC/SC errors -------------------------------------------------


def test_no_card_inserted(rig, capsys):
    code, _, stderr = run_cli("status", capsys=capsys)
    assert (code, stderr) == (
        1,
        "yubikey-kube-proxy: error: no YubiKey found - please insert your YubiKey\n",
    )


def test_several_cards_need_a_choice(cards, card57, tmp_path, capsys):
    second = cards(VirtualPiv(version=(5, 7, 1), serial=31000009), index=1)
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: several YubiKeys found: YubiKey serial 31000001 "
        f"(firmware 5.7.1) in reader '{YUBIKEY_READER} 00 00'; YubiKey serial 31000009 "
        f"(firmware 5.7.1) in reader '{YUBIKEY_READER} 00 01'; choose one with --serial "
        "N or --reader NAME\n"
    )
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--serial", "31000009"), capsys=capsys
    )
    assert (code, stderr) == (0, "")
    assert second.piv.slot_key(0x9A) is not None and card57.slot_key(0x9A) is None
    code, stdout, _ = run_cli("status", "--json", capsys=capsys)
    assert [c["serial"] for c in json.loads(stdout)["cards"]] == [
        31000001,
        31000009,
    ]
    assert code == 1  # the first card's slot is empty
    code, _, stderr = run_cli("status", "--serial", "42", capsys=capsys)
    assert stderr == (
        "yubikey-kube-proxy: error: no YubiKey with serial 42 found - "
        "please insert your YubiKey\n"
    )


def test_other_readers_are_skipped_unless_chosen(cards, tmp_path, capsys):
    cards(VirtualPiv(serial=41000004), generic=True)
    code, _, stderr = run_cli("status", capsys=capsys)
    assert stderr == (
        "yubikey-kube-proxy: error: no YubiKey found - please insert your YubiKey\n"
    )
    code, stdout, _ = run_cli("status", "--reader", "generic", "--json", capsys=capsys)
    assert json.loads(stdout)["cards"][0]["serial"] == 41000004


def test_card_held_exclusively_names_the_suspects(rig, card57, capsys):
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    hresult, handle, _ = scard.SCardConnect(
        context,
        rig.reader(),
        scard.SCARD_SHARE_EXCLUSIVE,
        scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
    )
    assert hresult == 0
    try:
        code, _, stderr = run_cli("status", capsys=capsys)
    finally:
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(context)
    assert code == 1
    assert stderr == (
        f"yubikey-kube-proxy: error: the YubiKey in reader '{YUBIKEY_READER} 00 00' is held "
        "exclusively by another program, usually scdaemon/gpg-agent (add 'disable-ccid' or "
        "'pcsc-shared' to ~/.gnupg/scdaemon.conf and run 'gpgconf --kill scdaemon'), "
        "yubikey-agent, or another ykman/PKCS#11 session: close it and try again\n"
    )


# -- card errors named by what happened, malformed card answers ------------------------


def test_pcsc_codes_are_named_by_what_happened():
    reader = "R 00 00"
    reset = yk.pcsc_error(0x80100068, reader)
    assert (type(reset), str(reset)) == (
        yk.TransientCardError,
        "the card in reader 'R 00 00' was reset by another program (0x80100068): "
        "try again",
    )
    removed = yk.pcsc_error(0x80100069, reader)
    assert (type(removed), str(removed)) == (
        yk.NoCardError,
        "YubiKey not present in reader 'R 00 00' - insert it",
    )
    # Not transacted says nothing of why: the card layer looks again before it
    # reports this raw code (see the pull-and-request-at-once test).
    raw = yk.pcsc_error(0x80100016, reader)
    assert (type(raw), raw.code) == (yk.PcscFailure, 0x80100016)
    assert str(raw).startswith("PC/SC error 0x80100016 in reader 'R 00 00': ")


class GarbledVersionPiv(VirtualPiv):
    """A card whose GET VERSION answer is one byte instead of three."""

    def process(self, apdu: bytes) -> bytes:
        if bytes(apdu[1:2]) == b"\xfd":
            return b"\x05\x90\x00"
        return super().process(apdu)


def test_malformed_card_answer_is_a_card_error(cards, capsys):
    cards(GarbledVersionPiv(serial=12000004))
    code, stdout, stderr = run_cli("status", capsys=capsys)
    assert (code, stdout) == (1, "")
    assert stderr == (
        f"{yk.PROG}: error: the YubiKey in reader '{YUBIKEY_READER} 00 00' sent an "
        "answer that is not valid PIV (index out of range): reinsert it and try "
        "again\n"
    )


def test_pin_policy_from_metadata_else_attestation_else_the_option(card52):
    generated, imported = ec.generate_private_key(ec.SECP256R1()), new_key("p256")
    card52.install_key(0x9A, generated, ALG_ECCP256, PIN_POLICY_ALWAYS, 0x02)
    card52.install_key(0x9C, imported, ALG_ECCP256, origin=ORIGIN_IMPORTED)
    meta = yk.SlotMetadata(
        ALG_ECCP256, yk.PinPolicy.ONCE, yk.TouchPolicy.CACHED, "imported", b""
    )
    card = yk.open_card()
    try:
        policies = [
            yk.key_policies(card, yk.SLOTS["9a"], None, None),
            yk.key_policies(card, yk.SLOTS["9c"], None, None),
            yk.key_policies(card, yk.SLOTS["9c"], None, "pin-file"),
            yk.key_policies(card, yk.SLOTS["9c"], meta, None),
        ]
    finally:
        card.close()
    assert policies == [
        (yk.PinPolicy.ALWAYS, yk.TouchPolicy.ALWAYS),  # attested
        (yk.PinPolicy.NEVER, yk.TouchPolicy.NEVER),  # imported: the option
        (yk.PinPolicy.ONCE, yk.TouchPolicy.NEVER),
        (yk.PinPolicy.ONCE, yk.TouchPolicy.CACHED),  # metadata first
    ]
    assert card52.sign_count == 0


# =============================================================================
# 2. Kubeconfig and the files a user names: read as kubectl reads them, refused in one
# line, never a traceback
# =============================================================================


def test_kubeconfig_list_first_definition_wins(tmp_path, monkeypatch):
    ident, other = make_identity(), make_identity()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_kubeconfig(tmp_path / "a" / "config", ident, inline=False)
    second = write_kubeconfig(tmp_path / "b" / "config", other, namespace="other")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{first}:{second}")
    config = yk.Kubeconfig(yk.kubeconfig_paths(None))
    ctx = config.resolve(None)
    assert ctx.namespace == "team-a"
    cert, key = yk.load_client_identity(ctx)
    assert cert == ident.cert  # read from pki/admin.crt relative to the first file
    assert config.paths == [first, second]


def test_a_kubeconfig_without_a_ca_uses_the_system_store_and_prints_only_our_lines(
    tmp_path,
):
    """The system trust store may hold roots with serial number 0; cryptography
    warns about them, which must not reach the user as a Python warning."""
    config = write_kubeconfig(tmp_path / "noca.yml", make_identity("p256"))
    doc = yaml.safe_load(config.read_text())
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]
    config.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "yk_kube_proxy.py"),
            "proxy",
            "--kubeconfig",
            str(config),
            "--plain-http",
            "--reader",
            "no such reader",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 1
    assert lines and all(line.startswith("yubikey-kube-proxy: ") for line in lines)
    assert lines[-1].startswith("yubikey-kube-proxy: error: ")


def test_kubeconfig_errors_name_the_problem(tmp_path):
    ident = make_identity()
    path = write_kubeconfig(tmp_path / "config", ident)
    config = yk.Kubeconfig([path])
    with pytest.raises(yk.ConfigError) as exc:
        config.resolve("prod")
    assert str(exc.value) == (
        f"context 'prod' not found in {path} (contexts: default): pass --context NAME"
    )
    (tmp_path / "bad").write_text("clusters: [\n")
    with pytest.raises(
        yk.ConfigError, match=r"is not valid YAML at line 2: fix or replace"
    ):
        yk.Kubeconfig([tmp_path / "bad"])
    with pytest.raises(
        yk.ConfigError, match=r"cannot read kubeconfig .*/nope: No such file"
    ):
        yk.Kubeconfig([tmp_path / "nope"])


# -- fail closed: kubeconfig types and values as kubectl reads them --------------------


ERROR = "yubikey-kube-proxy: error: "


def mutated_kubeconfig(tmp_path: Path, mutate, name: str = "k3s.yaml") -> Path:
    """A k3s-like kubeconfig, changed by ``mutate(doc)`` and written as YAML."""
    path = write_kubeconfig(tmp_path / name, make_identity())
    doc = yaml.safe_load(path.read_text())
    mutate(doc)
    path.write_text(yaml.safe_dump(doc))
    return path


def cluster_of(doc: dict) -> dict:
    return doc["clusters"][0]["cluster"]


STRING_HINT = "write a string, in quotes where YAML would read something else"
TYPE_CASES = {
    "insecure as the string false": (
        lambda d: cluster_of(d).update({"insecure-skip-tls-verify": "false"}),
        "kubeconfig {path}, cluster 'default': insecure-skip-tls-verify is a string, "
        "not a boolean: write true or false, without quotes",
    ),
    "insecure as the string no": (
        lambda d: cluster_of(d).update({"insecure-skip-tls-verify": "no"}),
        "kubeconfig {path}, cluster 'default': insecure-skip-tls-verify is a string, "
        "not a boolean: write true or false, without quotes",
    ),
    "namespace as a number": (
        lambda d: d["contexts"][0]["context"].update(namespace=5),
        f"kubeconfig {{path}}, context 'default': namespace is a number, not a "
        f"string: {STRING_HINT}",
    ),
    "tls-server-name as a number": (
        lambda d: cluster_of(d).update({"tls-server-name": 443}),
        f"kubeconfig {{path}}, cluster 'default': tls-server-name is a number, not "
        f"a string: {STRING_HINT}",
    ),
    "server as a decimal number": (
        lambda d: cluster_of(d).update(server=6443.5),
        f"kubeconfig {{path}}, cluster 'default': server is a decimal number, not "
        f"a string: {STRING_HINT}",
    ),
    "clusters as a mapping": (
        lambda d: d.update(clusters={"default": {}}),
        "kubeconfig {path}: clusters is a mapping, not a list: write a list (lines "
        "starting with '- ')",
    ),
    "cluster as a string": (
        lambda d: d["clusters"][0].update(cluster="https://127.0.0.1:6443"),
        "kubeconfig {path}, cluster 'default' is a string, not a mapping: write "
        "key: value lines there",
    ),
    "a user entry that is a string": (
        lambda d: d.update(users=["default"]),
        "kubeconfig {path}, entry 1 of users is a string, not a mapping: write "
        "key: value lines there",
    ),
    "client-key-data as a list": (
        lambda d: d["users"][0]["user"].update({"client-key-data": ["a", "b"]}),
        f"kubeconfig {{path}}, user 'default': client-key-data is a list, not a "
        f"string: {STRING_HINT}",
    ),
    "current-context as a boolean": (
        lambda d: d.update({"current-context": True}),
        f"kubeconfig {{path}}: current-context is a boolean, not a string: "
        f"{STRING_HINT}",
    ),
    "preferences as a list": (
        lambda d: d.update(preferences=[]),
        "kubeconfig {path}: preferences is a list, not a mapping: write a mapping "
        "(key: value lines)",
    ),
    "context extensions as a string": (
        lambda d: d["contexts"][0]["context"].update(extensions="none"),
        "kubeconfig {path}, context 'default': extensions is a string, not a list: "
        "write a list (lines starting with '- ')",
    ),
}


@pytest.mark.parametrize("mutate, message", TYPE_CASES.values(), ids=TYPE_CASES)
def test_kubeconfig_types_are_read_as_kubectl_reads_them(
    tmp_path, capsys, mutate, message
):
    path = mutated_kubeconfig(tmp_path, mutate)
    code, _, stderr = run_cli(*setup_args(path, tmp_path / "out"), capsys=capsys)
    assert (code, stderr) == (1, f"{ERROR}{message.format(path=path)}\n")
    assert not (tmp_path / "out" / "proxy.yml").exists()
    # kubectl refuses the same file while decoding it
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(path), "config", "view"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(
        f'error: error loading config file "{path}": json: cannot unmarshal '
    )


def test_insecure_with_a_ca_is_refused_as_kubectl_refuses_it(tmp_path, capsys):
    path = mutated_kubeconfig(
        tmp_path, lambda d: cluster_of(d).update({"insecure-skip-tls-verify": True})
    )
    message = (
        f"kubeconfig {path}, cluster 'default': insecure-skip-tls-verify: true "
        "together with a certificate authority is refused, as kubectl refuses it: "
        "remove insecure-skip-tls-verify so that the server is checked against the "
        "CA\n"
    )
    code, _, stderr = run_cli(*setup_args(path, tmp_path / "out"), capsys=capsys)
    assert (code, stderr) == (1, ERROR + message)
    code, _, stderr = run_cli(
        "proxy", "--kubeconfig", str(path), "--plain-http", capsys=capsys
    )
    assert (code, stderr) == (1, ERROR + message)
    code, _, stderr = run_cli("status", "--kubeconfig", str(path), capsys=capsys)
    assert (code, stderr) == (1, ERROR + message)
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(path), "get", "--raw", "/version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (
        1,
        "error: specifying a root certificates file with the insecure flag is not "
        "allowed\n",
    )


def test_bad_server_urls_are_refused_at_start(tmp_path, capsys):
    for server in (
        "https://127.0.0.1:99999",
        "https://127.0.0.1:0",
        "https://127.0.0.1:-1",
        "https://[::1",
        "https://exa mple:6443",
        "https://exämple:6443",
    ):
        path = mutated_kubeconfig(
            tmp_path, lambda d: cluster_of(d).update(server=server)
        )
        code, _, stderr = run_cli(
            "proxy", "--kubeconfig", str(path), "--plain-http", capsys=capsys
        )
        assert (code, stderr) == (
            1,
            f"{ERROR}kubeconfig {path}, cluster 'default': the cluster server "
            f"{server!r} is not a URL (ASCII, no spaces, a port from 1 to 65535): "
            "write https://HOST:PORT in the kubeconfig\n",
        )


# -- files that are not what they should be ------------------------------------------


def hostile_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A FIFO (nobody writes it), a directory, a huge sparse file and a binary
    one, with the reason each is refused for."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    huge = folder / "huge"
    with open(huge, "wb") as out:
        out.truncate(yk.MAX_FILE_BYTES + 1)
    binary = folder / "binary"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 10)
    binary.chmod(0o600)
    return {
        "fifo": (fifo, "it is a FIFO"),
        "directory": (folder, "it is a directory"),
        "huge": (huge, f"it is larger than {yk.MAX_FILE_BYTES} bytes"),
        "binary": (binary, None),
    }


def run_subprocess_cli(*argv: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; a hang would fail the test at the timeout."""
    return subprocess.run(
        [sys.executable, str(HERE / "yk_kube_proxy.py"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_fifo_directory_huge_and_binary_files_are_refused(rig, tmp_path, capsys):
    files = hostile_files(tmp_path)
    fix = "pass the right file with --kubeconfig"
    for name, (path, reason) in files.items():
        expected = (
            f"{ERROR}kubeconfig {path} is not UTF-8 text (byte 0); {fix}\n"
            if reason is None
            else f"{ERROR}cannot read kubeconfig {path}: {reason}; {fix}\n"
        )
        for argv in (
            ["setup", "--kubeconfig", str(path), "--output-dir", str(tmp_path / "o")],
            ["proxy", "--kubeconfig", str(path)],
            ["status", "--kubeconfig", str(path)],
        ):
            done = run_subprocess_cli(*argv) if name == "fifo" else None
            code, err = (
                (done.returncode, done.stderr)
                if done
                else run_cli(*argv, capsys=capsys)[::2]
            )
            assert (name, code, err) == (name, 1, expected)


def test_hostile_certificate_pin_and_key_files(card57, tmp_path, capsys):
    files = hostile_files(tmp_path)
    for name, (path, reason) in files.items():
        where = f"kubeconfig {tmp_path / 'k.yaml'}"
        # a client certificate file, read by setup before the card is touched
        source = mutated_kubeconfig(
            tmp_path,
            lambda d: d["users"][0].update(
                user={"client-certificate": str(path), "client-key": str(path)}
            ),
            "k.yaml",
        )
        argv = setup_args(source, tmp_path / "o")
        done = run_subprocess_cli(*argv) if name == "fifo" else None
        code, err = (
            (done.returncode, done.stderr)
            if done
            else run_cli(*argv, capsys=capsys)[::2]
        )
        if reason is None:
            assert (code, err) == (
                1,
                f"{ERROR}the client certificate of user 'default' in {source} is not a "
                "readable "
                "X.509 certificate: fix the kubeconfig or export the certificate again\n",
            )
        else:
            assert (code, err) == (
                1,
                f"{ERROR}cannot read client-certificate {path}: {reason}; fix the path "
                f"in {where}, user 'default'\n",
            )
        # a CA file, read by the proxy before the card is touched
        source = mutated_kubeconfig(
            tmp_path,
            lambda d: cluster_of(d).update(
                {"certificate-authority": str(path), "certificate-authority-data": None}
            ),
            "k.yaml",
        )
        argv = ["proxy", "--kubeconfig", str(source), "--plain-http"]
        done = run_subprocess_cli(*argv) if name == "fifo" else None
        code, err = (
            (done.returncode, done.stderr)
            if done
            else run_cli(*argv, capsys=capsys)[::2]
        )
        if reason is None:
            assert (code, err) == (
                1,
                f"{ERROR}the certificate-authority of {where}, cluster 'default' is "
                "not PEM certificates: fix the kubeconfig\n",
            )
        else:
            assert (code, err) == (
                1,
                f"{ERROR}cannot read certificate-authority {path}: {reason}; fix the "
                f"path in {where}, cluster 'default'\n",
            )
        # PIN and management-key files, refused before the card sees them
        source = write_kubeconfig(tmp_path / "k.yaml", make_identity())
        for option, what, fix in (
            ("--pin-file", "the PIN file", "write just the PIN into it"),
            (
                "--management-key-file",
                "the management-key file",
                "write just the key in hex into it",
            ),
        ):
            argv = setup_args(
                source, tmp_path / "o", "--pin-policy", "once", option, str(path)
            )
            done = run_subprocess_cli(*argv) if name == "fifo" else None
            code, err = (
                (done.returncode, done.stderr)
                if done
                else run_cli(*argv, capsys=capsys)[::2]
            )
            if name == "huge":
                reason = f"it is larger than {yk.MAX_SECRET_FILE_BYTES} bytes"
            expected = (
                f"{what} {path} is not UTF-8 text (byte 0); {fix}"
                if reason is None
                else f"cannot read {what} {path}: {reason}; {fix}"
            )
            assert (code, err) == (1, f"{ERROR}{expected}\n")
    assert (card57.verify_attempts, card57.slot_key(0x9A), card57.sign_count) == (
        0,
        None,
        0,
    )
    assert management_key_attempts(card57) == 0


def test_nul_bytes_in_paths(tmp_path, capsys):
    code, _, stderr = run_cli("proxy", "--kubeconfig", "a\x00b", capsys=capsys)
    assert (code, stderr) == (
        1,
        f"{ERROR}cannot read kubeconfig 'a\\x00b': the path contains a NUL byte; "
        "pass the right file with --kubeconfig\n",
    )
    source = mutated_kubeconfig(
        tmp_path,
        lambda d: d["users"][0].update(
            user={"client-certificate": "pki/\x00.crt", "client-key": "k"}
        ),
    )
    code, _, stderr = run_cli(*setup_args(source, tmp_path / "o"), capsys=capsys)
    assert (code, stderr) == (
        1,
        f"{ERROR}cannot read client-certificate '{tmp_path}/pki/\\x00.crt': the path "
        f"contains a NUL byte; fix the path in kubeconfig {source}, user 'default'\n",
    )


# -- the kubeconfig fuzz: setup, proxy and status on mutated files -----------------


FUZZ_SEED = 20261201
FUZZ_INPUTS = 320


def fixed_ed25519(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(label.encode()).digest()
    )


def fixed_cert(key, issuer_key, subject: str, issuer: str, ca: bool = False):
    """A certificate whose bytes are the same in every run (Ed25519 signatures
    are deterministic), so that the fuzz inputs are too."""
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(x509.Name.from_rfc4514_string(issuer))
        .public_key(key.public_key())
        .serial_number(4242)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, None)
    )


def fuzz_material() -> dict:
    ca_key, key = fixed_ed25519("ca"), fixed_ed25519("client")
    ca = fixed_cert(ca_key, ca_key, "CN=fuzz-ca", "CN=fuzz-ca", ca=True)
    cert = fixed_cert(key, ca_key, "CN=system:admin,O=system:masters", "CN=fuzz-ca")
    server_key = fixed_ed25519("local server")
    server = fixed_cert(server_key, ca_key, "CN=local", "CN=fuzz-ca")
    digest = hashlib.sha512(b"fuzz").digest()
    unsupported = [
        ec.derive_private_key(int.from_bytes(digest, "big") % 2**500, ec.SECP521R1()),
        ec.derive_private_key(int.from_bytes(digest[:20], "big"), ec.SECP256K1()),
        ed448.Ed448PrivateKey.from_private_bytes(digest[:57]),
        x25519.X25519PrivateKey.from_private_bytes(digest[:32]),
    ]
    return {
        "ca": pem(ca),
        "cert": pem(cert),
        "key": pem(key),
        "server": pem(server),
        "server_key": pem(server_key),
        "unsupported": [pem(k) for k in unsupported],
    }


def fuzz_bases(material: dict, folder: Path) -> list[dict]:
    """A k3s-like source, a kubeadm-like one with files, a proxy.yml, a plain one."""
    (folder / "pki").mkdir(parents=True)
    (folder / "pki" / "admin.crt").write_bytes(material["cert"])
    (folder / "pki" / "admin.key").write_bytes(material["key"])
    (folder / "pki" / "ca.crt").write_bytes(material["ca"])

    def doc(cluster: dict, user: dict, extension: dict | None = None) -> dict:
        context = {"cluster": "default", "user": "default", "namespace": "team-a"}
        if extension is not None:
            context["extensions"] = [
                {"name": "yubikey-kube-proxy", "extension": extension}
            ]
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "default", "cluster": cluster}],
            "contexts": [{"name": "default", "context": context}],
            "current-context": "default",
            "users": [{"name": "default", "user": user}],
            "preferences": {},
        }

    inline_cluster = {
        "server": "https://127.0.0.1:6443",
        "certificate-authority-data": b64(material["ca"]),
    }
    local_tls = {
        "server-certificate-data": b64(material["server"]),
        "server-key-data": b64(material["server_key"]),
        "client-ca-data": b64(material["ca"]),
    }
    settings = {"slot": "9a", "listen": "127.0.0.1:0", "serial": 1234}
    return [
        doc(
            inline_cluster,
            {
                "client-certificate-data": b64(material["cert"]),
                "client-key-data": b64(material["key"]),
            },
        ),
        doc(
            {"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
            {"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"},
        ),
        doc(inline_cluster, {}, {**settings, "local-tls": local_tls}),
        doc(inline_cluster, {}, {**settings, "plain-http": True}),
    ]


HOSTILE_VALUES = [
    "false", "no", "", "\x00", "é", "a" * 3000, 0, -1, 2**70, 1.5, True, False,
    None, [], {}, [[[]]], {"a": [1, {"b": None}]}, datetime.date(2020, 1, 1),
]  # fmt: skip
BAD_SERVERS = [
    "https://127.0.0.1:99999", "https://127.0.0.1:0", "https://127.0.0.1:-5",
    "https://127.0.0.1:x", "https://[::1", "http://127.0.0.1:6443", "https://",
    "127.0.0.1:6443", "https://h\x00st:6443", "https://exa mple", "https://é:1",
    "https://:6443", "https://[::1]:6443/path?q#f", "https://user@127.0.0.1:6443",
]  # fmt: skip
BAD_PATHS = [
    "pki/\x00.crt", "/", "/dev/zero", "/dev/null", "missing.pem", "~nobody-here/x",
    "pki", "", "../" * 40 + "etc/hostname", "a" * 5000,
]  # fmt: skip
BAD_LISTEN = [
    "0.0.0.0:1", "127.0.0.1:²", ":::", "[::1]:99999", "localhost:0", "x", "[::1]:0",
    "127.0.0.1:-1", "\x00:1", "127.0.0.1:1e3", "localhost:", "256.0.0.1:1",
]  # fmt: skip


def pem_lies(material: dict, rng: random.Random) -> str:
    """PEM blocks that are not what they claim, base64 as in *-data fields."""
    body = material["key"].split(b"\n", 1)[1]
    lies = [
        b"-----BEGIN CERTIFICATE-----\n" + body.replace(b"PRIVATE KEY", b"CERTIFICATE"),
        material["cert"].replace(b"CERTIFICATE", b"PRIVATE KEY"),
        material["cert"][: rng.randrange(20, len(material["cert"]))],
        material["ca"]
        + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        material["key"],
        material["cert"],
        rng.choice(material["unsupported"]),
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
    ]
    return b64(rng.choice(lies))


def dig(value, *steps) -> dict:
    """The mapping at ``steps`` (keys and list indexes), else a fresh empty one."""
    for step in steps:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and isinstance(step, int) and len(value) > step:
            value = value[step]
        else:
            return {}
    return value if isinstance(value, dict) else {}


def mutate_doc(doc: dict, material: dict, rng: random.Random) -> None:
    """One structural change: a wrong type, a bad value, a lie, a missing part."""
    cluster = dig(doc, "clusters", 0, "cluster")
    user = dig(doc, "users", 0, "user")
    context = dig(doc, "contexts", 0, "context")
    ext = dig(context, "extensions", 0, "extension")
    local = dig(ext, "local-tls")
    targets = [
        (doc, ["clusters", "contexts", "users", "current-context", "preferences",
               "apiVersion", "kind", "extensions"]),
        (cluster, ["server", "certificate-authority-data", "certificate-authority",
                   "insecure-skip-tls-verify", "tls-server-name", "proxy-url",
                   "extensions"]),
        (user, ["client-certificate-data", "client-key-data", "client-certificate",
                "client-key", "token", "exec"]),
        (context, ["cluster", "user", "namespace", "extensions"]),
        (ext, ["slot", "serial", "listen", "reuse-while-present", "plain-http",
               "local-tls"]),
        (local, ["server-certificate-data", "server-key-data", "client-ca-data"]),
    ]  # fmt: skip
    target, keys = rng.choice(targets)
    key = rng.choice(keys)
    kind = rng.randrange(8)
    if kind == 0 or not target:
        target[key] = rng.choice(HOSTILE_VALUES)
    elif kind == 1:
        target.pop(key, None)
    elif kind == 2:
        cluster["server"] = rng.choice(BAD_SERVERS)
    elif kind == 3:
        place = rng.choice([cluster, user])
        name = rng.choice(["certificate-authority", "client-certificate", "client-key"])
        place.pop(f"{name}-data", None)
        place[name] = rng.choice(BAD_PATHS)
    elif kind == 4:
        place = rng.choice([cluster, user, local or cluster])
        name = rng.choice(
            [k for k in place if isinstance(k, str) and k.endswith("-data")]
            or ["certificate-authority-data"]
        )
        place[name] = pem_lies(material, rng)
    elif kind == 5:
        ext[rng.choice(["listen", "slot", "serial"])] = rng.choice(
            BAD_LISTEN + ["9z", "0x9A", "82", 0x9A, "abc", -1, 2**64]
        )
    elif kind == 6:
        depth = rng.choice([10, 200, 3000])
        value: object = "x"
        for _ in range(depth):
            value = [value] if rng.random() < 0.5 else {"k": value}
        target[key] = value
    else:
        name = rng.choice(["clusters", "contexts", "users"])
        entries = doc.get(name)
        if isinstance(entries, list) and entries:
            entry = copy.deepcopy(entries[0])
            if isinstance(entry, dict):
                entry[rng.choice(["name", "cluster", "context", "user"])] = rng.choice(
                    HOSTILE_VALUES + ["default", "other"]
                )
            entries.insert(rng.randrange(len(entries) + 1), entry)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A change below YAML: invalid UTF-8, control bytes, cuts, tabs, noise."""
    at = rng.randrange(len(data) + 1)
    kind = rng.randrange(7)
    if kind == 0:
        return (
            data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + data[at:]
        )
    if kind == 1:
        return data[:at] + bytes([rng.choice([0, 1, 7, 27, 127])]) + data[at:]
    if kind == 2:
        return data[:at]
    if kind == 3:
        return data[:at] + b"\n\t- x: [" + data[at:]
    if kind == 4:
        return data[:at] + b"*undefined_alias " + data[at:]
    if kind == 5:
        return b"[" * rng.choice([50, 5000, 50000]) + data
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))


def fuzz_input(bases: list[dict], material: dict, rng: random.Random) -> bytes:
    doc = copy.deepcopy(rng.choice(bases))
    for _ in range(rng.randint(1, 3)):
        mutate_doc(doc, material, rng)
    try:
        data = yaml.safe_dump(doc).encode()
    except RecursionError:  # nesting PyYAML itself cannot write: write it by hand
        data = b"clusters: " + b"[" * 3000 + b"]" * 3000 + b"\n"
    if rng.random() < 0.3:
        data = mutate_bytes(data, rng)
    return data


def check_one_line(code: int, stderr: str) -> str | None:
    """None when the answer is exit code 1 and warnings plus one error line."""
    lines = stderr.splitlines()
    if code != 1 or not lines or not stderr.endswith("\n"):
        return f"exit code {code}, stderr {stderr!r}"
    if any(not line.startswith("yubikey-kube-proxy: ") for line in lines):
        return f"a line that is not ours: {stderr!r}"
    if [line.startswith(ERROR) for line in lines] != [False] * (len(lines) - 1) + [
        True
    ]:
        return f"not exactly one error line at the end: {stderr!r}"
    if "Traceback" in stderr or f"{ERROR}unexpected " in stderr:
        return f"a traceback: {stderr!r}"
    return None


def test_kubeconfig_fuzz_never_a_traceback(rig, tmp_path, capsys):
    rng = random.Random(FUZZ_SEED)
    material = fuzz_material()
    bases = fuzz_bases(material, tmp_path)
    out = tmp_path / "out"
    failures, messages, runs, no_card = [], set(), 0, 0
    for number in range(FUZZ_INPUTS):
        path = tmp_path / f"fuzz-{number}.yml"
        path.write_bytes(fuzz_input(bases, material, rng))
        for argv in (
            ["setup", "--kubeconfig", str(path), "--output-dir", str(out)],
            ["proxy", "--kubeconfig", str(path)],
            ["status", "--kubeconfig", str(path)],
        ):
            runs += 1
            try:
                code, _, stderr = run_cli(*argv, capsys=capsys)
            except BaseException as exc:  # noqa: BLE001 - counted, reported below
                code, stderr = -1, f"{type(exc).__name__} escaped main(): {exc}"
            problem = check_one_line(code, stderr)
            if problem:
                failures.append(f"input {number} ({path.name}), {argv[0]}: {problem}")
                continue
            message = stderr.splitlines()[-1]
            messages.add(message.split(":", 2)[-1][:40])
            no_card += message.startswith(f"{ERROR}no YubiKey ")
    assert not (out / "proxy.yml").exists()
    FAULT_FIGURES.append(
        f"kubeconfig fuzz (seed {FUZZ_SEED}): {FUZZ_INPUTS} inputs, {runs} runs of "
        f"setup/proxy/status, tracebacks or bad answers {len(failures)}, valid "
        f"enough to reach the card {no_card}, distinct messages {len(messages)}"
    )
    assert failures == [], "\n".join(failures[:20])


# =============================================================================
# 3. setup and status: the key onto the card, what is on the card; names, merge and
# unmerge
# =============================================================================


def test_setup_then_status_k3s_like_ec_p256_on_firmware_57(card57, tmp_path, capsys):
    ident = make_identity("p256")
    source = write_kubeconfig(
        tmp_path / "k3s.yaml", ident, extra_cluster={"tls-server-name": "kubernetes"}
    )
    out = tmp_path / "out" / "new"
    code, stdout, stderr = run_cli(*setup_args(source, out), capsys=capsys)
    assert (code, stderr) == (0, "")
    assert stdout.splitlines()[0] == (
        "Imported the EC P-256 key and certificate (CN=system:admin,O=system:masters, valid "
        f"until {ident.cert.not_valid_after_utc:%Y-%m-%d}) into slot 9a of YubiKey serial "
        f"31000001 (firmware 5.7.1) in reader '{YUBIKEY_READER} 00 00'."
    )
    assert f"  1. yubikey-kube-proxy proxy --kubeconfig {out / 'proxy.yml'}" in stdout
    assert f"  3. The private key is still in {source} (user 'default')" in stdout
    # The card holds exactly the kubeconfig's key and certificate.
    assert card57.slot_key(0x9A).private_numbers() == ident.key.private_numbers()
    stored = yk.parse_tlvs(card57.certificate_object(0x9A))
    assert stored[0x70] == ident.cert.public_bytes(serialization.Encoding.DER)
    assert card57.sign_count == 1  # the proof
    # The files: 0600, no credentials, the extension entry, the namespace kept.
    proxy, client = out / "proxy.yml", out / "client.yml"
    assert stat.S_IMODE(proxy.stat().st_mode) == 0o600
    assert stat.S_IMODE(client.stat().st_mode) == 0o600
    doc = read_yaml(proxy)
    assert doc["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:6443",
        "certificate-authority-data": b64(pem(ident.ca_cert)),
        "tls-server-name": "kubernetes",
    }
    assert doc["users"] == [{"name": "yubikey-kube-proxy", "user": {}}]
    context = doc["contexts"][0]["context"]
    extension = context.pop("extensions")[0]["extension"]
    assert context == {
        "cluster": "default",
        "user": "yubikey-kube-proxy",
        "namespace": "team-a",
    }
    local = extension.pop("local-tls")
    assert extension == {"slot": "9a", "listen": "127.0.0.1:8080", "serial": 31000001}
    # The local hop: kubectl trusts the local CA and holds a client certificate of it.
    client_doc = read_yaml(client)
    marker = [{"name": "yubikey-kube-proxy", "extension": {"proxy-config": str(proxy)}}]
    assert client_doc["clusters"][0] == {
        "name": "default",
        "cluster": {
            "server": "https://127.0.0.1:8080",
            "certificate-authority-data": local["client-ca-data"],
            "extensions": marker,
        },
    }
    assert client_doc["contexts"][0] == {
        "name": "default",
        "context": {
            "cluster": "default",
            "user": "default",
            "namespace": "team-a",
            "extensions": marker,
        },
    }
    assert client_doc["users"][0]["name"] == "default"
    assert client_doc["users"][0]["user"]["extensions"] == marker
    local_ca = x509.load_pem_x509_certificate(base64.b64decode(local["client-ca-data"]))
    user = client_doc["users"][0]["user"]
    client_cert = x509.load_pem_x509_certificate(
        base64.b64decode(user["client-certificate-data"])
    )
    assert client_cert.issuer == local_ca.subject
    local_ca.public_key().verify(
        client_cert.signature,
        client_cert.tbs_certificate_bytes,
        ec.ECDSA(hashes.SHA256()),
    )
    server_cert = x509.load_pem_x509_certificate(
        base64.b64decode(local["server-certificate-data"])
    )
    assert server_cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert client_doc["contexts"][0]["context"]["namespace"] == "team-a"
    # status
    code, stdout, stderr = run_cli("status", capsys=capsys)
    assert (code, stderr) == (0, "")
    left = (
        ident.cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    ).days
    assert stdout == (
        f"YubiKey serial 31000001, firmware 5.7.1, reader '{YUBIKEY_READER} 00 00'\n"
        "  PIN tries left: 3\n"
        "  slot 9a: EC P-256 key, imported, PIN policy never, touch policy never\n"
        "    certificate: CN=system:admin,O=system:masters\n"
        "    issuer:      CN=k3s-client-ca\n"
        f"    not after:   {ident.cert.not_valid_after_utc.isoformat()} ({left} days left)\n"
    )


def test_kubectl_reads_the_written_configs(card57, tmp_path, capsys):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity("p256"))
    assert run_cli(*setup_args(source, tmp_path), capsys=capsys)[0] == 0
    for name, server in (
        ("proxy.yml", "https://127.0.0.1:6443"),
        ("client.yml", "https://127.0.0.1:8080"),
    ):
        done = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(tmp_path / name),
                "config",
                "view",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.server} {.contexts[0].context.namespace}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (0, f"{server} team-a"), done.stderr


def test_setup_kubeadm_like_rsa2048_files_on_3des_card(card54, tmp_path, capsys):
    ident = make_identity(
        "rsa2048", subject="CN=kubernetes-admin,O=kubeadm:cluster-admins"
    )
    source = write_kubeconfig(
        tmp_path / "admin.conf", ident, inline=False, namespace=None
    )
    code, stdout, stderr = run_cli(
        *setup_args(source, tmp_path / "o", "--slot", "9c"), capsys=capsys
    )
    assert (code, stderr) == (0, "")
    assert "Imported the RSA-2048 key and certificate (CN=kubernetes-admin," in stdout
    assert card54.slot_key(0x9C).private_numbers() == ident.key.private_numbers()
    assert (
        "namespace"
        not in read_yaml(tmp_path / "o" / "client.yml")["contexts"][0]["context"]
    )
    code, _, stderr = run_cli(
        *setup_args(
            source,
            tmp_path / "o",
            "--slot",
            "9c",
            "--force",
            "--plain-http",
            "--port",
            "8181",
        ),
        capsys=capsys,
    )
    assert (code, stderr) == (
        0,
        f"yubikey-kube-proxy: WARNING: {yk.PLAIN_HTTP_WARNING}\n",
    )
    marker = [
        {
            "name": "yubikey-kube-proxy",
            "extension": {"proxy-config": str(tmp_path / "o" / "proxy.yml")},
        }
    ]
    assert read_yaml(tmp_path / "o" / "client.yml")["clusters"][0]["cluster"] == {
        "server": "http://127.0.0.1:8181",
        "extensions": marker,
    }
    assert read_yaml(tmp_path / "o" / "client.yml")["users"][0]["user"] == {
        "extensions": marker
    }
    extension = read_yaml(tmp_path / "o" / "proxy.yml")["contexts"][0]["context"][
        "extensions"
    ][0]["extension"]
    assert extension == {
        "slot": "9c",
        "listen": "127.0.0.1:8181",
        "serial": 21000002,
        "plain-http": True,
    }
    code, stdout, _ = run_cli("status", "--slot", "9c", "--json", capsys=capsys)
    report = json.loads(stdout)["cards"][0]
    assert code == 0
    assert (report["serial"], report["firmware"], report["pin_tries_left"]) == (
        21000002,
        "5.4.3",
        3,
    )
    assert report["slots"][0]["key"] == {
        "algorithm": "RSA-2048",
        "pin_policy": "never",
        "touch_policy": "never",
        "origin": "imported",
    }
    assert report["slots"][0]["certificate"]["matches_key"] is True
    assert report["slots"][0]["problems"] == []


def test_setup_never_writes_the_private_key_to_a_file(
    card57, tmp_path, capsys, monkeypatch
):
    ident = make_identity("p384")
    source = write_kubeconfig(tmp_path / "k3s.yaml", ident)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    written, recording = [], [True]

    def audit(event, args):  # every file this process opens for writing
        if (
            event != "open"
            or not recording[0]
            or isinstance(args[0], int)
            or "__pycache__" in str(args[0])
        ):
            return  # an int is an already open descriptor (os.fdopen)
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        ):
            written.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: the flag stops it
    try:
        code = yk.main(setup_args(source, tmp_path / "out"))
    finally:
        recording[0] = False
    assert code == 0, capsys.readouterr().err
    assert sorted(Path(p).name for p in written) == sorted(
        f".{name}.{os.getpid()}.partial" for name in ("proxy.yml", "client.yml")
    )
    secrets = [
        pem(ident.key),
        ident.key.private_numbers().private_value.to_bytes(48, "big"),
        b64(pem(ident.key)).encode(),
    ]
    for path in (tmp_path / "out").rglob("*"):
        assert not any(s in path.read_bytes() for s in secrets), path
    assert list((tmp_path / "tmp").iterdir()) == []


def test_occupied_slot_is_refused_without_force(card57, tmp_path, capsys):
    first, second = make_identity("p256"), make_identity("p256")
    assert (
        run_cli(
            *setup_args(write_kubeconfig(tmp_path / "a", first), tmp_path / "o1"),
            capsys=capsys,
        )[0]
        == 0
    )
    source = write_kubeconfig(tmp_path / "b", second)
    code, _, stderr = run_cli(*setup_args(source, tmp_path / "o2"), capsys=capsys)
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: slot 9a of the YubiKey already holds an EC P-256 key "
        "(imported) and a certificate for CN=system:admin,O=system:masters: pass --force "
        "to overwrite it, or choose another --slot\n"
    )
    assert card57.slot_key(0x9A).private_numbers() == first.key.private_numbers()
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path / "o2", "--force"), capsys=capsys
    )
    assert (code, stderr) == (0, "")
    assert card57.slot_key(0x9A).private_numbers() == second.key.private_numbers()


def test_existing_output_files_are_kept_without_force(card57, tmp_path, capsys):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    (tmp_path / "client.yml").write_text("mine\n")
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert code == 1
    assert stderr == (
        f"yubikey-kube-proxy: error: {tmp_path / 'client.yml'} exists already: "
        "pass --force to replace it, or choose another --output-dir or --name\n"
    )
    assert (tmp_path / "client.yml").read_text() == "mine\n"
    assert card57.slot_key(0x9A) is None


def test_wrong_management_key_changes_nothing(card57, tmp_path, capsys):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    wrong = "00" * 24
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--management-key", wrong), capsys=capsys
    )
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: WARNING: --management-key puts the key on the command "
        "line, where other users can see it (ps): use --management-key-file PATH or "
        "YKP_MANAGEMENT_KEY\n"
        "yubikey-kube-proxy: error: the YubiKey rejected the management key: "
        "pass the card's key with --management-key-file PATH or YKP_MANAGEMENT_KEY "
        "(the factory key is the default)\n"
    )
    assert card57.slot_key(0x9A) is None
    assert not (tmp_path / "proxy.yml").exists()
    key_file = tmp_path / "management-key"
    key_file.write_text("00" * 32 + "\n")
    key_file.chmod(0o600)
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--management-key-file", str(key_file)),
        capsys=capsys,
    )
    assert stderr == (
        "yubikey-kube-proxy: error: this YubiKey's management key is AES-192 "
        "(24 bytes) but the key given has 32 bytes: pass the right one with "
        "--management-key-file PATH\n"
    )


def test_mismatched_key_and_certificate_never_reach_the_card(card57, tmp_path, capsys):
    ident, other = make_identity(), make_identity()
    user = {
        "client-certificate-data": b64(pem(ident.cert)),
        "client-key-data": b64(pem(other.key)),
    }
    source = write_kubeconfig(tmp_path / "k3s.yaml", ident, user=user)
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: the client key of user 'default' does not "
        "match its certificate (CN=system:admin,O=system:masters): fix the "
        "kubeconfig so both belong together\n"
    )
    assert card57.apdu_log == []


@pytest.mark.parametrize(
    "user, message",
    [
        (
            {"token": "abc"},
            "user 'default' of context 'default' has no client certificate and "
            "key (it uses a bearer token): yubikey-kube-proxy moves a client-certificate key onto "
            "the card, so pick a context whose user has one with --context",
        ),
        (
            {"client-certificate": "gone.crt", "client-key": "gone.key"},
            "cannot read client-certificate {dir}/gone.crt: No such file or directory; fix "
            "the path in kubeconfig {dir}/k3s.yaml, user 'default'",
        ),
    ],
)
def test_users_without_a_usable_certificate(tmp_path, capsys, user, message):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity(), user=user)
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: {message.format(dir=tmp_path)}\n",
    )


def test_unsupported_key_types(card54, tmp_path, capsys):
    source = write_kubeconfig(tmp_path / "a.yaml", make_identity("p521"))
    code, _, stderr = run_cli(*setup_args(source, tmp_path / "a"), capsys=capsys)
    assert stderr == (
        "yubikey-kube-proxy: error: the client key is an EC secp521r1 key, which "
        "a YubiKey cannot hold: supported are EC P-256, EC P-384, RSA-2048 and "
        "(firmware 5.7+) RSA-3072, RSA-4096 and Ed25519\n"
    )
    source = write_kubeconfig(tmp_path / "b.yaml", make_identity("ed25519"))
    code, _, stderr = run_cli(*setup_args(source, tmp_path / "b"), capsys=capsys)
    assert (code, stderr) == (
        1,
        "yubikey-kube-proxy: error: Ed25519 keys need YubiKey "
        "firmware 5.7.0 or later; this card has 5.4.3\n",
    )
    assert card54.slot_key(0x9A) is None


def test_ed25519_on_firmware_57(card57, tmp_path, capsys):
    ident = make_identity("ed25519")
    source = write_kubeconfig(tmp_path / "a.yaml", ident)
    code, stdout, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert (code, stderr) == (0, "")
    assert stdout.startswith("Imported the Ed25519 key and certificate")
    assert card57.sign_count == 1


# -- PIN ---------------------------------------------------------------------------


def setup_with_pin(
    tmp_path: Path, capsys, policy: str, pin: str
) -> tuple[int, str, str]:
    """setup of a fresh k3s-like identity with a PIN policy and a PIN file."""
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    pins = str(pin_file(tmp_path, pin))
    return run_cli(
        *setup_args(source, tmp_path, "--pin-policy", policy, "--pin-file", pins),
        capsys=capsys,
    )


def pin_file(tmp_path: Path, pin: str) -> Path:
    path = tmp_path / "pin"
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def test_pin_policy_once_verifies_with_the_pin_file(card57, tmp_path, capsys):
    code, _, stderr = setup_with_pin(tmp_path, capsys, "once", "123456")
    assert (code, stderr) == (0, "")
    assert (card57.verify_attempts, card57.sign_count, card57.pin_tries_left) == (
        1,
        1,
        3,
    )
    code, stdout, _ = run_cli("status", "--json", capsys=capsys)
    assert json.loads(stdout)["cards"][0]["slots"][0]["key"]["pin_policy"] == "once"


def test_wrong_pin_costs_exactly_one_try_and_is_not_retried(card57, tmp_path, capsys):
    code, _, stderr = setup_with_pin(tmp_path, capsys, "always", "654321")
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: wrong PIN: the YubiKey has 2 tries left "
        "before it blocks the PIN; check the PIN (or the PIN file) and try "
        "again\n"
    )
    assert (card57.verify_attempts, card57.pin_tries_left, card57.sign_count) == (
        1,
        2,
        0,
    )
    assert not (tmp_path / "proxy.yml").exists()


def test_blocked_pin_says_use_the_puk(card57, tmp_path, capsys):
    card57.pin_tries_left = 0
    code, _, stderr = setup_with_pin(tmp_path, capsys, "once", "123456")
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: the PIN is blocked: unblock it with the PUK "
        "('ykman piv access unblock-pin' or 'yubico-piv-tool -a unblock-pin')\n"
    )
    code, stdout, _ = run_cli("status", "--json", capsys=capsys)
    assert json.loads(stdout)["cards"][0]["pin_tries_left"] == 0


def test_pin_needed_without_terminal_or_file(card57, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--pin-policy", "once"), capsys=capsys
    )
    assert code == 1
    assert stderr == (
        "yubikey-kube-proxy: error: the YubiKey serial 31000001 (firmware 5.7.1) in reader "
        f"'{YUBIKEY_READER} 00 00', slot 9a needs its PIN and there is no terminal to ask "
        "on: pass --pin-file PATH\n"
    )
    assert card57.verify_attempts == 0


def test_apdu_trace_never_shows_pin_or_management_key(card57, tmp_path, capsys):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    code, _, stderr = run_cli(
        *setup_args(
            source,
            tmp_path,
            "-vv",
            "--pin-policy",
            "once",
            "--pin-file",
            str(pin_file(tmp_path, "123456")),
        ),
        capsys=capsys,
    )
    assert code == 0
    assert "APDU > 00a40400 05a00000030800\n" in stderr  # the trace is on
    assert "APDU > 00200080 <redacted>\n" in stderr
    assert "APDU > 00fe119a <redacted>\n" in stderr
    assert "313233343536" not in stderr  # the PIN in hex
    assert "APDU < <redacted> 9000\n" in stderr  # management-key answers
    assert yk.DEFAULT_MANAGEMENT_KEY.hex() not in stderr


# -- status problems ---------------------------------------------------------------


def test_status_empty_slot_fails(card57, capsys):
    code, stdout, _ = run_cli("status", capsys=capsys)
    assert code == 1
    assert stdout.endswith(
        "  slot 9a: no key information\n"
        "    error: slot 9a is empty: run 'yubikey-kube-proxy setup'\n"
    )


def test_a_key_born_on_the_card_without_its_certificate_needs_enroll(
    card57, tmp_path, capsys
):
    slot = yk.parse_slot("9a")
    with contextlib.closing(yk.open_card()) as yubikey, yubikey.session() as piv:
        piv.authenticate(DEFAULT_MGMT_KEY)
        piv.generate_key(
            slot, yk.KeyAlgorithm.ECCP256, yk.PinPolicy.NEVER, yk.TouchPolicy.NEVER
        )
    code, stdout, _ = run_cli("status", capsys=capsys)
    assert code == 1
    assert stdout.endswith(
        "    error: slot 9a holds a key but no certificate: "
        "run 'yubikey-kube-proxy enroll --force'\n"
    )
    cluster = start_cluster(tmp_path)
    try:
        setup = setup_args(cluster.kubeconfig, tmp_path / "yk", "--slot", "9c")
        assert run_cli(*setup, capsys=capsys)[0] == 0
        proxy_yml = str(tmp_path / "yk" / "proxy.yml")
        code, _, stderr = run_cli(
            "proxy", "--kubeconfig", proxy_yml, "--slot", "9a", capsys=capsys
        )
    finally:
        cluster.api.stop()
    assert (code, stderr) == (
        1,
        "yubikey-kube-proxy: error: slot 9a of the YubiKey holds no certificate: "
        "run 'yubikey-kube-proxy enroll --force'\n",
    )
    # A certificate of another key in that slot: the same advice.
    stranger = new_key("p256")
    other = make_cert(stranger, stranger, "CN=someone", "CN=someone")
    with contextlib.closing(yk.open_card()) as yubikey, yubikey.session() as piv:
        piv.authenticate(DEFAULT_MGMT_KEY)
        piv.put_certificate(slot, other.public_bytes(serialization.Encoding.DER))
    code, stdout, _ = run_cli("status", capsys=capsys)
    assert code == 1
    assert (
        "    error: the certificate does not belong to the key in the slot: "
        "run 'yubikey-kube-proxy enroll --force'\n"
    ) in stdout


def test_status_expired_and_expiring_certificates(card57, tmp_path, capsys):
    expired = make_identity(days=-2)
    source = write_kubeconfig(tmp_path / "old.yaml", expired)
    code, _, stderr = run_cli(*setup_args(source, tmp_path / "o"), capsys=capsys)
    assert code == 0
    assert stderr == (
        "yubikey-kube-proxy: WARNING: the client certificate expired on "
        f"{expired.cert.not_valid_after_utc.date()}: the cluster will refuse it\n"
    )
    code, stdout, _ = run_cli("status", capsys=capsys)
    assert code == 1
    assert stdout.endswith(
        f"    error: the certificate expired on {expired.cert.not_valid_after_utc:%Y-%m-%d}: "
        "renew it and run 'yubikey-kube-proxy setup --force'\n"
    )
    soon = make_identity(days=10)
    source = write_kubeconfig(tmp_path / "soon.yaml", soon)
    assert (
        run_cli(*setup_args(source, tmp_path / "p", "--force"), capsys=capsys)[0] == 0
    )
    code, stdout, _ = run_cli("status", capsys=capsys)
    assert code == 0
    assert stdout.endswith(
        "    warning: the certificate expires in 9 days "
        f"({soon.cert.not_valid_after_utc:%Y-%m-%d}): renew it soon\n"
    )


# -- cross-checks with an independent PIV client: yubico-piv-tool -----------------


def piv_tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["yubico-piv-tool", "-r", "YubiKey OTP+FIDO+CCID 00 00", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_yubico_piv_tool_reads_what_setup_imported(card54, tmp_path, capsys):
    ident = make_identity("rsa2048")
    source = write_kubeconfig(tmp_path / "k3s.yaml", ident)
    assert run_cli(*setup_args(source, tmp_path), capsys=capsys)[0] == 0
    done = piv_tool("-a", "read-certificate", "-s", "9a")
    assert done.returncode == 0, done.stderr
    assert done.stdout.encode() == pem(ident.cert)


def test_our_signing_uses_a_key_imported_by_yubico_piv_tool(card54, tmp_path):
    ident = make_identity("p256")
    (tmp_path / "key.pem").write_bytes(
        ident.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "cert.pem").write_bytes(pem(ident.cert))
    for action, file in (("import-key", "key.pem"), ("import-certificate", "cert.pem")):
        done = piv_tool("-a", action, "-s", "9d", "-i", str(tmp_path / file))
        assert done.returncode == 0, done.stderr
    card = yk.open_card()
    try:
        with card.session() as piv:
            der = piv.get_certificate(yk.SLOTS["9d"])
            piv.verify_pin("123456")  # 9d's default PIN policy is "once"
            signature = yk.sign_message(
                piv, yk.SLOTS["9d"], yk.KeyAlgorithm.ECCP256, b"hello"
            )
    finally:
        card.close()
    assert der == ident.cert.public_bytes(serialization.Encoding.DER)
    ident.cert.public_key().verify(signature, b"hello", ec.ECDSA(hashes.SHA256()))


# -- more algorithms, slots, management keys ---------------------------------------


@pytest.mark.parametrize(
    "mgmt_algorithm, key_kind, slot, algorithm_name",
    [
        (0x08, "rsa3072", "82", "RSA-3072"),
        (0x0C, "rsa4096", "95", "RSA-4096"),
        (0x0A, "p384", "9e", "EC P-384"),
    ],
)
def test_aes_management_keys_big_rsa_and_retired_slots(
    cards, tmp_path, capsys, monkeypatch, mgmt_algorithm, key_kind, slot, algorithm_name
):
    mgmt_key = os.urandom(yk.MANAGEMENT_KEY_SIZES[yk.KeyAlgorithm(mgmt_algorithm)])
    piv = VirtualPiv(
        version=(5, 7, 1),
        serial=51000005,
        mgmt_algorithm=mgmt_algorithm,
        mgmt_key=mgmt_key,
    )
    cards(piv)
    ident = make_identity(key_kind)
    source = write_kubeconfig(tmp_path / "k.yaml", ident)
    monkeypatch.setenv("YKP_MANAGEMENT_KEY", mgmt_key.hex())
    code, stdout, stderr = run_cli(
        *setup_args(source, tmp_path, "--slot", slot), capsys=capsys
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith(f"Imported the {algorithm_name} key and certificate")
    assert piv.slot_key(int(slot, 16)).private_numbers() == ident.key.private_numbers()
    code, stdout, _ = run_cli("status", "--slot", slot, "--json", capsys=capsys)
    report = json.loads(stdout)["cards"][0]["slots"][0]
    assert (code, report["slot"], report["key"]["algorithm"]) == (
        0,
        slot,
        algorithm_name,
    )
    assert report["certificate"]["matches_key"] is True


def test_touch_policy_asks_for_a_touch(cards, tmp_path, capsys):
    touches = []
    piv = VirtualPiv(serial=61000006, touch=lambda slot: touches.append(slot) or True)
    cards(piv)
    source = write_kubeconfig(tmp_path / "k.yaml", make_identity())
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--touch-policy", "cached"), capsys=capsys
    )
    assert (code, stderr) == (0, "Touch your YubiKey now to prove the import...\n")
    assert touches == [0x9A]
    code, stdout, _ = run_cli("status", "--json", capsys=capsys)
    assert json.loads(stdout)["cards"][0]["slots"][0]["key"]["touch_policy"] == "cached"


def test_encrypted_key_and_missing_cluster(tmp_path, capsys):
    ident = make_identity()
    encrypted = ident.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    user = {
        "client-certificate-data": b64(pem(ident.cert)),
        "client-key-data": b64(encrypted),
    }
    source = write_kubeconfig(tmp_path / "k.yaml", ident, user=user)
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: the client key of user 'default' in {source} "
        "is encrypted with a passphrase: decrypt it first (openssl "
        "pkey -in KEY) and keep the plain copy off disk\n",
    )
    doc = yaml.safe_load(source.read_text())
    doc["clusters"] = []
    source.write_text(yaml.safe_dump(doc))
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: context 'default' names cluster "
        f"'default', which is not in {source}: fix the kubeconfig\n",
    )


# -- secrets off the command line -----------------------------------------------------


def secret_file(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(0o600)
    return path


def management_key_attempts(piv: VirtualPiv) -> int:
    """GENERAL AUTHENTICATE commands for the management key (9B) the card saw."""
    return sum(
        1 for apdu in piv.apdu_log if apdu[1] == INS_AUTHENTICATE and apdu[3] == 0x9B
    )


def test_management_key_from_a_file_the_environment_or_a_prompt(
    cards, tmp_path, capsys, monkeypatch
):
    key = bytes(range(32))
    piv = VirtualPiv(serial=42000015, mgmt_algorithm=ALG_AES256, mgmt_key=key)
    cards(piv)
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    out = tmp_path / "out"

    def setup(*extra: str) -> tuple[int, str, str]:
        return run_cli(*setup_args(source, out, "--force", *extra), capsys=capsys)

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal
    assert setup() == (
        1,
        "",
        f"{ERROR}the YubiKey's management key is not the factory key and there is "
        "no terminal to ask on: pass --management-key-file PATH or set "
        "YKP_MANAGEMENT_KEY\n",
    )
    assert (management_key_attempts(piv), piv.slot_key(0x9A)) == (0, None)
    for content in (key.hex() + " \n", "\t" + key.hex(), key.hex() + "\n\n"):
        path = secret_file(tmp_path, "mk", content)
        assert setup("--management-key-file", str(path))[2] == (
            f"{ERROR}the management-key file {path} has whitespace around the "
            "secret, extra lines or control characters: write just the key in hex "
            "into it, with at most one newline at the end\n"
        )
    path = secret_file(tmp_path, "mk", "zz" * 32 + "\n")
    assert setup("--management-key-file", str(path))[2] == (
        f"{ERROR}the management-key file {path} is not a management key: write 32, "
        "48 or 64 hex digits (16, 24 or 32 bytes)\n"
    )
    assert (management_key_attempts(piv), piv.slot_key(0x9A)) == (0, None)
    path = secret_file(tmp_path, "mk", key.hex() + "\n")
    code, _, stderr = setup("--management-key-file", str(path))
    assert (code, stderr) == (0, "")
    assert piv.slot_key(0x9A) is not None
    monkeypatch.setenv("YKP_MANAGEMENT_KEY", key.hex())
    assert setup()[::2] == (0, "")
    monkeypatch.delenv("YKP_MANAGEMENT_KEY")
    prompts = []
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(
        yk.getpass, "getpass", lambda prompt: prompts.append(prompt) or key.hex()
    )
    assert setup()[::2] == (0, "")
    assert prompts == [
        "Management key (hex) of YubiKey serial 42000015 (firmware 5.7.1) in "
        f"reader '{YUBIKEY_READER} 00 00': "
    ]
    code, _, stderr = setup("--management-key", key.hex())
    assert (code, stderr) == (
        0,
        "yubikey-kube-proxy: WARNING: --management-key puts the key on the "
        "command line, where other users can see it (ps): use "
        "--management-key-file PATH or YKP_MANAGEMENT_KEY\n",
    )
    assert key.hex() not in stderr
    with pytest.raises(SystemExit) as usage:
        setup("--management-key", key.hex(), "--management-key-file", str(path))
    assert usage.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_factory_key_is_used_without_asking_while_the_card_has_it(
    card54, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(yk.getpass, "getpass", lambda prompt: pytest.fail(prompt))
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    code, _, stderr = run_cli(*setup_args(source, tmp_path), capsys=capsys)
    assert (code, stderr) == (0, "")
    assert management_key_attempts(card54) == 2  # witness and challenge, once


@pytest.mark.parametrize(
    "content",
    ["123456 \n", " 123456\n", "123456\n\n", "123456\t\n", "123\x00456\n"],
    ids=["trailing space", "leading space", "two newlines", "tab", "NUL"],
)
def test_pin_file_whitespace_is_refused_before_the_card_sees_it(
    card57, tmp_path, capsys, content
):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    pins = secret_file(tmp_path, "pin", content)
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--pin-policy", "once", "--pin-file", str(pins)),
        capsys=capsys,
    )
    assert (code, stderr) == (
        1,
        f"{ERROR}the PIN file {pins} has whitespace around the secret, extra lines "
        "or control characters: write just the PIN into it, with at most one "
        "newline at the end\n",
    )
    assert (card57.verify_attempts, card57.pin_tries_left) == (0, 3)
    assert (card57.slot_key(0x9A), card57.sign_count) == (None, 0)


@pytest.mark.parametrize("content", ["123456\n", "123456", "123456\r\n"])
def test_pin_file_with_one_newline_or_none(card57, tmp_path, capsys, content):
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    pins = secret_file(tmp_path, "pin", content)
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path, "--pin-policy", "once", "--pin-file", str(pins)),
        capsys=capsys,
    )
    assert (code, stderr) == (0, "")
    assert (card57.verify_attempts, card57.pin_tries_left, card57.sign_count) == (
        1,
        3,
        1,
    )


# -- key types we do not know, in a slot ----------------------------------------------


def test_unknown_key_types_in_a_slot_are_named(cards, tmp_path, capsys):
    piv = VirtualPiv(serial=44000017)
    cards(piv)
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    assert run_cli(*setup_args(source, tmp_path), capsys=capsys)[0] == 0
    # another tool replaces the key, leaving the certificate: X25519 (0xE1)
    piv.install_key(0x9A, x25519.X25519PrivateKey.generate(), ALG_X25519)
    piv.install_key(0x9C, x25519.X25519PrivateKey.generate(), 0x42)
    code, stdout, stderr = run_cli("status", "--slot", "9a", "--json", capsys=capsys)
    slot = json.loads(stdout)["cards"][0]["slots"][0]
    assert (code, stderr, slot["key"]["algorithm"]) == (1, "", "X25519")
    assert slot["certificate"]["matches_key"] is False
    assert [p["message"] for p in slot["problems"]] == [
        "slot 9a holds an X25519 key, which cannot sign TLS handshakes: replace it "
        "('yubikey-kube-proxy setup --force') or choose another --slot",
        "the certificate does not belong to the key in the slot: run "
        "'yubikey-kube-proxy setup --force'",
    ]
    code, stdout, stderr = run_cli("status", "--slot", "9c", capsys=capsys)
    assert (code, stderr) == (1, "")
    assert (
        "  slot 9c: 0x42 key, generated on card, PIN policy never, touch policy "
        "never\n    error: slot 9c holds a key of unknown type 0x42, which cannot "
        "sign TLS handshakes: replace it ('yubikey-kube-proxy setup --force') or "
        "choose another --slot\n    error: slot 9c holds a key but no certificate: "
        "run 'yubikey-kube-proxy setup --force'\n"
    ) in stdout
    code, _, stderr = run_cli(
        "proxy", "--kubeconfig", str(tmp_path / "proxy.yml"), capsys=capsys
    )
    assert (code, stderr) == (
        1,
        f"{ERROR}slot 9a holds an X25519 key, which cannot sign TLS handshakes: "
        "replace it ('yubikey-kube-proxy setup --force') or choose another --slot\n",
    )
    code, _, stderr = run_cli(
        *setup_args(source, tmp_path / "again", "--slot", "9c"), capsys=capsys
    )
    assert (code, stderr) == (
        1,
        f"{ERROR}slot 9c of the YubiKey already holds a key of unknown type 0x42 "
        "(generated on card): pass --force to overwrite it, or choose another "
        "--slot\n",
    )
    assert piv.sign_count == 1  # setup's proof only


# -- many clusters: names, merge and unmerge -------------------------------------------


def kubectl_with(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    """kubectl as a user runs it, KUBECONFIG from the environment."""
    return subprocess.run(
        ["kubectl", "--request-timeout", "30s", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": kubeconfig},
    )


def whoami(kubeconfig: str, *args: str) -> str:
    done = kubectl_with(kubeconfig, "auth", "whoami", "-o", "json", *args)
    assert done.returncode == 0, done.stderr
    review = json.loads(done.stdout)
    assert review["kind"] == "SelfSubjectReview"
    return review["status"]["userInfo"]["username"]


def entry_names(doc: dict) -> list[list[str]]:
    return [
        [e["name"] for e in doc[kind]] for kind in ("clusters", "contexts", "users")
    ]


OTHER_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [
        {"name": "other", "cluster": {"server": "https://other.example:6443"}}
    ],
    "contexts": [{"name": "other", "context": {"cluster": "other", "user": "other"}}],
    "current-context": "other",
    "users": [{"name": "other", "user": {"token": "other-token"}}],
    "preferences": {},
}


def test_two_clusters_two_cards_merged_three_ways_each_its_own_identity(
    cards, clusters, proxies, tmp_path, capsys, monkeypatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    config = home / ".kube" / "config"
    config.parent.mkdir(parents=True)
    original = yaml.safe_dump(OTHER_KUBECONFIG, sort_keys=False)
    config.write_text(original)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    alpha = clusters(tmp_path / "a", subject="CN=alice,O=team-alpha")
    beta = clusters(tmp_path / "b", subject="CN=bob,O=team-beta")
    piv_a, piv_b = VirtualPiv(serial=11100001), VirtualPiv(serial=11100002)
    cards(piv_a, 0), cards(piv_b, 1)
    started: list[ProxyProcess] = []
    port = free_port_pair()  # not 8080 and 8081: CI's machine may use them
    # Both source kubeconfigs call their context 'default': --name tells them apart.
    code, stdout, stderr = run_cli(
        "setup", "--kubeconfig", str(alpha.kubeconfig), "--name", "alpha",
        "--serial", "11100001", "--port", str(port), "--merge", capsys=capsys,
    )  # fmt: skip
    assert (code, stderr) == (0, "")
    assert (
        f"Merged context, cluster and user 'alpha' into {config} (current-context "
        f"unchanged; a file that was there is kept as {config}.bak); "
        "'yubikey-kube-proxy unmerge alpha' removes them.\n"
    ) in stdout
    after_alpha = config.read_text()
    code, stdout, stderr = run_cli(
        "setup", "--kubeconfig", str(beta.kubeconfig), "--name", "beta",
        "--serial", "11100002", "--slot", "9c", "--port", str(port + 1),
        "--merge", str(config), "--use-context", capsys=capsys,
    )  # fmt: skip
    assert (code, stderr) == (0, "")
    assert "  2. kubectl --context beta get nodes\n" in stdout
    folders = {n: home / ".kube" / "yubikey" / n for n in ("alpha", "beta")}
    servers = {
        n: read_yaml(f / "client.yml")["clusters"][0]["cluster"]["server"]
        for n, f in folders.items()
    }
    assert servers == {
        "alpha": f"https://127.0.0.1:{port}",
        "beta": f"https://127.0.0.1:{port + 1}",
    }
    # The merged kubeconfig: the other entries and their order kept, 0600, backup.
    merged = read_yaml(config)
    assert entry_names(merged) == [["other", "alpha", "beta"]] * 3
    assert merged["current-context"] == "beta"
    for kind in ("clusters", "contexts", "users"):
        assert merged[kind][0] == OTHER_KUBECONFIG[kind][0]
    client_beta = read_yaml(folders["beta"] / "client.yml")
    for kind in ("clusters", "users"):
        assert merged[kind][2] == client_beta[kind][0]
    context = copy.deepcopy(client_beta["contexts"][0])
    context["context"]["extensions"][0]["extension"].update(
        {"previous-current-context": "other"}
    )
    assert merged["contexts"][2] == context
    assert context["context"]["extensions"][0]["extension"] == {
        "proxy-config": str(folders["beta"] / "proxy.yml"),
        "previous-current-context": "other",
    }
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert (home / ".kube" / "config.bak").read_text() == after_alpha
    assert stat.S_IMODE((home / ".kube" / "config.bak").stat().st_mode) == 0o600
    # status with a proxy.yml reports that proxy's card and slot only.
    code, stdout, _ = run_cli(
        "status", "--kubeconfig", str(folders["beta"] / "proxy.yml"), "--json",
        capsys=capsys,
    )  # fmt: skip
    report = json.loads(stdout)["cards"]
    assert code == 0
    assert [(r["serial"], [s["slot"] for s in r["slots"]]) for r in report] == [
        (11100002, ["9c"])
    ]
    assert report[0]["slots"][0]["certificate"]["subject"] == "CN=bob,O=team-beta"
    signed = (piv_a.sign_count, piv_b.sign_count)
    for name, listen in (("alpha", port), ("beta", port + 1)):
        started.append(proxies(folders[name], "--listen", f"127.0.0.1:{listen}"))
    sides = f"{folders['alpha'] / 'client.yml'}:{folders['beta'] / 'client.yml'}"
    assert [
        whoami(sides, "--context", "alpha"),  # 1. side files in KUBECONFIG
        whoami(sides, "--context", "beta"),
        whoami(sides),  # the first file's current-context
        whoami(str(config), "--context", "alpha"),  # 2. merged, other entries
        whoami(str(config)),  # 3. --use-context made beta current
    ] == ["alice", "bob", "alice", "alice", "bob"]
    reviews = {
        name: [r.client_subject for r in api.requests if "selfsubjectreviews" in r.path]
        for name, api in (("alpha", alpha.api), ("beta", beta.api))
    }
    assert reviews == {
        "alpha": ["CN=alice,O=team-alpha"] * 3,
        "beta": ["CN=bob,O=team-beta"] * 2,
    }
    assert (piv_a.sign_count - signed[0], piv_b.sign_count - signed[1]) == (
        alpha.api.handshakes,
        beta.api.handshakes,
    )
    for proxy in started:
        proxy.stop()
    # Merging again replaces the entries in place, keeps what --use-context
    # replaced, and the same client.yml merged twice changes no byte.
    code, _, stderr = run_cli(
        "setup", "--kubeconfig", str(beta.kubeconfig), "--name", "beta",
        "--serial", "11100002", "--slot", "9c", "--port", str(port + 1),
        "--force", "--merge", "--use-context", capsys=capsys,
    )  # fmt: skip
    assert (code, stderr) == (0, "")
    again = read_yaml(config)
    assert entry_names(again) == [["other", "alpha", "beta"]] * 3
    assert (
        again["contexts"][2]["context"]["extensions"][0]["extension"][
            "previous-current-context"
        ]
        == "other"
    )
    before = config.read_bytes()
    yk.merge_client(config, read_yaml(folders["beta"] / "client.yml"), True)
    assert config.read_bytes() == before
    # An entry of that name that we did not write is never replaced.
    signed = piv_a.sign_count
    code, _, stderr = run_cli(
        "setup", "--kubeconfig", str(alpha.kubeconfig), "--name", "other",
        "--serial", "11100001", "--force", "--merge", capsys=capsys,
    )  # fmt: skip
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: {config} already has a cluster named 'other' "
        "that yubikey-kube-proxy did not write: choose another --name\n",
    )
    assert config.read_bytes() == before and piv_a.sign_count == signed
    assert not (home / ".kube" / "yubikey" / "other").exists()
    # unmerge removes exactly what merge added.
    for name in ("alpha", "beta"):
        code, stdout, stderr = run_cli("unmerge", name, capsys=capsys)
        assert (code, stderr) == (0, "")
        assert stdout == (
            f"Removed {name!r} (cluster, context, user) from {config} "
            f"(the previous file is {config}.bak).\n"
        )
    assert config.read_text() == original
    code, _, stderr = run_cli("unmerge", "beta", capsys=capsys)
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: {config} has no context, cluster or user named "
        "'beta' that yubikey-kube-proxy merged: check the name (kubectl config "
        "get-contexts)\n",
    )


@pytest.mark.parametrize(
    "context, name, shown",
    [
        ("arn:aws:eks:eu-west-1:123456789012:cluster/prod", None, "the context"),
        ("default", "a b", "--name"),
        ("default", "../escape", "--name"),
    ],
)
def test_names_that_cannot_be_used_are_refused(
    tmp_path, capsys, monkeypatch, context, name, shown
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity("p256"))
    doc = read_yaml(source)
    doc["contexts"][0]["name"] = doc["current-context"] = context
    source.write_text(yaml.safe_dump(doc))
    extra = ["--name", name] if name else []
    code, _, stderr = run_cli(
        "setup", "--kubeconfig", str(source), *extra, capsys=capsys
    )
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: {shown} {name or context!r} cannot name the "
        "kubeconfig context and the folder ~/.kube/yubikey/NAME: pass --name with "
        "letters, digits, '.', '_' and '-' (up to 63, starting with a letter or digit)\n",
    )
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        (
            "clusters: {}\n",
            "kubeconfig {path}: clusters is a mapping, not a list: write a list (lines "
            "starting with '- ')",
        ),
        (
            "clusters: [\n",
            "kubeconfig {path} is not valid YAML at line 2: fix or replace the file",
        ),
    ],
)
def test_merge_target_that_is_not_a_kubeconfig_is_refused_before_the_card(
    tmp_path, capsys, monkeypatch, target, message
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "first"
    path.write_text(target)
    monkeypatch.setenv("KUBECONFIG", f"{path}{os.pathsep}{tmp_path / 'second'}")
    assert yk.merge_target("") == path  # --merge alone: $KUBECONFIG's first file
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity("p256"))
    code, _, stderr = run_cli(
        "setup", "--kubeconfig", str(source), "--merge", capsys=capsys
    )
    assert (code, stderr) == (
        1,
        f"yubikey-kube-proxy: error: {message.format(path=path)}\n",
    )
    assert path.read_text() == target and not (tmp_path / "home").exists()


def test_default_port_is_the_first_no_other_proxy_yml_uses(tmp_path):
    root = tmp_path / "yubikey"
    for name, listen in (("a", "127.0.0.1:8080"), ("b", "127.0.0.1:8081")):
        (root / name).mkdir(parents=True)
        doc = yk.proxy_kubeconfig(
            yk.KubeContext(
                name,
                yk.Named("c", {"server": "https://127.0.0.1:6443"}, root),
                yk.Named("u", {}, root),
                None,
                {},
                [],
            ),
            {"slot": "9a", "listen": listen},
        )
        (root / name / "proxy.yml").write_text(yaml.safe_dump(doc))
    (root / "broken").mkdir()
    (root / "broken" / "proxy.yml").write_text("clusters: [\n")  # skipped
    assert yk.free_port_beside(root / "new") == 8082
    assert yk.free_port_beside(root / "a") == 8080  # setup --force in its own folder


# =============================================================================
# 4. proxy: kubectl through the proxy and the card; the API server verified before the
# card signs (Go parity); the local hop
# =============================================================================


def test_kubectl_get_version_one_handshake_and_signature_per_request(
    proxied, cluster, card57
):
    signed_before = card57.sign_count  # setup's proof
    done = kubectl(proxied, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gitVersion"] == "v1.32.0"
    for _ in range(2):
        assert kubectl(proxied, "get", "--raw", "/version").returncode == 0
    requests = list(cluster.api.requests)
    # The installed kubectl may be a dispatcher that asks /version?timeout=5s first.
    ours = "/version?timeout=30s"  # --request-timeout 30s
    assert [r["path"] for r in requests if r["path"] == ours] == [ours] * 3
    assert {r["path"] for r in requests} <= {ours, "/version?timeout=5s"}
    assert cluster.api.handshakes == len(requests)
    assert card57.sign_count - signed_before == len(requests)
    assert {r["client_subject"] for r in requests} == {
        "CN=system:admin,O=system:masters"
    }
    assert {r["headers"]["host"] for r in requests} == {f"127.0.0.1:{cluster.api.port}"}
    version_size = len(json.dumps(cluster.api.version_info, separators=(",", ":")))
    assert re.search(
        rf"INFO: GET /version\?timeout=30s 200 {version_size} bytes "
        r"[0-9.]+ ms \(card [0-9.]+ ms\)\n",
        proxied.stderr(),
    ), proxied.stderr()


def test_kubectl_get_nodes_pods_create_delete(proxied, cluster, card57, tmp_path):
    done = kubectl(proxied, "get", "nodes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:2] == ["NAME", "STATUS"]
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == list(
        NODE_NAMES
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
    }
    (tmp_path / "pod.json").write_text(json.dumps(pod))
    done = kubectl(proxied, "create", "-f", str(tmp_path / "pod.json"))
    assert (done.returncode, done.stdout) == (0, "pod/web created\n"), done.stderr
    created = [r for r in cluster.api.requests if r["method"] == "POST"]
    assert created[-1]["path"].startswith("/api/v1/namespaces/team-a/pods")
    done = kubectl(proxied, "get", "pods", "-o", "name")
    assert (done.returncode, done.stdout) == (0, "pod/web\n"), done.stderr
    done = kubectl(proxied, "delete", "pod", "web", "--wait=false")
    assert (done.returncode, done.stdout) == (0, 'pod "web" deleted\n'), done.stderr
    assert card57.sign_count - 1 == cluster.api.handshakes


def test_kubectl_watch_sees_events_as_they_happen(proxied, cluster):
    cluster.api.add_pod("first", namespace="team-a")
    watch = subprocess.Popen(
        [
            "kubectl",
            "--kubeconfig",
            str(proxied.client_config),
            "get",
            "pods",
            "-w",
            "--no-headers",
            "-o",
            "custom-columns=NAME:.metadata.name",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout.readline() == "first\n"
        wait_until(
            lambda: any("watch=" in r["path"] for r in cluster.api.requests),
            20,
            "the watch request",
        )
        for name in ("second", "third"):
            cluster.api.add_pod(name, namespace="team-a")
            assert (
                watch.stdout.readline() == f"{name}\n"
            )  # arrives while the watch is open
    finally:
        watch.terminate()
        watch.wait(10)


def test_kubectl_logs_follow_streams_lines(proxied, cluster):
    cluster.api.add_pod("app", namespace="team-a")
    cluster.api.append_log("app", "line one", namespace="team-a")
    logs = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(proxied.client_config), "logs", "-f", "app"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert logs.stdout.readline() == "line one\n"
        cluster.api.append_log("app", "line two", namespace="team-a")
        assert logs.stdout.readline() == "line two\n"
        cluster.api.close_logs()
        assert logs.wait(20) == 0
    finally:
        if logs.poll() is None:
            logs.kill()


@pytest.mark.parametrize("websockets", ["true", "false"])
def test_kubectl_exec_stdin_echo(proxied, cluster, websockets):
    cluster.api.add_pod("shell", namespace="team-a")
    text = "hello through the card\n" + "x" * 300_000 + "\nend\n"
    done = kubectl(
        proxied,
        "exec",
        "-i",
        "shell",
        "--",
        "cat",
        input=text,
        env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == text
    upgrade = [r for r in cluster.api.requests if "/exec" in r["path"]][-1]
    expected = "websocket" if websockets == "true" else "spdy/3.1"
    assert upgrade["headers"]["upgrade"].lower() == expected


def test_large_response_arrives_intact(proxied, cluster):
    size = 20_000_000
    done = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(proxied.client_config),
            "get",
            "--raw",
            f"/bytes?n={size}",
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == size
    assert done.stdout == expected_bytes(size)


def expected_bytes(n: int) -> bytes:
    """What /bytes serves: byte i is i % 256."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def test_fast_x25519_matches_rfc_7748_and_tlslite():
    from tlslite.utils.x25519 import x25519 as pure_python

    scalar = bytes.fromhex(
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"
    )
    point = bytes.fromhex(
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"
    )
    assert yk.fast_x25519(scalar, point) == bytes.fromhex(
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    )  # RFC 7748 5.2
    for _ in range(3):
        scalar = os.urandom(32)
        public = yk.fast_x25519(scalar, yk.X25519_BASE_POINT)
        assert public == pure_python(bytearray(scalar), bytearray(yk.X25519_BASE_POINT))
        assert yk.fast_x25519(os.urandom(32), public) != bytearray(32)
    assert yk.fast_x25519(scalar, bytes(32)) == bytearray(
        32
    )  # low order: tlslite refuses


def test_fast_aead_is_the_record_layer_in_use(card57, cluster, tmp_path, capsys):
    code = yk.main(
        [
            "setup",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    args = yk.ProxyOptions.from_args(
        yk.build_parser().parse_args(
            ["proxy", "--kubeconfig", str(tmp_path / "proxy.yml")]
        )
    )
    settings = yk.proxy_settings(args)
    card = yk.open_card()
    try:
        upstream = yk.build_upstream(settings, card, args)
        for _versions in (("1.2",), ("1.3",)):
            sock = upstream.connect()
            try:
                from tlslite import keyexchange

                assert keyexchange.x25519 is yk.fast_x25519
                assert sock.conn.getCipherImplementation() == "cryptography"
                assert sock.conn.getCipherName() in (
                    "aes128gcm",
                    "aes256gcm",
                    "chacha20-poly1305",
                )
            finally:
                sock.release()
    finally:
        card.close()


@pytest.mark.parametrize(
    "versions, kind",
    [
        (("1.2",), "p256"),
        (("1.3",), "p256"),
        (("1.2",), "rsa2048"),
        (("1.3",), "rsa2048"),
        (("1.3",), "p384"),
    ],
)
def test_tls_versions_and_key_types(
    card57, clusters, proxies, tmp_path, capsys, versions, kind
):
    cluster = clusters(tmp_path, kind=kind, tls_versions=versions)
    proxy = proxies.setup(cluster, tmp_path / "yk")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    record = cluster.api.requests[-1]
    assert record["tls_version"] == {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[versions[0]]
    assert record["alpn"] == "http/1.1"


def test_path_prefix_is_kept(card57, clusters, proxies, tmp_path, capsys):
    cluster = clusters(tmp_path, path_prefix="/k8s/clusters/c1")
    proxy = proxies.setup(cluster, tmp_path / "yk")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    assert cluster.api.requests[-1]["path"] == "/k8s/clusters/c1/version?timeout=30s"


# -- the API server is verified before the card signs ------------------------------


def status_error(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_mitm_server_gets_zero_signatures(card57, clusters, proxies, tmp_path, capsys):
    # The proxy's kubeconfig trusts one CA; the server presents a certificate of another.
    cluster = clusters(tmp_path)
    impostor_ca, _, _ = make_server_pki()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = b64(pem(impostor_ca))
    cluster.kubeconfig.write_text(yaml.safe_dump(doc))
    proxy = proxies.setup(cluster, tmp_path / "yk")
    signed = card57.sign_count
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 1
    assert status_error(done) == (
        "Error from server (BadGateway): the API server at 127.0.0.1:"
        f"{cluster.api.port} presented a certificate we do not trust for "
        "'127.0.0.1' (it is not signed by the cluster's CA): check the server URL, "
        "certificate-authority and tls-server-name in the kubeconfig"
    )
    assert card57.sign_count == signed
    assert cluster.api.requests == []


def test_wrong_host_name_gets_zero_signatures(
    card57, clusters, proxies, tmp_path, capsys
):
    cluster = clusters(tmp_path, **{"tls-server-name": "kubernetes.default"})
    proxy = proxies.setup(cluster, tmp_path / "yk")
    signed = card57.sign_count
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 1
    assert (
        "presented a certificate we do not trust for 'kubernetes.default' "
        "(leaf certificate has no matching subjectAltName)"
    ) in status_error(done)
    assert card57.sign_count == signed


def test_expired_server_certificate_is_refused(
    card57, clusters, proxies, tmp_path, capsys
):
    cluster = clusters(tmp_path, server_pki=make_server_pki(days=-1))
    proxy = proxies.setup(cluster, tmp_path / "yk")
    signed = card57.sign_count
    done = kubectl(proxy, "get", "--raw", "/version")
    assert "(it expired on " in status_error(done)
    assert card57.sign_count == signed


def test_client_certificate_rejected_by_the_server(
    card57, clusters, proxies, tmp_path, capsys
):
    cluster = clusters(tmp_path)
    # A client certificate from a CA the API server does not know.
    other = make_identity()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    doc["users"][0]["user"] = {
        "client-certificate-data": b64(pem(other.cert)),
        "client-key-data": b64(pem(other.key)),
    }
    cluster.kubeconfig.write_text(yaml.safe_dump(doc))
    proxy = proxies.setup(cluster, tmp_path / "yk")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 1
    assert status_error(done) == (
        f"Error from server (BadGateway): the API server at 127.0.0.1:{cluster.api.port}"
        " refused the YubiKey's client certificate (CN=system:admin,O=system:masters):"
        " it may have expired or belong to another cluster; check it with "
        "'yubikey-kube-proxy status' and run 'yubikey-kube-proxy setup' with a "
        "current certificate"
    )


# -- the local side is not an open door ----------------------------------------------


def local_request(proxy: ProxyProcess, raw: bytes, with_cert: bool = True) -> bytes:
    """Send raw HTTP over the local mutual-TLS hop; return everything answered."""
    import ssl

    doc = yaml.safe_load(proxy.client_config.read_text())
    context = ssl.create_default_context(
        cadata=base64.b64decode(
            doc["clusters"][0]["cluster"]["certificate-authority-data"]
        ).decode()
    )
    if with_cert:
        user = doc["users"][0]["user"]
        bundle = proxy.workdir / "local-client.pem"
        bundle.write_bytes(
            base64.b64decode(user["client-certificate-data"])
            + base64.b64decode(user["client-key-data"])
        )
        context.load_cert_chain(bundle)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as raw_sock:
        with context.wrap_socket(raw_sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(raw)
            chunks = []
            while data := tls.recv(65536):
                chunks.append(data)
            return b"".join(chunks)


def response_status_and_body(answer: bytes) -> tuple[str, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


@pytest.mark.parametrize(
    "headers, message",
    [
        (
            "Host: evil.example:{port}\r\n",
            "refused: Host 'evil.example:{port}' does not name this proxy's loopback listener "
            "(DNS rebinding?)",
        ),
        (
            "Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n",
            "refused: Origin 'http://evil.example' is not this proxy's own (requests "
            "from web browsers are not relayed)",
        ),
        (
            "Host: 127.0.0.1:{port}\r\nSec-Fetch-Mode: cors\r\n",
            "refused: requests from web browsers are not relayed",
        ),
    ],
)
def test_host_and_browser_refusals(proxied, cluster, card57, headers, message):
    signed = card57.sign_count
    raw = f"GET /version HTTP/1.1\r\n{headers}Connection: close\r\n\r\n"
    status, body = response_status_and_body(
        local_request(proxied, raw.format(port=proxied.port).encode())
    )
    assert status == "HTTP/1.1 403 Forbidden"
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.format(port=proxied.port),
        "reason": "Forbidden",
        "code": 403,
    }
    assert card57.sign_count == signed and cluster.api.requests == []


def test_local_client_without_certificate_is_refused(proxied, cluster, card57):
    import ssl

    signed = card57.sign_count
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        answer = local_request(
            proxied,
            b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            with_cert=False,
        )
        if answer == b"":  # TLS 1.3: the refusal arrives as the connection closes
            raise ssl.SSLError("closed without an answer")
    assert card57.sign_count == signed and cluster.api.requests == []


def test_plain_http_mode_still_checks_host(card57, proxies, cluster, tmp_path, capsys):
    proxy = proxies.setup(cluster, tmp_path / "yk", "--plain-http")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            b"GET /version HTTP/1.1\r\nHost: attacker.example\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert response_status_and_body(answer)[0] == "HTTP/1.1 403 Forbidden"


# -- the card goes away -------------------------------------------------------------


def test_card_pulled_next_request_fails_fast(cards, proxies, cluster, tmp_path, capsys):
    piv = VirtualPiv(serial=71000007)
    card = cards(piv)
    proxy = proxies.setup(cluster, tmp_path / "yk")
    assert kubectl(proxy, "get", "--raw", "/version").returncode == 0
    relayed = len(cluster.api.requests)
    card.remove()
    started = time.monotonic()
    done = kubectl(proxy, "get", "--raw", "/version")
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert status_error(done) == (
        "Error from server (ServiceUnavailable): YubiKey not present in reader "
        f"'{YUBIKEY_READER} 00 00' - insert it"
    )
    assert elapsed < 20, elapsed  # kubectl's retries included: no hang
    assert len(cluster.api.requests) == relayed


def test_proxy_start_errors(card57, cluster, tmp_path, capsys):
    code = yk.main(
        [
            "setup",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    capsys.readouterr()
    code = yk.main(
        ["proxy", "--kubeconfig", str(tmp_path / "proxy.yml"), "--listen", "0.0.0.0:0"]
    )
    assert (code, capsys.readouterr().err) == (
        1,
        (
            "yubikey-kube-proxy: error: --listen '0.0.0.0:0' is not a loopback address: anyone "
            "who can reach it could use your cluster; pass --unsafe-listen if you really mean "
            "it\n"
        ),
    )
    code = yk.main(
        ["proxy", "--kubeconfig", str(tmp_path / "proxy.yml"), "--slot", "9c"]
    )
    assert (code, capsys.readouterr().err) == (
        1,
        (
            "yubikey-kube-proxy: error: slot 9c of the YubiKey holds no certificate: run "
            "'yubikey-kube-proxy setup' first\n"
        ),
    )


# -- PIN in the proxy ---------------------------------------------------------------


def test_proxy_with_pin_policy_once(card57, proxies, cluster, tmp_path, capsys):
    pins = pin_file(tmp_path, "123456")
    proxy = proxies.setup(
        cluster,
        tmp_path / "yk",
        "--pin-policy",
        "once",
        "--pin-file",
        str(pins),
        proxy_extra=("--pin-file", str(pins)),
    )
    for _ in range(2):
        done = kubectl(proxy, "get", "--raw", "/version")
        assert done.returncode == 0, done.stderr
    assert card57.pin_tries_left == 3
    assert card57.sign_count - 1 == cluster.api.handshakes


def test_proxy_wrong_pin_fails_at_start_and_costs_one_try(
    card57, cluster, tmp_path, capsys
):
    pins = pin_file(tmp_path, "123456")
    code = yk.main(
        [
            "setup",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--output-dir",
            str(tmp_path),
            "--pin-policy",
            "always",
            "--pin-file",
            str(pins),
        ]
    )
    assert code == 0
    capsys.readouterr()
    attempts = card57.verify_attempts
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    code = yk.main(
        [
            "proxy",
            "--kubeconfig",
            str(tmp_path / "proxy.yml"),
            "--listen",
            "127.0.0.1:0",
            "--pin-file",
            str(wrong),
        ]
    )
    assert (code, capsys.readouterr().err) == (
        1,
        (
            "yubikey-kube-proxy: error: wrong PIN: the YubiKey has 2 tries left before it "
            "blocks the PIN; check the PIN (or the PIN file) and try again\n"
        ),
    )
    assert (card57.verify_attempts - attempts, card57.pin_tries_left) == (1, 2)
    assert cluster.api.handshakes == 0


def proxy_after_a_wrong_pin_reload(cards, proxies, cluster, tmp_path, serial: int):
    """A proxy for a PIN-once key that worked, then reloaded a wrong PIN file:
    (the card, the proxy, a local client, the PIN file)."""
    piv = VirtualPiv(serial=serial)
    cards(piv)
    pins = pin_file(tmp_path, "123456")
    proxy = proxies.setup(
        cluster,
        tmp_path / "yk",
        "--pin-policy",
        "once",
        "--pin-file",
        str(pins),
        proxy_extra=("--pin-file", str(pins)),
    )
    client = LocalClient(proxy)
    assert client.get("/version")[0] == 200
    pins.write_text("999999\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloading" in proxy.stderr(), 10, "the reload")
    return piv, proxy, client, pins


def test_first_wrong_pin_answer_says_it_is_not_sent_again(
    cards, proxies, cluster, tmp_path, capsys
):
    piv, _, client, _ = proxy_after_a_wrong_pin_reload(
        cards, proxies, cluster, tmp_path, 43000016
    )
    signed, tries = piv.sign_count, piv.pin_tries_left
    first, second = client.get("/version"), client.get("/version")
    expected = (
        "wrong PIN: the YubiKey has 2 tries left before it blocks the PIN; check "
        "the PIN (or the PIN file) and try again (the proxy will not send it again: "
        "fix the PIN or the PIN file, then reload the proxy with kill -HUP or "
        "'systemctl --user reload yubikey-kube-proxy', or restart it)"
    )
    assert (first[0], json.loads(first[1])["message"]) == (503, expected)
    assert (second[0], json.loads(second[1])["message"]) == (503, expected)
    assert (tries - piv.pin_tries_left, piv.sign_count - signed) == (1, 0)


# -- the upstream TLS: FastAead in every suite, insecure-skip-tls-verify


def test_insecure_skip_tls_verify_warns_at_start_and_in_status(
    card57, clusters, proxies, tmp_path, capsys
):
    cluster = clusters(tmp_path, **{"insecure-skip-tls-verify": True})
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]
    cluster.kubeconfig.write_text(yaml.safe_dump(doc))
    proxy = proxies.setup(cluster, tmp_path / "yk")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    assert f"WARNING: {yk.INSECURE_WARNING}\n" in proxy.stderr()
    code, stdout, _ = run_cli(
        "status", "--kubeconfig", str(tmp_path / "yk" / "proxy.yml"), capsys=capsys
    )
    assert code == 0
    assert stdout.endswith(f"warning: {yk.INSECURE_WARNING}\n")


def test_advice_for_an_expired_or_refused_certificate_follows_the_key_origin():
    assert [
        yk.certificate_advice("generated on card"),
        yk.certificate_advice("imported"),
        yk.certificate_advice("of unknown origin"),
    ] == [
        "run 'yubikey-kube-proxy renew'",
        "run 'yubikey-kube-proxy setup' with a current certificate",
        "run 'yubikey-kube-proxy setup' with a current certificate",
    ]


# -- the local hop fails closed ---------------------------------------------------


def extension_of(doc: dict) -> dict:
    return doc["contexts"][0]["context"]["extensions"][0]["extension"]


def damage(key: str, value):
    def change(doc: dict) -> None:
        local = extension_of(doc)["local-tls"]
        if value is None:
            local.pop(key)
        else:
            local[key] = value

    return change


PROXY_YML_CASES = {
    "no local-tls entry": (
        lambda d: extension_of(d).pop("local-tls"),
        "the proxy kubeconfig {path} has no local-tls entry for the local hop's "
        "mutual TLS: run 'yubikey-kube-proxy setup' again (plain HTTP only with setup "
        "--plain-http or proxy --plain-http)",
    ),
    "an empty local-tls entry": (
        lambda d: extension_of(d).update({"local-tls": {}}),
        "the proxy kubeconfig {path} has no local-tls entry for the local hop's "
        "mutual TLS: run 'yubikey-kube-proxy setup' again (plain HTTP only with setup "
        "--plain-http or proxy --plain-http)",
    ),
    "a key that is not a key": (
        damage("server-key-data", b64(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")),
        "the local-tls entry of the proxy kubeconfig {path} is damaged: run "
        "'yubikey-kube-proxy setup' again",
    ),
    "a CA that is not base64": (
        damage("client-ca-data", "not base64!"),
        "the local-tls entry of the proxy kubeconfig {path} is damaged: run "
        "'yubikey-kube-proxy setup' again",
    ),
    "no client CA": (
        damage("client-ca-data", None),
        "the local-tls entry of the proxy kubeconfig {path} is damaged: run "
        "'yubikey-kube-proxy setup' again",
    ),
    "local-tls as a string": (
        lambda d: extension_of(d).update({"local-tls": "none"}),
        "kubeconfig {path}, context 'default', extension yubikey-kube-proxy: "
        "local-tls is a string, not a mapping: write a mapping (key: value lines)",
    ),
    "plain-http as a string": (
        lambda d: extension_of(d).update({"plain-http": "true"}),
        "kubeconfig {path}, context 'default', extension yubikey-kube-proxy: "
        "plain-http is a string, not a boolean: write true or false, without quotes",
    ),
    "insecure as the string false": (
        lambda d: cluster_of(d).update({"insecure-skip-tls-verify": "false"}),
        "kubeconfig {path}, cluster 'default': insecure-skip-tls-verify is a string, "
        "not a boolean: write true or false, without quotes",
    ),
    "an unknown slot": (
        lambda d: extension_of(d).update(slot="9z"),
        "the yubikey-kube-proxy extension of the proxy kubeconfig {path}: unknown PIV "
        "slot '9z': use 9a, 9c, 9d, 9e or a retired slot 82-95",
    ),
    "a listen address that is not loopback": (
        lambda d: extension_of(d).update(listen="0.0.0.0:8080"),
        "the yubikey-kube-proxy extension of the proxy kubeconfig {path}: listen "
        "'0.0.0.0:8080' is not a loopback address: anyone who can reach it could use "
        "your cluster; pass --unsafe-listen if you really mean it",
    ),
}


def test_local_hop_fails_closed(cards, proxies, cluster, tmp_path, capsys):
    piv = VirtualPiv(serial=41000014)
    card = cards(piv)
    workdir = tmp_path / "yk"
    assert run_cli(*setup_args(cluster.kubeconfig, workdir), capsys=capsys)[0] == 0
    card.remove()  # a refusal that failed would stop at "no YubiKey found"
    written = (workdir / "proxy.yml").read_text()
    signed = piv.sign_count
    for mutate, message in PROXY_YML_CASES.values():
        path = tmp_path / "damaged.yml"
        doc = yaml.safe_load(written)
        mutate(doc)
        path.write_text(yaml.safe_dump(doc))
        code, _, stderr = run_cli("proxy", "--kubeconfig", str(path), capsys=capsys)
        assert (code, stderr) == (1, f"{ERROR}{message.format(path=path)}\n")
    assert piv.sign_count == signed and cluster.api.handshakes == 0
    # Only an explicit request gives plain HTTP, and it is announced loudly.
    card.insert()
    proxy = proxies(workdir, "--plain-http")
    assert f"WARNING: {yk.PLAIN_HTTP_WARNING}\n" in proxy.stderr()
    assert "listening on http://127.0.0.1:" in proxy.stderr()
    plain = workdir / "plain-client.yml"
    doc = yaml.safe_load((workdir / "client.yml").read_text())
    doc["clusters"][0]["cluster"] = {"server": f"http://127.0.0.1:{proxy.port}"}
    doc["users"][0]["user"] = {}
    plain.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(plain), "get", "--raw", "/version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gitVersion"] == "v1.32.0"


def test_plain_http_from_setup_is_recorded_and_warned_about(
    card57, proxies, cluster, tmp_path, capsys
):
    workdir = tmp_path / "yk"
    code, _, stderr = run_cli(
        *setup_args(cluster.kubeconfig, workdir, "--plain-http"), capsys=capsys
    )
    assert (code, stderr) == (
        0,
        f"yubikey-kube-proxy: WARNING: {yk.PLAIN_HTTP_WARNING}\n",
    )
    extension = extension_of(read_yaml(workdir / "proxy.yml"))
    assert (extension["plain-http"], "local-tls" in extension) == (True, False)
    proxy = proxies(workdir)
    assert f"WARNING: {yk.PLAIN_HTTP_WARNING}\n" in proxy.stderr()
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    code, stdout, _ = run_cli(
        "status", "--kubeconfig", str(workdir / "proxy.yml"), capsys=capsys
    )
    assert code == 0
    assert stdout.endswith(f"warning: {yk.PLAIN_HTTP_WARNING}\n")


# -- Origin: non-browser clients may name the proxy's own listener -------------------


@pytest.mark.parametrize(
    "headers, refusal",
    [
        ("Origin: https://127.0.0.1:{port}\r\n", None),
        ("Origin: https://localhost:{port}\r\n", None),
        ("Origin: HTTPS://[::1]:{port}\r\n", None),
        (
            "Origin: http://127.0.0.1:{port}\r\n",
            "refused: Origin 'http://127.0.0.1:{port}' is not this proxy's own "
            "(requests from web browsers are not relayed)",
        ),
        (
            "Origin: https://127.0.0.1:{other}\r\n",
            "refused: Origin 'https://127.0.0.1:{other}' is not this proxy's own "
            "(requests from web browsers are not relayed)",
        ),
        (
            "Origin: https://127.0.0.1.evil.example:{port}\r\n",
            "refused: Origin 'https://127.0.0.1.evil.example:{port}' is not this "
            "proxy's own (requests from web browsers are not relayed)",
        ),
        (
            "Origin: null\r\n",
            "refused: Origin 'null' is not this proxy's own (requests from web "
            "browsers are not relayed)",
        ),
        (
            "Origin: https://127.0.0.1:{port}\r\nOrigin: https://127.0.0.1:{port}\r\n",
            "refused: Origin 'https://127.0.0.1:{port}, https://127.0.0.1:{port}' is "
            "not this proxy's own (requests from web browsers are not relayed)",
        ),
        (
            "Origin: https://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n",
            "refused: requests from web browsers are not relayed",
        ),
        (
            "Sec-Fetch-Dest: websocket\r\n",
            "refused: requests from web browsers are not relayed",
        ),
    ],
    ids=[
        "own-ip",
        "own-localhost",
        "own-ipv6",
        "wrong-scheme",
        "wrong-port",
        "other-host",
        "null",
        "two-origins",
        "own-with-sec-fetch",
        "sec-fetch-only",
    ],
)
def test_origin_of_the_proxy_itself_is_relayed_all_else_refused_and_logged(
    proxied, cluster, card57, headers, refusal
):
    signed = card57.sign_count
    fill = {"port": proxied.port, "other": proxied.port + 1}
    raw = f"GET /version HTTP/1.1\r\nHost: 127.0.0.1:{{port}}\r\n{headers}"
    raw += "Connection: close\r\n\r\n"
    status, body = response_status_and_body(
        local_request(proxied, raw.format(**fill).encode())
    )
    if refusal is None:
        assert (status, body["gitVersion"]) == ("HTTP/1.1 200 OK", "v1.32.0")
        assert card57.sign_count == signed + 1
        assert [r.headers["origin"] for r in cluster.api.requests] == [
            headers.split(": ", 1)[1].strip().format(**fill)
        ]
        return
    message = refusal.format(**fill)
    assert (status, body["message"], body["code"]) == (
        "HTTP/1.1 403 Forbidden",
        message,
        403,
    )
    assert card57.sign_count == signed and cluster.api.requests == []
    wait_until(lambda: message in proxied.stderr(), 10, "the refusal in the log")
    assert f"yubikey-kube-proxy: WARNING: GET /version: {message}\n" in proxied.stderr()


def test_official_python_client_lists_watches_execs_and_port_forwards(
    proxied, cluster, card57
):
    from kubernetes import client, config, watch
    from kubernetes.stream import portforward, stream

    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(proxied.client_config), client_configuration=configuration
    )
    core = client.CoreV1Api(client.ApiClient(configuration))
    cluster.api.add_pod("shell", namespace="team-a")
    assert [p.metadata.name for p in core.list_namespaced_pod("team-a").items] == [
        "shell"
    ]
    seen = []
    watcher = watch.Watch()
    for event in watcher.stream(core.list_namespaced_pod, "team-a", timeout_seconds=30):
        seen.append((event["type"], event["object"].metadata.name))
        if seen == [("ADDED", "shell")]:
            cluster.api.add_pod("web", namespace="team-a")
        if len(seen) == 2:
            watcher.stop()
    assert seen == [("ADDED", "shell"), ("ADDED", "web")]
    output = stream(
        core.connect_get_namespaced_pod_exec,
        "shell",
        "team-a",
        command=["echo", "hello", "from", "the", "card"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert output == "hello from the card\n"
    forward = portforward(
        core.connect_get_namespaced_pod_portforward, "shell", "team-a", ports="8080"
    )
    sock = forward.socket(8080)
    sock.setblocking(True)
    payload = bytes(range(256)) * 1024 + b"end"
    sock.sendall(payload)
    echoed = bytearray()
    while len(echoed) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the port-forward closed early"
        echoed += chunk
    assert bytes(echoed) == payload
    sock.close()
    forward.close()
    upgrades = [r for r in cluster.api.requests if r.headers.get("upgrade")]
    assert [(r.path.split("?")[0], r.headers["origin"]) for r in upgrades] == [
        (
            f"/api/v1/namespaces/team-a/pods/shell/{sub}",
            f"https://127.0.0.1:{proxied.port}",
        )
        for sub in ("exec", "portforward")
    ]
    assert cluster.api.exec_sessions == [
        ("websocket", "v5.channel.k8s.io"),
        ("portforward", "v4.channel.k8s.io"),
    ]
    assert "refused" not in proxied.stderr()


# -- Go parity: the upstream TLS checked against Go's own crypto/x509 and crypto/tls ---


TLS_FIGURES: list[str] = []  # printed at the end of the run by fault_figures


# -- the differential corpus ----------------------------------------------------------


SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
NETSCAPE_SGC = x509.ObjectIdentifier("2.16.840.1.113730.4.1")
UNKNOWN_EXTENSION = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")
KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def key_usage(*names: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{f: f in names for f in KU_FIELDS})


@dataclasses.dataclass
class CertSpec:
    """One certificate of a corpus chain; None leaves an extension out."""

    cn: str
    ca: bool | None = None  # basicConstraints: None = absent
    bc_critical: bool = True
    pathlen: int | None = None
    sans: tuple = ()
    eku: tuple | None = None
    ku: x509.KeyUsage | None = None
    nc: x509.NameConstraints | None = None
    valid: tuple[int, int] = (-1, 365)  # days from now
    hash: object = dataclasses.field(default_factory=hashes.SHA256)
    key: str = "p256"
    unknown: bool | None = None  # an unknown extension: None absent, else critical?
    aki: bool = True


def dns(*names: str) -> tuple:
    return tuple(x509.DNSName(n) for n in names)


def ips(*addresses: str) -> tuple:
    return tuple(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses)


def ip_net(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_network(text))


CORPUS_KEYS: dict[str, object] = {}


def corpus_key(name: str):
    """Keys by name, made once ("p256", "p256-2", "rsa1024", ...)."""
    if name not in CORPUS_KEYS:
        CORPUS_KEYS[name] = new_key(name.split("-")[0])
    return CORPUS_KEYS[name]


def build_cert(spec: CertSpec, issuer: CertSpec | None, issuer_key_name: str | None):
    key = corpus_key(spec.key)
    signer = corpus_key(issuer_key_name or spec.key)
    issuer_cn = (issuer or spec).cn
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=spec.valid[0]))
        .not_valid_after(NOW + datetime.timedelta(days=spec.valid[1]))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    )
    if spec.ca is not None:
        bc = x509.BasicConstraints(ca=spec.ca, path_length=spec.pathlen)
        builder = builder.add_extension(bc, spec.bc_critical)
    if spec.aki:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
        builder = builder.add_extension(aki, False)
    for ext, critical in (
        (spec.sans and x509.SubjectAlternativeName(list(spec.sans)), False),
        (spec.eku and x509.ExtendedKeyUsage(list(spec.eku)), False),
        (spec.ku, True),
        (spec.nc, True),
    ):
        if ext:
            builder = builder.add_extension(ext, critical)
    if spec.unknown is not None:
        ext = x509.UnrecognizedExtension(UNKNOWN_EXTENSION, b"\x05\x00")
        builder = builder.add_extension(ext, spec.unknown)
    if spec.hash == "sha1":
        return sha1_signed(builder.sign(signer, hashes.SHA256()), signer)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else spec.hash
    return builder.sign(signer, algorithm)


ECDSA_SHA256_ID = bytes.fromhex("300a06082a8648ce3d040302")
ECDSA_SHA1_ID = bytes.fromhex("300906072a8648ce3d0401")


def der_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + yk.encode_length(len(content)) + content


def der_content(data: bytes) -> bytes:
    """The content of a DER TLV whose tag is one byte."""
    first = data[1]
    if first < 0x80:
        return data[2 : 2 + first]
    n = first & 0x7F
    return data[2 + n : 2 + n + int.from_bytes(data[2 : 2 + n], "big")]


def sha1_signed(cert: x509.Certificate, signer) -> x509.Certificate:
    """The certificate signed again with ECDSA-SHA1 (cryptography no longer signs
    certificates with SHA-1; Go must still see one to refuse it)."""
    tbs = der_content(cert.tbs_certificate_bytes)
    assert tbs.count(ECDSA_SHA256_ID) == 1
    tbs = der_tlv(0x30, tbs.replace(ECDSA_SHA256_ID, ECDSA_SHA1_ID))
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA1()))
    body = tbs + ECDSA_SHA1_ID + der_tlv(0x03, b"\x00" + signature)
    return x509.load_der_x509_certificate(der_tlv(0x30, body))


def root_spec(**kw) -> CertSpec:
    kw = {"ca": True, "key": "p256-root", **kw}
    kw.setdefault("ku", key_usage("key_cert_sign", "crl_sign"))
    return CertSpec("Corpus Root", **kw)


def inter_spec(n: int = 1, **kw) -> CertSpec:
    kw = {"ca": True, "key": f"p256-int{n}", **kw}
    kw.setdefault("ku", key_usage("key_cert_sign", "crl_sign"))
    return CertSpec(f"Corpus Intermediate {n}", **kw)


def leaf_spec(**kw) -> CertSpec:
    kw = {"cn": "api.example.com", "key": "p256-leaf", **kw}
    kw.setdefault("sans", dns("api.example.com") + ips("10.0.0.1"))
    kw.setdefault("eku", (SERVER_AUTH,))
    kw.setdefault("ku", key_usage("digital_signature"))
    return CertSpec(**kw)


@dataclasses.dataclass
class CorpusCase:
    label: str
    roots: list  # DER
    chain: list  # DER, leaf first, as the server sends it
    name: str

    def job(self) -> str:
        return json.dumps(
            {
                "roots": [b64(d) for d in self.roots],
                "chain": [b64(d) for d in self.chain],
                "name": self.name,
            }
        )


def chain_case(
    label: str,
    leaf: CertSpec | None = None,
    inters: tuple = (None,),
    root: CertSpec | None = None,
    name: str = "api.example.com",
    send=None,
) -> CorpusCase:
    """root -> intermediates (None = the default one; () = none) -> leaf."""
    root = root or root_spec()
    specs = (
        [root]
        + [s or inter_spec(i + 1) for i, s in enumerate(inters)]
        + [leaf or leaf_spec()]
    )
    certs = [build_cert(root, None, None)]
    for parent, spec in itertools.pairwise(specs):
        certs.append(build_cert(spec, parent, parent.key))
    der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    chain = list(reversed(der[1:]))  # leaf, intermediates up to the root
    return CorpusCase(label, [der[0]], send(der) if send else chain, name)


def self_signed_case(label: str, leaf: CertSpec, name="api.example.com", trusted=True):
    der = build_cert(leaf, None, None).public_bytes(serialization.Encoding.DER)
    roots = [der] if trusted else [chain_case("x").roots[0]]
    return CorpusCase(label, roots, [der], name)


def san_cases() -> list[CorpusCase]:
    def leaf_with(*sans, cn="api.example.com"):
        return leaf_spec(sans=sans, cn=cn)

    cases = [
        ("dns exact", leaf_spec(), "api.example.com"),
        ("dns case-insensitive", leaf_with(*dns("API.Example.COM")), "api.example.com"),
        ("dns mismatch", leaf_spec(), "other.example.com"),
        ("ip san", leaf_spec(), "10.0.0.1"),
        ("ip mismatch", leaf_spec(), "10.0.0.2"),
        ("ip only as dns san", leaf_with(*dns("10.0.0.9")), "10.0.0.9"),
        ("ipv6 san", leaf_with(*ips("::1")), "::1"),
        ("ipv6 in brackets", leaf_with(*ips("::1")), "[::1]"),
        ("wildcard one label", leaf_with(*dns("*.example.com")), "a.example.com"),
        ("wildcard two labels", leaf_with(*dns("*.example.com")), "a.b.example.com"),
        ("wildcard apex", leaf_with(*dns("*.example.com")), "example.com"),
        ("partial wildcard", leaf_with(*dns("a*.example.com")), "ab.example.com"),
        ("wildcard tld", leaf_with(*dns("*.com")), "example.com"),
        ("wildcard not leftmost", leaf_with(*dns("a.*.com")), "a.b.com"),
        ("cn only", leaf_spec(sans=()), "api.example.com"),
        (
            "cn matches, san does not",
            leaf_with(*dns("other.example.com")),
            "api.example.com",
        ),
        ("name with trailing dot", leaf_spec(), "api.example.com."),
        (
            "san with trailing dot",
            leaf_with(*dns("api.example.com.")),
            "api.example.com",
        ),
        (
            "both with trailing dot",
            leaf_with(*dns("api.example.com.")),
            "api.example.com.",
        ),
        ("localhost.", leaf_with(*dns("localhost")), "localhost."),
        ("underscore", leaf_with(*dns("my_host.example.com")), "my_host.example.com"),
        (
            "underscore under wildcard",
            leaf_with(*dns("*.example.com")),
            "a_b.example.com",
        ),
        (
            "tls-server-name kubernetes",
            leaf_with(*dns("kubernetes.default.svc")),
            "kubernetes.default.svc",
        ),
        (
            "tls-server-name mismatch",
            leaf_with(*dns("kubernetes")),
            "kubernetes.default",
        ),
        (
            "email san only",
            leaf_with(x509.RFC822Name("a@example.com")),
            "api.example.com",
        ),
    ]
    return [chain_case(f"san: {label}", leaf, name=name) for label, leaf, name in cases]


def usage_cases() -> list[CorpusCase]:
    ekus = {
        "none": None,
        "serverAuth": (SERVER_AUTH,),
        "clientAuth": (CLIENT_AUTH,),
        "any": (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,),
        "server+client": (SERVER_AUTH, CLIENT_AUTH),
        "codeSigning": (ExtendedKeyUsageOID.CODE_SIGNING,),
        "netscape sgc": (NETSCAPE_SGC,),
    }
    cases = []
    for label, eku in ekus.items():
        cases.append(chain_case(f"eku leaf {label}", leaf=leaf_spec(eku=eku)))
        if label not in ("serverAuth+clientAuth", "server+client", "netscape sgc"):
            cases.append(
                chain_case(f"eku intermediate {label}", inters=(inter_spec(eku=eku),))
            )
        if label in ("serverAuth", "clientAuth", "any"):
            cases.append(chain_case(f"eku root {label}", root=root_spec(eku=eku)))
    kus = {
        "leaf none": dict(leaf=leaf_spec(ku=None)),
        "leaf keyEncipherment": dict(leaf=leaf_spec(ku=key_usage("key_encipherment"))),
        "leaf keyCertSign only": dict(leaf=leaf_spec(ku=key_usage("key_cert_sign"))),
        "intermediate none": dict(inters=(inter_spec(ku=None),)),
        "intermediate digitalSignature": dict(
            inters=(inter_spec(ku=key_usage("digital_signature")),)
        ),
        "intermediate crlSign": dict(inters=(inter_spec(ku=key_usage("crl_sign")),)),
        "intermediate keyCertSign": dict(
            inters=(inter_spec(ku=key_usage("key_cert_sign")),)
        ),
        "root none": dict(root=root_spec(ku=None)),
        "root digitalSignature": dict(
            root=root_spec(ku=key_usage("digital_signature"))
        ),
        "root keyCertSign": dict(root=root_spec(ku=key_usage("key_cert_sign"))),
    }
    cases += [chain_case(f"ku {label}", **kw) for label, kw in kus.items()]
    bcs = {
        "intermediate without": dict(inters=(inter_spec(ca=None),)),
        "intermediate ca=false": dict(inters=(inter_spec(ca=False),)),
        "intermediate not critical": dict(inters=(inter_spec(bc_critical=False),)),
        "root without": dict(root=root_spec(ca=None)),
        "root ca=false": dict(root=root_spec(ca=False)),
        "leaf ca=true": dict(leaf=leaf_spec(ca=True)),
    }
    cases += [
        chain_case(f"basic constraints {label}", **kw) for label, kw in bcs.items()
    ]
    return cases


def constraint_cases() -> list[CorpusCase]:
    def nc(permitted=None, excluded=None):
        return x509.NameConstraints(
            permitted_subtrees=permitted, excluded_subtrees=excluded
        )

    def inter_nc(c):
        return (inter_spec(nc=c),)

    cases = [
        chain_case(
            "nc permitted dns inside",
            inters=inter_nc(nc([x509.DNSName("example.com")])),
        ),
        chain_case(
            "nc permitted dns outside",
            leaf_spec(sans=dns("api.other.com")),
            inter_nc(nc([x509.DNSName("example.com")])),
            name="api.other.com",
        ),
        chain_case(
            "nc excluded dns", inters=inter_nc(nc(None, [x509.DNSName("example.com")]))
        ),
        chain_case(
            "nc permitted ip inside",
            inters=inter_nc(nc([ip_net("10.0.0.0/8")])),
            name="10.0.0.1",
        ),
        chain_case(
            "nc permitted ip outside",
            inters=inter_nc(nc([ip_net("192.168.0.0/16")])),
            name="10.0.0.1",
        ),
        chain_case(
            "nc root permitted .example.com",
            root=root_spec(nc=nc([x509.DNSName(".example.com")])),
        ),
        chain_case(
            "nc root permitted example.org",
            root=root_spec(nc=nc([x509.DNSName("example.org")])),
        ),
        chain_case(
            "nc second san outside",
            leaf_spec(sans=dns("api.example.com", "api.evil.com")),
            inter_nc(nc([x509.DNSName("example.com")])),
        ),
        chain_case(
            "nc with cn-only leaf",
            leaf_spec(sans=()),
            inter_nc(nc([x509.DNSName("example.com")])),
        ),
        chain_case("pathlen root 0 with intermediate", root=root_spec(pathlen=0)),
        chain_case("pathlen root 0 direct", inters=(), root=root_spec(pathlen=0)),
        chain_case("pathlen root 1 with intermediate", root=root_spec(pathlen=1)),
        chain_case(
            "pathlen root 1 with two", inters=(None, None), root=root_spec(pathlen=1)
        ),
        chain_case("pathlen intermediate 0 direct", inters=(inter_spec(pathlen=0),)),
        chain_case(
            "pathlen intermediate 0 with another", inters=(inter_spec(pathlen=0), None)
        ),
    ]
    return cases


def validity_cases() -> list[CorpusCase]:
    periods = {"expired": (-30, -1), "not yet valid": (1, 30)}
    cases = []
    for label, valid in periods.items():
        cases.append(chain_case(f"leaf {label}", leaf_spec(valid=valid)))
        cases.append(
            chain_case(f"intermediate {label}", inters=(inter_spec(valid=valid),))
        )
        cases.append(chain_case(f"root {label}", root=root_spec(valid=valid)))
    return cases


def algorithm_cases() -> list[CorpusCase]:
    return [
        chain_case("sha1 leaf", leaf_spec(hash="sha1")),
        chain_case("sha1 intermediate", inters=(inter_spec(hash="sha1"),)),
        chain_case("sha1 self-signed root", root=root_spec(hash="sha1")),
        chain_case("rsa1024 leaf", leaf_spec(key="rsa1024")),
        chain_case("rsa1024 intermediate", inters=(inter_spec(key="rsa1024-int"),)),
        chain_case("rsa2048 leaf", leaf_spec(key="rsa2048")),
        chain_case("sha384 ecdsa leaf", leaf_spec(hash=hashes.SHA384())),
        chain_case(
            "p384 chain",
            inters=(inter_spec(key="p384-int"),),
            root=root_spec(key="p384-root"),
        ),
        chain_case("ed25519 intermediate", inters=(inter_spec(key="ed25519-int"),)),
        chain_case("ed25519 leaf", leaf_spec(key="ed25519-leaf")),
        chain_case("p521 leaf", leaf_spec(key="p521-leaf")),
    ]


def structure_cases() -> list[CorpusCase]:
    foreign = chain_case("foreign", root=root_spec(key="p256-foreign"))
    genuine = chain_case("genuine")
    two = chain_case("two", inters=(None, None))
    ss = leaf_spec(ca=None, aki=False)
    return [
        CorpusCase(
            "chain from a foreign CA", genuine.roots, foreign.chain, "api.example.com"
        ),
        chain_case("intermediate not sent", send=lambda der: [der[-1]]),
        CorpusCase(
            "intermediates in reverse order",
            two.roots,
            [two.chain[0], two.chain[2], two.chain[1]],
            "api.example.com",
        ),
        CorpusCase(
            "extra unrelated certificate",
            genuine.roots,
            genuine.chain + foreign.chain[1:],
            "api.example.com",
        ),
        CorpusCase(
            "root sent too",
            genuine.roots,
            genuine.chain + genuine.roots,
            "api.example.com",
        ),
        chain_case("unknown critical extension leaf", leaf_spec(unknown=True)),
        chain_case(
            "unknown critical extension intermediate",
            inters=(inter_spec(unknown=True),),
        ),
        chain_case("unknown critical extension root", root=root_spec(unknown=True)),
        chain_case("unknown extension not critical", leaf_spec(unknown=False)),
        chain_case("leaf without authority key id", leaf_spec(aki=False)),
        self_signed_case("self-signed leaf as the CA", ss),
        self_signed_case(
            "self-signed leaf as the CA, wrong name", ss, name="other.example.com"
        ),
        self_signed_case(
            "self-signed leaf as the CA, expired",
            dataclasses.replace(ss, valid=(-30, -1)),
        ),
        self_signed_case(
            "self-signed leaf as the CA, clientAuth",
            dataclasses.replace(ss, eku=(CLIENT_AUTH,)),
        ),
        self_signed_case(
            "self-signed leaf as the CA, ca=true", dataclasses.replace(ss, ca=True)
        ),
        self_signed_case("self-signed leaf as the CA, ip name", ss, name="10.0.0.1"),
        self_signed_case("self-signed leaf not trusted", ss, trusted=False),
        CorpusCase("garbage certificate", genuine.roots, [b"junk"], "api.example.com"),
        CorpusCase(
            "truncated leaf",
            genuine.roots,
            [genuine.chain[0][:-20], *genuine.chain[1:]],
            "api.example.com",
        ),
    ]


def v1_root_case() -> CorpusCase:
    """A version 1 root (no extensions at all), which Go takes as an issuer."""
    key = corpus_key("p256-v1root")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corpus Root")])
    v3 = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    tbs = der_content(v3.tbs_certificate_bytes)
    assert tbs.startswith(bytes.fromhex("a003020102"))  # [0] version v3
    tbs = der_tlv(0x30, tbs[5:])
    signature = der_tlv(0x03, b"\x00" + key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    root = der_tlv(0x30, tbs + ECDSA_SHA256_ID + signature)
    assert x509.load_der_x509_certificate(root).version == x509.Version.v1
    issuer = CertSpec("Corpus Root", key="p256-v1root")
    leaf = build_cert(leaf_spec(), issuer, issuer.key)
    return CorpusCase("v1 root", [root], [der_bytes(leaf)], "api.example.com")


def der_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def go_corpus() -> list[CorpusCase]:
    return (
        san_cases()
        + usage_cases()
        + constraint_cases()
        + validity_cases()
        + algorithm_cases()
        + structure_cases()
        + [v1_root_case()]
    )


# Where we refuse what Go accepts, on purpose (the README lists the same).
STRICTER_THAN_GO = {
    "nc root permitted .example.com": "a DNS name constraint with a leading dot is "
    "refused as malformed",
    "rsa1024 intermediate": "certificates signed by an RSA key under 2048 bits are "
    "refused",
    "ed25519 intermediate": "certificates signed by an Ed25519 key are refused",
    "v1 root": "a version 1 certificate (no basicConstraints) cannot be an issuer",
}


def our_verdict(case: CorpusCase) -> str:
    roots = [x509.load_der_x509_certificate(d) for d in case.roots]
    try:
        yk.ServerVerifier(roots, case.name).verify(case.chain, "corpus")
    except yk.ProxyError as exc:
        return str(exc)
    return ""


@pytest.mark.go
def test_go_differential_corpus(go_build):
    corpus = go_corpus()
    assert len(corpus) >= 80
    verifier = go_build("goverify", GO_VERIFIER)
    done = subprocess.run(
        [str(verifier)],
        input="".join(case.job() + "\n" for case in corpus),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    go = [json.loads(line)["error"] for line in done.stdout.splitlines()]
    assert len(go) == len(corpus)
    lenient, stricter, unexplained = [], [], []
    for case, go_error in zip(corpus, go, strict=True):
        ours = our_verdict(case)
        if go_error and not ours:
            lenient.append(f"{case.label}: Go says {go_error}")
        elif ours and not go_error:
            known = case.label in STRICTER_THAN_GO
            (stricter if known else unexplained).append((case.label, ours))
    agree = len(corpus) - len(lenient) - len(stricter) - len(unexplained)
    TLS_FIGURES.append(
        f"Go differential: {len(corpus)} chains, {agree} agreements, {len(stricter)} "
        f"deliberately stricter than Go, {len(lenient)} more lenient, "
        f"{len(unexplained)} unexplained"
    )
    TLS_FIGURES.extend(f"  stricter: {s}: {STRICTER_THAN_GO[s]}" for s, _ in stricter)
    assert lenient == [] and unexplained == []
    assert sorted(label for label, _ in stricter) == sorted(STRICTER_THAN_GO)


# -- a Go TLS server configured like kube-apiserver, in front of the test API server --


@pytest.mark.go
@pytest.mark.parametrize(
    "max_version, serving",
    [("1.2", "p256"), ("1.3", "p256"), ("1.2", "rsa2048"), ("1.3", "rsa2048")],
)
def test_go_apiserver_kubectl_requests(
    card57, tmp_path, capsys, go_build, max_version, serving
):
    with go_apiserver(tmp_path, go_build, serving, max_version) as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            signed = card57.sign_count
            done = kubectl(proxy, "get", "--raw", "/version")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["gitVersion"] == "v1.32.0"
            done = kubectl(proxy, "get", "nodes", "-o", "name")
            assert (done.returncode, done.stdout) == (
                0,
                "".join(f"node/{n}\n" for n in NODE_NAMES),
            ), done.stderr
            requests = list(front.cluster.api.requests)
            # each request a full handshake the card signed: no ticket, no resumption
            assert card57.sign_count - signed == len(requests) > 0
            go = {
                (
                    r["headers"]["x-go-client"],
                    r["headers"]["x-go-tls"],
                    r["headers"]["x-go-alpn"],
                    r["headers"]["x-go-resumed"],
                )
                for r in requests
            }
            assert go == {
                ("CN=system:admin,O=system:masters", max_version, "http/1.1", "false")
            }
            ciphers = {r["headers"]["x-go-cipher"] for r in requests}
            if max_version == "1.2":
                kind = "ECDSA" if serving == "p256" else "RSA"
                assert ciphers <= {
                    f"TLS_ECDHE_{kind}_WITH_AES_128_GCM_SHA256",
                    f"TLS_ECDHE_{kind}_WITH_CHACHA20_POLY1305_SHA256",
                }, ciphers
            else:
                assert ciphers <= {
                    "TLS_AES_128_GCM_SHA256",
                    "TLS_CHACHA20_POLY1305_SHA256",
                }, ciphers


@pytest.mark.go
@pytest.mark.parametrize("max_version, serving", [("1.3", "p256"), ("1.2", "rsa2048")])
def test_go_apiserver_streams_exec_and_writes(
    card57, tmp_path, capsys, go_build, max_version, serving
):
    with go_apiserver(tmp_path, go_build, serving, max_version) as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            cluster = front.cluster
            test_kubectl_watch_sees_events_as_they_happen(proxy, cluster)
            test_kubectl_logs_follow_streams_lines(proxy, cluster)
            for websockets in ("true", "false"):
                test_kubectl_exec_stdin_echo(proxy, cluster, websockets)
            (tmp_path / "pod.json").write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": "web"},
                        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                    }
                )
            )
            done = kubectl(proxy, "create", "-f", str(tmp_path / "pod.json"))
            assert (done.returncode, done.stdout) == (0, "pod/web created\n"), (
                done.stderr
            )
            done = kubectl(proxy, "delete", "pod", "web", "--wait=false")
            assert (done.returncode, done.stdout) == (0, 'pod "web" deleted\n'), (
                done.stderr
            )


@pytest.mark.go
@pytest.mark.parametrize("name", ["localhost.", "my_host.example"])
def test_go_apiserver_tls_server_names_go_accepts(
    card57, tmp_path, capsys, go_build, name
):
    pki = go_serving_pki("p256", names=("localhost", "my_host.example"))
    with go_apiserver(
        tmp_path, go_build, pki=pki, **{"tls-server-name": name}
    ) as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            done = kubectl(proxy, "get", "--raw", "/version")
            assert done.returncode == 0, done.stderr


@pytest.mark.go
def test_go_apiserver_client_hello_offers_what_go_offers(
    card57, clusters, tmp_path, capsys
):
    """The proxy's ClientHello, caught by a listener that answers nothing."""
    from tlslite.constants import CipherSuite
    from tlslite.messages import ClientHello
    from tlslite.utils.codec import Parser

    cluster = clusters(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    caught = []

    def catch():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by the test
            with conn:
                data = b""
                while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                    data += conn.recv(65536)
                caught.append(data)

    thread = threading.Thread(target=catch, daemon=True)
    thread.start()
    try:
        doc = yaml.safe_load(cluster.kubeconfig.read_text())
        doc["clusters"][0]["cluster"]["server"] = (
            f"https://127.0.0.1:{listener.getsockname()[1]}"
        )
        cluster.kubeconfig.write_text(yaml.safe_dump(doc))
        with proxy_through(GoFront(None, 0, cluster), tmp_path / "yk") as proxy:
            signed = card57.sign_count
            done = kubectl(proxy, "get", "--raw", "/version")
            assert done.returncode == 1
            assert card57.sign_count == signed
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        listener.close()
        thread.join(10)
    assert caught
    hello = ClientHello().parse(Parser(bytearray(caught[0][6:])))
    names = [CipherSuite.ietfNames.get(s, hex(s)) for s in hello.cipher_suites]
    assert sorted(names) == sorted(
        [
            "TLS_AES_128_GCM_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
        ]
    ), names
    versions = hello.getExtension(43).versions
    assert versions == [(3, 4), (3, 3)]
    extensions = {e.extType for e in hello.extensions}
    assert not extensions & {35, 41, 45}  # session_ticket, pre_shared_key, psk modes
    assert hello.client_version == (3, 3)


def impostor_case(kind: str):
    """(serving key kind, extra Go flags, max version) for each impostor."""
    return {
        "static RSA": ("rsa2048", ["-suites", "rsa"], "1.2"),
        "ECDHE TLS 1.2": ("rsa2048", ["-suites", "ecdhe"], "1.2"),
        "TLS 1.3": ("rsa2048", [], "1.3"),
    }[kind]


def refused_by_us(front: GoFront, proxy: ProxyProcess, card, expected: str) -> None:
    signed = card.sign_count
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 1
    message = status_error(done)
    assert message.startswith(
        f"Error from server (BadGateway): the API server at 127.0.0.1:{front.port} "
    ), message
    assert expected in message, message
    assert "client certificate" not in message
    assert card.sign_count == signed
    assert front.cluster.api.requests == []


@pytest.mark.go
@pytest.mark.parametrize("kind", ["static RSA", "ECDHE TLS 1.2", "TLS 1.3"])
def test_go_impostor_with_the_genuine_certificate_gets_no_signature(
    card57, tmp_path, capsys, go_build, kind
):
    serving, flags, max_version = impostor_case(kind)
    pki = go_serving_pki(serving)
    other = tmp_path / "other-key.pem"
    other.write_bytes(pem(new_key(serving)))
    expected = {
        "static RSA": "accepts none of what kubectl offers too (TLS 1.2 or 1.3, ECDHE key "
        "exchange, AES-GCM or ChaCha20)",
        "ECDHE TLS 1.2": "did not prove that it holds the key of its certificate",
        "TLS 1.3": "did not prove that it holds the key of its certificate",
    }[kind]
    with go_apiserver(
        tmp_path,
        go_build,
        max_version=max_version,
        pki=pki,
        extra=[*flags, "-impostor-key", str(other)],
    ) as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            refused_by_us(front, proxy, card57, expected)


@pytest.mark.go
def test_go_apiserver_with_tls_1_1_only_gets_no_signature(
    card57, tmp_path, capsys, go_build
):
    with go_apiserver(tmp_path, go_build, max_version="1.1") as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            refused_by_us(
                front,
                proxy,
                card57,
                "accepts none of what kubectl offers too (TLS 1.2 or 1.3, ECDHE key "
                "exchange, AES-GCM or ChaCha20): ",
            )


@pytest.mark.go
@pytest.mark.parametrize("kind", ["foreign CA", "wrong name", "expired"])
def test_go_apiserver_we_refuse_gets_no_signature(
    card57, tmp_path, capsys, go_build, kind
):
    extra = {}
    if kind == "foreign CA":
        (_, cert, key), (ca, _, _) = go_serving_pki("p256"), go_serving_pki("p256")
        pki = (ca, cert, key)
        expected = "(it is not signed by the cluster's CA)"
    elif kind == "wrong name":
        pki, extra = go_serving_pki("p256"), {"tls-server-name": "kubernetes.default"}
        expected = (
            "for 'kubernetes.default' (leaf certificate has no matching subjectAltName)"
        )
    else:
        pki = go_serving_pki("rsa2048", days=-1)
        expected = "(it expired on "
    with go_apiserver(tmp_path, go_build, pki=pki, **extra) as front:
        with proxy_through(front, tmp_path / "yk") as proxy:
            refused_by_us(front, proxy, card57, expected)


@pytest.mark.go
def test_sni_is_what_go_sends():
    parse = yk.UpstreamAddress.parse
    assert parse("https://10.0.0.1:6443", None).sni is None
    assert parse("https://[::1]:6443", None).sni is None
    assert parse("https://127.0.0.1:6443", "localhost.").sni == "localhost"
    assert parse("https://127.0.0.1:6443", "api.example.com").sni == "api.example.com"
    # Go sends names with '_' too; tlslite cannot, so none is sent (the certificate
    # is still checked against the name).
    assert parse("https://127.0.0.1:6443", "my_host.example").sni is None
    assert parse("https://127.0.0.1:6443", "my_host.example").server_name == (
        "my_host.example"
    )


@pytest.mark.go
def test_tls_server_name_that_can_never_match_is_refused_at_start(
    card57, clusters, tmp_path, capsys
):
    cluster = clusters(tmp_path, **{"tls-server-name": "kübernetes.local"})
    assert (
        yk.main(
            [
                "setup",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--output-dir",
                str(tmp_path / "yk"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    signed = card57.sign_count
    code = yk.main(["proxy", "--kubeconfig", str(tmp_path / "yk" / "proxy.yml")])
    assert (code, capsys.readouterr().err) == (
        1,
        "yubikey-kube-proxy: error: the server name 'kübernetes.local' "
        "(tls-server-name, or the host of the server URL) can never match a "
        "certificate: write the host name or IP address that the API server's "
        "certificate names\n",
    )
    assert card57.sign_count == signed
    assert cluster.api.handshakes == 0


@pytest.mark.go
def test_tickets_are_never_kept():
    left, right = socket.socketpair()
    with left, right:
        verifier = yk.ServerVerifier([], "localhost")
        conn = yk.make_tls_connection(left, verifier, "localhost:6443")
        conn.tickets.append("ticket")
        conn.tls_1_0_tickets.append("ticket")
        assert (conn.tickets, conn.tls_1_0_tickets) == ([], [])


def test_another_tlslite_ng_is_refused_at_start(capsys, monkeypatch):
    """The fence around tlslite's internals holds for 0.8.2 only: any other
    version, or a copy that does not say its version, stops every command at
    once."""
    monkeypatch.setattr(sys, "prefix", "/venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    for found, says in (
        ("0.8.3", "found 0.8.3"),
        (None, "found a copy without a version"),
    ):
        versions = {"pyscard": "2.0.7", "PyYAML": "6.0.1", "cryptography": "45.0.1"}
        monkeypatch.setattr(
            yk, "installed_version", {**versions, "tlslite-ng": found}.get
        )
        code, _, stderr = run_cli("proxy", capsys=capsys)
        assert (code, stderr) == (
            1,
            f"{ERROR}cannot import tlslite-ng==0.8.2 ({says}): install with: "
            f"{sys.executable} -m pip install 'tlslite-ng==0.8.2'\n",
        )


@contextlib.contextmanager
def hangup_relay(upstream_port: int):
    """Relays to the API server until the client speaks a second time (its flight
    with the signed CertificateVerify), then hangs up on both without an alert."""
    import select

    listener = socket.create_server(("127.0.0.1", 0))

    def relay(client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", upstream_port))
        spoken = 0
        with client, server:
            while True:
                ready, _, _ = select.select([client, server], [], [])
                data = ready[0].recv(65536)
                if not data or (ready[0] is client and spoken):
                    return
                spoken += ready[0] is client
                (server if ready[0] is client else client).sendall(data)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


@pytest.mark.go
def test_hangup_after_our_signature_is_not_blamed_on_the_certificate(
    card57, clusters, tmp_path, capsys
):
    cluster = clusters(tmp_path, tls_versions=("1.2",))
    with hangup_relay(cluster.api.port) as port:
        doc = yaml.safe_load(cluster.kubeconfig.read_text())
        doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
        cluster.kubeconfig.write_text(yaml.safe_dump(doc))
        with proxy_through(GoFront(None, port, cluster), tmp_path / "yk") as proxy:
            signed = card57.sign_count
            done = kubectl(proxy, "get", "--raw", "/version")
            assert done.returncode == 1
            assert status_error(done) == (
                f"Error from server (BadGateway): the API server at 127.0.0.1:{port} "
                "closed the connection during the TLS handshake: is it a Kubernetes "
                "API server?"
            )
            assert card57.sign_count > signed  # the card did sign


# -- Hostile input on the local hop: a strict reader (RFC 9112), a strict relay, -------
#    bounded resources


@pytest.mark.fault
@pytest.mark.parametrize(
    "raw, status, message",
    [
        (
            b"POST /api/v1/namespaces HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\n\r\n",
            400,
            "refused: invalid Content-Length '-5'",
        ),
        (
            b"POST /api/v1/namespaces HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "refused: both Transfer-Encoding and Content-Length are set",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nX-Big: "
            + b"a" * 70000
            + b"\r\n\r\n",
            431,
            "refused: the request's head is longer than 65536 bytes",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\n"
            + b"X-Many: 1\r\n" * 120
            + b"\r\n",
            431,
            "refused: the request has more than 100 header fields",
        ),
    ],
    ids=["negative-length", "length-and-chunked", "long-header", "many-headers"],
)
def test_malformed_requests_are_refused_never_forwarded(
    proxied, cluster, card57, raw, status, message
):
    signed = card57.sign_count
    answer = local_request(
        proxied, raw.replace(b"{host}", f"127.0.0.1:{proxied.port}".encode())
    )
    head, body = response_status_and_body(answer)
    assert int(head.split()[1]) == status
    assert body["message"] == message and body["code"] == status
    assert cluster.api.requests == [] and card57.sign_count == signed


HTTP_FUZZ_SEED = 10
HTTP_FUZZ_CASES = 240
PODS = "/api/v1/namespaces/default/pods"


def answer_of(answer: bytes) -> tuple[int, str]:
    """Status code and Status message of one of the proxy's own answers."""
    head, body = response_status_and_body(answer)
    return int(head.split()[1]), body["message"]


def post(host: str, fields: str = "", body: bytes = b"", target: str = PODS) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n".encode("latin-1")
        + body
    )


def chunked(host: str, body: bytes, fields: str = "") -> bytes:
    return post(host, f"Transfer-Encoding: chunked\r\n{fields}", body)


def fault_phrase(kind: str, what: str, byte: int = 0) -> str:
    return {
        "fold": f"refused: a folded {what} (obs-fold)",
        "lf": f"refused: a {what} that does not end with CR LF",
        "control": f"refused: a {what} with the control character 0x{byte:02x}",
        "syntax": f"refused: a {what} that is not 'Name: value'",
    }[kind]


# Each family makes one kind of malformed request, and knows the answer.
HEX = "0123456789abcdefABCDEF"
NOT_HEX = ["-", "+", "x", "_", "g", "G", ".", ",", " ", "\t", "\x00", "\x1b", "\xe9"]
CONTROLS_IN_VALUES = [*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0x7F]
NOT_IN_TARGETS = [*range(0x00, 0x0A), *range(0x0B, 0x20), 0x7F, *range(0x80, 0x100)]
NOT_IN_TARGETS += [ord(c) for c in '"<>\\^`{|}#']


def fuzz_chunk_size(rng: random.Random, host: str) -> tuple[bytes, int, str]:
    digits = "".join(rng.choice(HEX) for _ in range(rng.randint(1, 6)))
    if rng.random() < 0.2:
        size = "".join(rng.choice(HEX[1:]) for _ in range(rng.randint(17, 24)))
    else:
        at = rng.randint(0, len(digits))
        size = digits[:at] + rng.choice(NOT_HEX) + digits[at:]
    message = f"refused: malformed chunk-size line {size!r}"
    return (
        chunked(host, f"{size}\r\nhello\r\n0\r\n\r\n".encode("latin-1")),
        400,
        message,
    )


def fuzz_chunk_line_long(rng, host):
    line = "5;" + "a" * rng.randint(1023, 3000)
    message = "refused: a chunk-size line is longer than 1024 bytes"
    return chunked(host, f"{line}\r\nhello\r\n0\r\n\r\n".encode()), 400, message


def fuzz_chunk_data_end(rng, host):
    end = rng.choice(["", "XY", "\n", "\r", " \r\n", "!\r\n"])
    body = f"5\r\nhello{end}0\r\n\r\n".encode()
    return chunked(host, body), 400, "refused: a chunk's data is not followed by CR LF"


def fuzz_chunk_too_big(rng, host):
    size = rng.randint(8 * 1024 * 1024 + 1, 2**40)
    message = "refused: a chunked request body may have at most 8388608 bytes"
    return chunked(host, b"%x\r\nhello" % size), 413, message


def fuzz_trailer(rng, host):
    kind = rng.choice(["fold", "lf", "control", "syntax"])
    byte = rng.choice(CONTROLS_IN_VALUES)
    line = {
        "fold": "X-Sum: 1\r\n  more\r\n",
        "lf": "X-Sum: 1\n",
        "control": f"X-Sum: 1{chr(byte)}2\r\n",
        "syntax": rng.choice(["X Sum: 1\r\n", "X-Sum 1\r\n", ": 1\r\n"]),
    }[kind]
    body = f"5\r\nhello\r\n0\r\n{line}\r\n".encode("latin-1")
    return chunked(host, body), 400, fault_phrase(kind, "trailer line", byte)


def fuzz_trailers_too_big(rng, host):
    if rng.random() < 0.5:
        trailers = "".join(f"X-T{i}: {i}\r\n" for i in range(rng.randint(101, 200)))
        message, status = "refused: the request has more than 100 trailer fields", 431
    else:
        trailers = "".join(f"X-T{i}: {'t' * 30000}\r\n" for i in range(3))
        message, status = "refused: the trailers are longer than 65536 bytes", 431
    body = f"5\r\nhello\r\n0\r\n{trailers}\r\n".encode()
    return chunked(host, body), status, message


def fuzz_repeated_framing(rng, host):
    name = rng.choice(["Content-Length", "Transfer-Encoding"])
    value = "chunked" if name == "Transfer-Encoding" else "5"
    second = value if rng.random() < 0.5 else value.upper() + "0"
    fields = f"{name}: {value}\r\n{name}: {second}\r\n"
    message = "refused: Content-Length or Transfer-Encoding is given more than once"
    return post(host, fields, b"hello"), 400, message


def fuzz_content_length(rng, host):
    value = rng.choice(
        ["-5", "+5", "0x5", "5 5", "²", "٥", "1e3", "5,5", "", "5;", "0.5", "five"]
        + ["9" * rng.randint(13, 30)]
    )
    field = f"Content-Length: {value}\r\n".encode().decode("latin-1")
    shown = value.encode().decode("latin-1")
    return post(host, field), 400, f"refused: invalid Content-Length {shown!r}"


def fuzz_transfer_coding(rng, host):
    value = rng.choice(
        ["gzip", "chunked, chunked", "identity", "xchunked", "chunked;q=1"]
        + ["gzip, chunked", "chunked,", "compress", "chunk", "chunked chunked"]
    )
    fields = f"Transfer-Encoding: {value}\r\n"
    message = f"refused: unsupported Transfer-Encoding {value!r}"
    return post(host, fields, b"0\r\n\r\n"), 400, message


def fuzz_length_and_coding(rng, host):
    fields = ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"]
    rng.shuffle(fields)
    message = "refused: both Transfer-Encoding and Content-Length are set"
    return post(host, "".join(fields), b"0\r\n\r\n"), 400, message


def fuzz_host_count(rng, host):
    hosts = f"Host: {host}\r\n" * rng.choice([0, 2, 3])
    raw = f"GET /version HTTP/1.1\r\n{hosts}Accept: */*\r\n\r\n".encode()
    return raw, 400, "refused: the request must have exactly one Host header"


def fuzz_header_line(rng, host):
    kind = rng.choice(["fold", "lf", "control", "syntax"])
    byte = rng.choice(CONTROLS_IN_VALUES)
    name = rng.choice(["X Y", "X(y)", "", "X@", "Xé", "X[1]", 'X"', "X/y", "X{}"])
    line = {
        "fold": "Accept: application/json\r\n\tapplication/yaml\r\n",
        "lf": "Accept: */*\n",
        "control": f"Accept: a{chr(byte)}b\r\n",
        "syntax": rng.choice([f"{name}: v\r\n", "Accept */*\r\n", "Accept : */*\r\n"]),
    }[kind]
    raw = f"GET /version HTTP/1.1\r\nHost: {host}\r\n{line}\r\n".encode()
    return raw, 400, fault_phrase(kind, "header line", byte)


def fuzz_target_byte(rng, host):
    byte = rng.choice(NOT_IN_TARGETS)
    path = "/api/v1/pods?labelSelector=app%3Dweb"
    at = rng.randint(1, len(path))
    target = path[:at].encode() + bytes([byte]) + path[at:].encode()
    raw = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host.encode())
    return raw, 400, f"refused: byte 0x{byte:02x} is not allowed in the request target"


def fuzz_target_escape(rng, host):
    escape = rng.choice(["%", "%4", "%zz", "%4g", "%g4", "%%41", "%-1"])
    target = rng.choice(["/version", "/api/v1/pods?x=", "/"]) + escape
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    message = (
        "refused: the request target has a '%' that is not followed by two hex digits"
    )
    return raw, 400, message


def fuzz_target_form(rng, host):
    target = rng.choice(
        ["*", f"http://{host}/version", "version", "?a=b", "127.0.0.1:443", "%2F"]
    )
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return raw, 400, "refused: the request target must be a path"


def fuzz_request_line(rng, host):
    line = rng.choice(
        [
            "GET  /version HTTP/1.1\r\n",
            "GET\t/version HTTP/1.1\r\n",
            "GET /version\tHTTP/1.1\r\n",
            "GET /version http/1.1\r\n",
            "GET /version\r\n",
            "GET /version HTTP/1.1\n",
            "GET /version HTTP/1.1 \r\n",
            " GET /version HTTP/1.1\r\n",
            "GET /a b HTTP/1.1\r\n",
            "GE(T /version HTTP/1.1\r\n",
            "\r\n",
            "GET /version HTTP/1.1\r\r\n",
            "GET /version HTTP/11\r\n",
            "GET /version HTTP/1.1x\r\n",
        ]
    )
    raw = f"{line}Host: {host}\r\n\r\n".encode()
    return raw, 400, "refused: the request line is not 'METHOD /path HTTP/1.1'"


def fuzz_version(rng, host):
    version = rng.choice(["2.0", "0.9", "1.2", "3.0", "9.9", "0.0", "1.9"])
    raw = f"GET /version HTTP/{version}\r\nHost: {host}\r\n\r\n".encode()
    return raw, 400, "refused: only HTTP/1.0 and HTTP/1.1 are served"


def fuzz_http10_coding(rng, host):
    raw = (
        f"POST {PODS} HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\n"
    ).encode()
    return raw, 400, "refused: Transfer-Encoding is not allowed in an HTTP/1.0 request"


def fuzz_many_fields(rng, host):
    fields = "".join(f"X-F{i}: {i}\r\n" for i in range(rng.randint(100, 300)))
    raw = f"GET /version HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n".encode()
    return raw, 431, "refused: the request has more than 100 header fields"


def fuzz_long_head(rng, host):
    fields = "".join(
        f"X-Long{i}: {'v' * rng.randint(5000, 70000)}\r\n"
        for i in range(rng.randint(1, 3))
    )
    fields += f"X-Pad: {'p' * (65536 - len(fields))}\r\n"
    raw = f"GET /version HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n".encode()
    return raw, 431, "refused: the request's head is longer than 65536 bytes"


def fuzz_long_request_line(rng, host):
    target = "/version?x=" + "a" * rng.randint(65536, 90000)
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return raw, 414, "refused: the request line is longer than 65536 bytes"


HTTP_FUZZ_FAMILIES = [
    fuzz_chunk_size,
    fuzz_chunk_size,
    fuzz_chunk_line_long,
    fuzz_chunk_data_end,
    fuzz_chunk_too_big,
    fuzz_trailer,
    fuzz_trailers_too_big,
    fuzz_repeated_framing,
    fuzz_content_length,
    fuzz_transfer_coding,
    fuzz_length_and_coding,
    fuzz_host_count,
    fuzz_header_line,
    fuzz_header_line,
    fuzz_target_byte,
    fuzz_target_byte,
    fuzz_target_escape,
    fuzz_target_form,
    fuzz_request_line,
    fuzz_version,
    fuzz_http10_coding,
    fuzz_many_fields,
    fuzz_long_head,
    fuzz_long_request_line,
]


def test_http_fuzz_malformed_requests_never_reach_the_card_or_the_api_server(
    card57, proxies, cluster, tmp_path, capsys
):
    """Seeded: the same requests every run. Each gets its exact answer, the API
    server sees no connection and the card signs nothing."""
    proxy = proxies.setup(cluster, tmp_path / "yk", proxy_extra=("-v",))  # -vv
    host = f"127.0.0.1:{proxy.port}"
    rng = random.Random(HTTP_FUZZ_SEED)
    signed, statuses = card57.sign_count, {}
    for i in range(HTTP_FUZZ_CASES):
        family = HTTP_FUZZ_FAMILIES[i % len(HTTP_FUZZ_FAMILIES)]
        raw, status, message = family(rng, host)
        answer = local_request(proxy, raw)
        assert answer_of(answer) == (status, message), (family.__name__, raw[:200])
        assert cluster.api.handshakes == 0 and cluster.api.requests == []
        assert card57.sign_count == signed, (family.__name__, raw[:200])
        statuses[status] = statuses.get(status, 0) + 1
    forwarded, connected = len(cluster.api.requests), cluster.api.handshakes
    signatures = card57.sign_count - signed
    done = kubectl(proxy, "get", "--raw", "/version")  # and then it still works
    assert done.returncode == 0, done.stderr
    log = proxy.stderr()
    proxy.stop()
    tracebacks = log.count("Traceback (most recent call last)")
    refusals = [line for line in log.splitlines() if ": refused: " in line]
    FAULT_FIGURES.append(
        f"HTTP fuzz (seed {HTTP_FUZZ_SEED}): {HTTP_FUZZ_CASES} malformed requests in "
        f"{len(HTTP_FUZZ_FAMILIES)} families, answers {dict(sorted(statuses.items()))}; "
        f"tracebacks {tracebacks}, forwarded {forwarded}, upstream connections "
        f"{connected}, card signatures {signatures}"
    )
    assert tracebacks == 0
    assert len(refusals) == HTTP_FUZZ_CASES
    assert all(line.startswith(f"{yk.PROG}: WARNING: ") for line in refusals)


@pytest.mark.parametrize(
    "raw, status, message",
    [
        *[
            (
                b"POST %s HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%s\r\nhello\r\n0\r\n\r\n" % (PODS.encode(), size),
                400,
                f"refused: malformed chunk-size line {size.decode()!r}",
            )
            for size in [b"-5", b"+5", b"0x5", b"1_0", b"10000000000000005"]
        ],
        (
            b"POST /api HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5;"
            + b"x" * 1100
            + b"\r\nhello\r\n0\r\n\r\n",
            400,
            "refused: a chunk-size line is longer than 1024 bytes",
        ),
        (
            b"POST /api HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            400,
            "refused: Content-Length or Transfer-Encoding is given more than once",
        ),
        (
            b"POST /api HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "refused: Content-Length or Transfer-Encoding is given more than once",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",
            400,
            "refused: the request must have exactly one Host header",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nAccept: a\r\n b\r\n\r\n",
            400,
            "refused: a folded header line (obs-fold)",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nAccept: a\rX-Injected: b\r\n\r\n",
            400,
            "refused: a header line with the control character 0x0d",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nAccept: a\x00b\r\n\r\n",
            400,
            "refused: a header line with the control character 0x00",
        ),
        (
            b"POST /api HTTP/1.1\r\nHost: {host}\r\nContent-Length: \xc2\xb2\r\n\r\nx",
            400,
            "refused: invalid Content-Length '\xc2\xb2'",
        ),
        (
            b"GET /version\x1b[2J HTTP/1.1\r\nHost: {host}\r\n\r\n",
            400,
            "refused: byte 0x1b is not allowed in the request target",
        ),
        (
            b"GET /version%00\x00 HTTP/1.1\r\nHost: {host}\r\n\r\n",
            400,
            "refused: byte 0x00 is not allowed in the request target",
        ),
        (
            b"GET /version HTTP/1.1\r\nHost: {host}\r\nAccept: */*\n\r\n",
            400,
            "refused: a header line that does not end with CR LF",
        ),
        (
            b"POST /api HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n 2\r\n\r\n",
            400,
            "refused: a folded trailer line (obs-fold)",
        ),
    ],
    ids=[
        "chunk-size--5",
        "chunk-size-+5",
        "chunk-size-0x5",
        "chunk-size-1_0",
        "chunk-size-17-digits",
        "chunk-line-over-1024",
        "two-content-lengths",
        "two-transfer-encodings",
        "two-hosts",
        "obs-fold",
        "bare-cr",
        "nul",
        "superscript-two-length",
        "escape-in-target",
        "nul-in-target",
        "bare-lf",
        "folded-trailer",
    ],
)
def test_strict_reader_refuses_before_any_upstream_connection(
    proxied, cluster, card57, raw, status, message
):
    signed = card57.sign_count
    answer = local_request(
        proxied, raw.replace(b"{host}", f"127.0.0.1:{proxied.port}".encode())
    )
    assert answer_of(answer) == (status, message)
    assert cluster.api.handshakes == 0 and cluster.api.requests == []
    assert card57.sign_count == signed
    # One WARNING line with method, path and reason, control characters escaped.
    method, path = raw.split(b" ")[:2]
    shown = path.decode("latin-1").replace("\x1b", "\\x1b").replace("\x00", "\\x00")
    line = f"{yk.PROG}: WARNING: {method.decode()} {shown}: {message}"
    assert proxied.stderr().splitlines().count(line) == 1


def test_chunked_body_with_extensions_and_trailers_is_checked_and_forwarded_whole(
    proxied, cluster, card57
):
    pod = json.dumps({"metadata": {"name": "chunky"}, "spec": {}}).encode()
    body = (
        b'%x;name=value;q="a \\"b\\"" ; flag\r\n%s\r\n' % (10, pod[:10])
        + b"%X\r\n%s\r\n" % (len(pod) - 10, pod[10:])
        + b"000;last\r\nX-Checksum: 1\r\nX-Other:\r\n\r\n"
    )
    host = f"127.0.0.1:{proxied.port}"
    answer = local_request(
        proxied,
        chunked(host, body, "Content-Type: application/json\r\nConnection: close\r\n"),
    )
    head, _, created = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert json.loads(created)["metadata"]["name"] == "chunky"
    [request] = cluster.api.requests
    assert request["headers"]["content-length"] == str(len(pod))
    assert "transfer-encoding" not in request["headers"]
    assert "x-checksum" not in request["headers"]


def test_truncated_request_bodies_are_the_clients_fault(
    card57, proxies, cluster, tmp_path
):
    proxy = proxies.setup(cluster, tmp_path / "yk", "--plain-http")
    host = f"127.0.0.1:{proxy.port}"

    def half_sent(raw: bytes) -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # the client stops sending
            return answer_of(b"".join(iter(lambda: sock.recv(65536), b"")))

    signed = card57.sign_count
    # A chunked body is read whole first: nothing goes upstream.
    assert half_sent(chunked(host, b"a\r\nhello")) == (
        400,
        "refused: the chunked request body ended before its last chunk: the "
        "client stopped sending it; try again",
    )
    assert cluster.api.handshakes == 0 and card57.sign_count == signed
    # A Content-Length body is streamed: the API server saw the start of it.
    assert half_sent(post(host, "Content-Length: 100\r\n", b'{"kind":')) == (
        400,
        "the request body is shorter than its Content-Length: the client stopped "
        "sending it, so the request was not completed; try again",
    )
    wait_until(lambda: cluster.api.requests, 10, "the API server to see the head")
    assert [r["method"] for r in cluster.api.requests] == ["POST"]
    assert "502" not in proxy.stderr()


def test_error_answers_linger_while_the_client_is_still_sending(
    card57, proxies, cluster, tmp_path
):
    """After a refusal the proxy half-closes and reads on, so the answer is not
    destroyed by a reset while the client is still sending (its body, say)."""
    proxy = proxies.setup(cluster, tmp_path / "yk", "--plain-http")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(post(f"127.0.0.1:{proxy.port}", "Content-Length: -5\r\n"))
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # to its FIN
        assert answer_of(answer) == (400, "refused: invalid Content-Length '-5'")
        for _ in range(8):  # half of LINGER_BYTES, after the answer
            sock.sendall(b"x" * 65536)  # a closed socket would answer RST
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""


# -- the relay: what the API server sends back -------------------------------------


def canned_upstream(server_pki, client_ca: x509.Certificate, answer: bytes):
    """A TLS API server that answers each request with ``answer`` and hangs up."""
    ca, cert, key = server_pki
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tempfile_bytes(pem(cert) + pem(key)))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem(client_ca).decode())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                with context.wrap_socket(raw, server_side=True) as tls:
                    head = b""
                    while b"\r\n\r\n" not in head and (data := tls.recv(65536)):
                        head += data
                    tls.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@contextlib.contextmanager
def proxy_to_canned_upstream(tmp_path: Path, answer: bytes):
    server_pki = make_server_pki()
    ident = make_identity()
    listener = canned_upstream(server_pki, ident.ca_cert, answer)
    port = listener.getsockname()[1]
    kubeconfig = write_kubeconfig(
        tmp_path / "k.yaml", ident, server=f"https://127.0.0.1:{port}"
    )
    doc = yaml.safe_load(kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = b64(
        pem(server_pki[0])
    )
    kubeconfig.write_text(yaml.safe_dump(doc))
    try:
        proxy = setup_and_proxy(
            types.SimpleNamespace(kubeconfig=kubeconfig), tmp_path / "yk"
        )
        try:
            yield proxy, port
        finally:
            proxy.stop()
    finally:
        listener.close()


VERSION_BODY = b'{"major":"1","minor":"32","gitVersion":"v1.32.0"}'


def test_early_hints_are_relayed_and_the_final_answer_follows(card57, tmp_path):
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </openapi/v3>; rel=preload\r\n\r\n"
    final = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(VERSION_BODY), VERSION_BODY)
    )
    with proxy_to_canned_upstream(tmp_path, early + early + final) as (proxy, port):
        done = kubectl(proxy, "get", "--raw", "/version", timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.encode() == VERSION_BODY
        relayed = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(VERSION_BODY), VERSION_BODY)
        )
        host = f"127.0.0.1:{proxy.port}".encode()
        request = b"GET /version HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        assert local_request(proxy, request % host) == early + early + relayed
        # HTTP/1.0 clients never get interim answers (RFC 9110 15.2).
        request = b"GET /version HTTP/1.0\r\nHost: %s\r\n\r\n"
        assert local_request(proxy, request % host) == relayed.replace(
            b"Content-Length", b"Connection: close\r\nContent-Length"
        )


@pytest.mark.parametrize(
    "line, fault",
    [
        (
            b"X-Evil: a\rSet-Cookie: b\r\n",
            "a header line with the control character 0x0d",
        ),
        (b"X-Evil: a\r\n b\r\n", "a folded header line (obs-fold)"),
        (b"X-Evil: a\x00b\r\n", "a header line with the control character 0x00"),
        (b"X-Evil: a\n", "a header line that does not end with CR LF"),
        (b"X-Evil : a\r\n", "a header line that is not 'Name: value'"),
        (
            b"Content-Length: 7\r\n",
            "a response where Content-Length or Transfer-Encoding is given more than "
            "once",
        ),
        (
            b"Transfer-Encoding: chunked\r\n",
            "a response where both Transfer-Encoding and Content-Length are set",
        ),
    ],
    ids=[
        "bare-cr",
        "obs-fold",
        "nul",
        "bare-lf",
        "space-before-colon",
        "two-lengths",
        "length-and-chunked",
    ],
)
def test_malformed_upstream_headers_make_a_502(card57, tmp_path, line, fault):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s"
        % (len(VERSION_BODY), line, VERSION_BODY)
    )
    with proxy_to_canned_upstream(tmp_path, answer) as (proxy, port):
        host = f"127.0.0.1:{proxy.port}".encode()
        request = b"GET /version HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        answer = local_request(proxy, request % host)
    assert answer_of(answer) == (
        502,
        f"the API server at 127.0.0.1:{port} sent {fault}: the answer is not relayed",
    )
    assert b"Evil" not in answer and b"Set-Cookie" not in answer


def test_a_cut_chunked_answer_is_not_completed_for_the_client(card57, tmp_path):
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    with proxy_to_canned_upstream(tmp_path, cut) as (proxy, port):
        host = f"127.0.0.1:{proxy.port}".encode()
        request = b"GET /version HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        answer = local_request(proxy, request % host)
    # No last chunk: kubectl sees a broken answer, never a complete short one.
    assert answer == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )


def test_http10_clients_get_a_close_delimited_body(proxied, cluster):
    host = f"127.0.0.1:{proxied.port}".encode()
    answer = local_request(
        proxied, b"GET /chunked?n=200000 HTTP/1.0\r\nHost: %s\r\n\r\n" % host
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert [x for x in lines if not x.startswith((b"Server:", b"Date:"))] == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: application/octet-stream",
        b"Cache-Control: no-cache, private",
        b"Connection: close",
    ]
    assert body == expected_bytes(200000)
    # The same for an HTTP/1.1 client comes chunked, as it came.
    answer = local_request(
        proxied,
        b"GET /chunked?n=5 HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host,
    )
    assert answer.endswith(
        b"Transfer-Encoding: chunked\r\n\r\n5\r\n\x00\x01\x02\x03\x04\r\n0\r\n\r\n"
    )


# -- bounded resources: timeouts, a connection cap, a flood -------------------------


@contextlib.contextmanager
def proxy_in_process(workdir: Path, monkeypatch, **limits):
    """`proxy` in a thread of the test process, with some of its limits made
    small (module constants); yields the ProxyServer."""
    for name, value in limits.items():
        monkeypatch.setattr(yk, name, value)
    servers: list = []
    start = yk.start_server
    monkeypatch.setattr(
        yk, "start_server", lambda *a: servers.append(start(*a)) or servers[-1]
    )
    argv = ["proxy", "--kubeconfig", str(workdir / "proxy.yml")]
    codes: list = []
    thread = threading.Thread(
        target=lambda: codes.append(yk.main([*argv, "--listen", "127.0.0.1:0"]))
    )
    thread.start()
    wait_until(lambda: servers or codes, 30, "the proxy to listen")
    try:
        yield servers[0]
    finally:
        if servers:
            servers[0].shutdown()
        thread.join(30)
    assert codes == [0]


def local_connection(workdir: Path, port: int, tls: bool) -> socket.socket:
    """A socket to the proxy, with the local hop's TLS done when ``tls``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    if not tls:
        return sock
    proxy = types.SimpleNamespace(
        client_config=workdir / "client.yml", workdir=workdir, port=port
    )
    return LocalClient(proxy).context.wrap_socket(sock, server_hostname="127.0.0.1")


def closed_by_the_proxy(sock: socket.socket) -> bool:
    """Waits (up to the socket's timeout) for the proxy to close the connection."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def setup_local_hop(cluster: Cluster, workdir: Path, tls: bool) -> None:
    argv = ["setup", "--kubeconfig", str(cluster.kubeconfig), "--output-dir"]
    assert yk.main([*argv, str(workdir), *([] if tls else ["--plain-http"])]) == 0


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-http"])
def test_silent_and_idle_local_connections_are_closed(
    card57, cluster, tmp_path, monkeypatch, capsys, tls
):
    workdir = tmp_path / "yk"
    setup_local_hop(cluster, workdir, tls)
    short = dict(IDLE_TIMEOUT=1.0, LOCAL_HANDSHAKE_TIMEOUT=1.0, HEADER_TIMEOUT=60.0)
    with proxy_in_process(workdir, monkeypatch, **short) as server:
        port = server.server_address[1]
        # Never a TLS handshake, or never a request: closed, not kept for ever.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as silent:
            assert closed_by_the_proxy(silent)
        # A keep-alive connection idle after its first request.
        with local_connection(workdir, port, tls) as sock:
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200 and json.loads(response.read())
            assert not response.will_close
            assert closed_by_the_proxy(sock)
        wait_until(lambda: server.connections == 0, 10, "the handlers to end")


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-http"])
def test_request_heads_must_arrive_within_the_header_timeout(
    card57, cluster, tmp_path, monkeypatch, capsys, tls
):
    workdir = tmp_path / "yk"
    setup_local_hop(cluster, workdir, tls)
    short = dict(IDLE_TIMEOUT=60.0, LOCAL_HANDSHAKE_TIMEOUT=60.0, HEADER_TIMEOUT=1.0)
    with proxy_in_process(workdir, monkeypatch, **short) as server:
        port = server.server_address[1]
        head = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port
        with local_connection(workdir, port, tls) as sock:  # stops half-way
            sock.sendall(head)
            assert closed_by_the_proxy(sock)
        # One byte at a time, never pausing long: the deadline still holds.
        slow = head + b"X-Slow: " + b"a" * 600 + b"\r\n\r\n"
        with local_connection(workdir, port, tls) as sock:
            sock.settimeout(0.05)  # the pace of the sender
            for sent in range(len(slow)):
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1) == b"":
                        break
                sock.sendall(slow[sent : sent + 1])
            assert sent < len(slow) - 1  # closed before the head was complete
    assert cluster.api.handshakes == 0


def test_connection_cap_refuses_quickly_and_warns_once(
    card57, cluster, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "yk"
    setup_local_hop(cluster, workdir, tls=False)
    capsys.readouterr()
    limits = dict(MAX_CONNECTIONS=8, IDLE_TIMEOUT=60.0)
    with proxy_in_process(workdir, monkeypatch, **limits) as server:
        port = server.server_address[1]
        held = [local_connection(workdir, port, tls=False) for _ in range(8)]
        wait_until(lambda: server.connections == 8, 10, "8 connections accepted")
        extra = [local_connection(workdir, port, tls=False) for _ in range(3)]
        assert [closed_by_the_proxy(sock) for sock in extra] == [True] * 3
        for sock in held + extra:
            sock.close()
        wait_until(lambda: server.connections == 0, 10, "the held connections to end")
        with local_connection(workdir, port, tls=False) as sock:
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
    warnings = [x for x in capsys.readouterr().err.splitlines() if "connections" in x]
    assert warnings == [
        f"{yk.PROG}: WARNING: 8 local connections are open, the most this proxy "
        f"serves: closing new ones until some end (is another program flooding port "
        f"{port}?)"
    ]


FLOODER = """
import selectors, socket, sys, time
port, count, until, wait = map(int, sys.argv[1:5])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("holding", len(socks), flush=True)
selector, closed = selectors.DefaultSelector(), 0
for sock in socks:
    selector.register(sock, selectors.EVENT_READ)
deadline = time.monotonic() + wait
while closed < until and time.monotonic() < deadline:
    for key, _ in selector.select(max(0, deadline - time.monotonic())):
        try:
            data = key.fileobj.recv(1)
        except OSError:
            data = b""
        if not data:
            selector.unregister(key.fileobj)
            closed += 1
            if closed == until:
                break
print("closed", closed, flush=True)
sys.stdin.read()
"""


def flooder(port: int, count: int, until: int) -> subprocess.Popen:
    """Another local process holding ``count`` idle connections; it reports when
    the proxy has closed ``until`` of them (or after 60 s)."""
    process = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(port), str(count), str(until), "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == f"holding {count}\n"
    return process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_flood_of_idle_connections_leaves_kubectl_working(
    card57, proxies, cluster, tmp_path
):
    import resource

    proxy = proxies.setup(cluster, tmp_path / "yk")
    pid = proxy.process.pid
    started = time.monotonic()
    assert kubectl(proxy, "get", "--raw", "/version").returncode == 0
    alone = time.monotonic() - started
    baseline = process_counts(pid)
    cpu, started = cpu_seconds(pid), time.monotonic()
    flood = flooder(proxy.port, 200, until=200)
    times = []
    for _ in range(3):
        begun = time.monotonic()
        done = kubectl(proxy, "get", "--raw", "/version")
        times.append(time.monotonic() - begun)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["gitVersion"] == "v1.32.0"
    peak = process_counts(pid)
    # No handshake within LOCAL_HANDSHAKE_TIMEOUT: the proxy closes them all.
    assert flood.stdout.readline() == "closed 200\n"
    flood_cpu = cpu_seconds(pid) - cpu
    flood_wall = time.monotonic() - started
    flood.stdin.close()
    flood.wait(30)
    wait_for_counts(pid, baseline)
    # Out of descriptors: accept() fails with EMFILE, and must not spin.
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline[1] + 10, hard))
    try:
        flood = flooder(proxy.port, 40, until=5)
        wait_until(
            lambda: (
                "cannot accept local connections (Too many open files)"
                in proxy.stderr()
            ),
            30,
            "accept() to run out of descriptors",
        )
        cpu, started = cpu_seconds(pid), time.monotonic()
        assert flood.stdout.readline() == "closed 5\n"  # by the handshake timeout
        starved_cpu = cpu_seconds(pid) - cpu
        starved_wall = time.monotonic() - started
        flood.stdin.close()
        flood.wait(30)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    wait_for_counts(pid, baseline)
    after = process_counts(pid)
    proxy.stop()
    FAULT_FIGURES.append(
        f"flood: another process held 200 idle connections; kubectl answered 3/3 "
        f"in {max(times):.2f} s at most ({alone:.2f} s alone); proxy CPU "
        f"{flood_cpu:.2f} s in {flood_wall:.1f} s; threads/descriptors "
        f"{baseline} -> {peak} -> {after}"
    )
    FAULT_FIGURES.append(
        f"out of descriptors (EMFILE) for {starved_wall:.1f} s: proxy CPU "
        f"{starved_cpu:.2f} s; kubectl answered afterwards"
    )
    assert flood_cpu < 0.25 * flood_wall
    assert starved_cpu < 0.25 * starved_wall


# =============================================================================
# 5. Resilience: the card, pcscd, the network and the client misbehave; presence
# =============================================================================


@pytest.fixture
def proxied_rig(cards, proxies, cluster, tmp_path, capsys):
    """A card, the proxy and a local client; the card is the test's to pull."""
    piv = VirtualPiv(serial=81000008)
    state = types.SimpleNamespace(piv=piv, card=cards(piv))
    state.proxy = proxies.setup(cluster, tmp_path / "yk")
    state.client = LocalClient(state.proxy)
    capsys.readouterr()
    return state


@pytest.mark.fault
def test_card_removed_during_a_burst_and_reinserted_elsewhere(proxied_rig, cluster):
    state = proxied_rig
    before = [state.client.get("/version")[0] for _ in range(5)]
    state.card.remove()
    absent = [state.client.get("/version") for _ in range(5)]
    # Plugged back in, the key shows up in the other reader: found again by serial.
    state.card.insert(index=1)
    after = [state.client.get("/version")[0] for _ in range(10)]
    failed_absent = sum(status != 200 for status, _ in absent)
    failed_after = sum(status != 200 for status in after)
    FAULT_FIGURES.append(
        f"card pulled mid-burst: {len(before)} ok before, {failed_absent}/"
        f"{len(absent)} failed while absent, {failed_after}/{len(after)} "
        "failed after re-insertion"
    )
    assert before == [200] * 5
    assert {status for status, _ in absent} == {503}
    assert json.loads(absent[0][1])["message"] == (
        f"YubiKey not present in reader '{YUBIKEY_READER} 00 00' - insert it"
    )
    assert failed_after == 0
    assert state.piv.sign_count - 1 == cluster.api.handshakes == 15


@pytest.mark.fault
def test_card_removed_mid_download_and_mid_exec(proxied_rig, proxies, cluster):
    state = proxied_rig
    state.proxy.stop()  # the opt-out: open streams outlive the card
    state.proxy = proxies(state.proxy.workdir, "--keep-streams-on-removal")
    state.client = LocalClient(state.proxy)
    cluster.api.add_pod("box", namespace="team-a")
    conn = state.client.connection()
    conn.request("GET", "/bytes?n=50000000")
    response = conn.getresponse()
    first = response.read(1_000_000)
    exec_proc = subprocess.Popen(
        [
            "kubectl",
            "--kubeconfig",
            str(state.proxy.client_config),
            "exec",
            "-i",
            "box",
            "--",
            "cat",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    exec_proc.stdin.write(b"before\n")
    exec_proc.stdin.flush()
    assert exec_proc.stdout.readline() == b"before\n"
    state.card.remove()  # with --keep-streams-on-removal the streams go on
    rest = response.read()
    conn.close()
    exec_proc.stdin.write(b"after\n")
    exec_proc.stdin.close()
    out = exec_proc.stdout.read()
    assert (exec_proc.wait(30), out) == (0, b"after\n")
    assert first + rest == expected_bytes(50_000_000)
    assert state.client.get("/version")[0] == 503
    state.card.insert()
    assert state.client.get("/version")[0] == 200


@pytest.mark.fault
def test_pcscd_restart_is_recovered(proxied_rig, rig, cluster):
    state = proxied_rig
    assert state.client.get("/version")[0] == 200
    state.card.remove(wait=False)
    rig.stop()
    rig.start()
    state.card.insert()
    statuses = [state.client.get("/version")[0] for _ in range(3)]
    FAULT_FIGURES.append(f"pcscd restarted: {statuses.count(200)}/3 requests ok after")
    assert statuses == [200, 200, 200]


@pytest.mark.fault
def test_another_programs_transaction_is_waited_for(proxied_rig, rig):
    from smartcard import scard

    state = proxied_rig
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    hresult, handle, _ = scard.SCardConnect(
        context, rig.reader(), scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
    )
    assert hresult == 0 and scard.SCardBeginTransaction(handle) == 0
    results = []
    worker = threading.Thread(
        target=lambda: results.append(state.client.get("/version"))
    )
    apdus = len(state.piv.apdu_log)
    started = time.monotonic()
    worker.start()
    # Not a wait for an event: the length of the other program's transaction.
    time.sleep(1.0)
    assert results == []  # the request waits for the card
    assert len(state.piv.apdu_log) == apdus  # and sends it nothing meanwhile
    scard.SCardEndTransaction(handle, scard.SCARD_LEAVE_CARD)
    worker.join(30)
    scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    FAULT_FIGURES.append(
        f"another program's 1 s transaction: request waited "
        f"{time.monotonic() - started:.2f} s and got {results[0][0]}"
    )
    assert results[0][0] == 200


@pytest.mark.fault
@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_fifty_concurrent_requests(cards, clusters, proxies, tmp_path, capsys, kind):
    piv = VirtualPiv(serial=91000009)
    cards(piv)
    cluster = clusters(tmp_path, kind=kind)
    proxy = proxies.setup(cluster, tmp_path / "yk")
    client = LocalClient(proxy)
    signed = piv.sign_count
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.get("/version")[0]))
        for _ in range(50)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - started
    FAULT_FIGURES.append(
        f"50 concurrent requests, {kind}: {results.count(200)} ok "
        f"in {elapsed:.2f} s, {piv.sign_count - signed} signatures,"
        f" {cluster.api.handshakes} handshakes"
    )
    assert results == [200] * 50
    assert piv.sign_count - signed == cluster.api.handshakes == 50


@pytest.mark.fault
def test_upstream_down_costs_no_signature(proxied_rig, cluster):
    state = proxied_rig
    signed = state.piv.sign_count
    cluster.api.stop()
    status, body = state.client.get("/version")
    assert status == 502
    assert json.loads(body)["message"] == (
        f"cannot connect to the API server at 127.0.0.1:{cluster.api.port} (Connection "
        "refused): is the cluster up and reachable?"
    )
    assert state.piv.sign_count == signed


def silent_server() -> tuple[socket.socket, int]:
    """Accepts connections and never answers (a hung API server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, listener.getsockname()[1]


@pytest.mark.fault
def test_upstream_handshake_timeout(card57, proxies, tmp_path, capsys):
    listener, port = silent_server()
    ident = make_identity()
    kubeconfig = write_kubeconfig(
        tmp_path / "k.yaml", ident, server=f"https://127.0.0.1:{port}"
    )
    try:
        proxy = proxies.setup(
            types.SimpleNamespace(kubeconfig=kubeconfig),
            tmp_path / "yk",
            proxy_extra=("--handshake-timeout", "1"),
        )
        started = time.monotonic()
        status, body = LocalClient(proxy).get("/version")
        elapsed = time.monotonic() - started
        assert status == 504
        assert json.loads(body)["message"] == (
            f"the TLS handshake with the API server at 127.0.0.1:{port} took longer "
            "than 1 s"
        )
        assert elapsed < 10
    finally:
        listener.close()


def truncating_server(
    server_pki, client_ca: x509.Certificate
) -> tuple[socket.socket, int]:
    """A TLS API server that sends half a body and hangs up."""
    ca, cert, key = server_pki
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bundle = tempfile_bytes(pem(cert) + pem(key))
    context.load_cert_chain(bundle)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem(client_ca).decode())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
                        + b"x" * 400_000
                    )

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def tempfile_bytes(data: bytes) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile(delete=False)
    handle.write(data)
    handle.close()
    return handle.name


@pytest.mark.fault
def test_client_leaving_mid_response_leaks_nothing(proxied_rig, cluster):
    state = proxied_rig
    pid = state.proxy.process.pid
    assert state.client.get("/version")[0] == 200
    baseline = process_counts(pid)
    # The client leaves after 1 MB of a 200 MB download.
    for _ in range(3):
        conn = state.client.connection()
        conn.request("GET", "/bytes?n=200000000")
        response = conn.getresponse()
        assert len(response.read(1_000_000)) == 1_000_000
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    wait_for_counts(pid, baseline)
    threads, fds = process_counts(pid)
    FAULT_FIGURES.append(
        f"client left 3 downloads mid-way: proxy threads {baseline[0]} -> "
        f"{threads}, descriptors {baseline[1]} -> {fds}"
    )
    assert state.client.get("/version")[0] == 200


@pytest.mark.fault
def test_upstream_closing_mid_response(card57, proxies, tmp_path, capsys):
    server_pki = make_server_pki()
    ident = make_identity()
    listener, port = truncating_server(server_pki, ident.ca_cert)
    kubeconfig = write_kubeconfig(
        tmp_path / "k.yaml", ident, server=f"https://127.0.0.1:{port}"
    )
    doc = yaml.safe_load(kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = b64(
        pem(server_pki[0])
    )
    kubeconfig.write_text(yaml.safe_dump(doc))
    try:
        proxy = proxies.setup(
            types.SimpleNamespace(kubeconfig=kubeconfig), tmp_path / "yk"
        )
        client = LocalClient(proxy)
        pid = proxy.process.pid
        conn = client.connection()
        conn.request("GET", "/version")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as short:
            response.read()
        conn.close()
        assert len(short.value.partial) == 400_000
        baseline = process_counts(pid)
        for _ in range(3):
            with contextlib.suppress(http.client.IncompleteRead):
                client.get("/version")
        wait_for_counts(pid, baseline)
        FAULT_FIGURES.append(
            f"upstream hung up mid-response: client got "
            f"{len(short.value.partial)} of 1000000 bytes, proxy "
            f"threads/descriptors back to {process_counts(pid)}"
        )
    finally:
        listener.close()


@pytest.mark.fault
def test_wrong_pin_file_costs_exactly_one_try(
    cards, proxies, cluster, tmp_path, capsys
):
    piv, proxy, client, pins = proxy_after_a_wrong_pin_reload(
        cards, proxies, cluster, tmp_path, 10100010
    )
    tries = piv.pin_tries_left
    answers = [client.get("/version") for _ in range(6)]
    FAULT_FIGURES.append(
        f"wrong PIN file, 6 requests: the card's tries went {tries} -> "
        f"{piv.pin_tries_left}"
    )
    assert {status for status, _ in answers} == {503}
    assert piv.pin_tries_left == tries - 1
    assert json.loads(answers[-1][1])["message"] == (
        "wrong PIN: the YubiKey has 2 tries left before it blocks the PIN; check the PIN "
        "(or the PIN file) and try again (the proxy will not send it again: fix the PIN "
        "or the PIN file, then reload the proxy with kill -HUP or 'systemctl --user "
        "reload yubikey-kube-proxy', or restart it)"
    )
    pins.write_text("123456\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.stderr().count("reloading") == 2, 10, "the second reload")
    assert client.get("/version")[0] == 200
    assert piv.pin_tries_left == 3


@pytest.mark.fault
def test_touch_slow_and_never(cards, proxies, cluster, tmp_path, capsys):
    touches = {"delay": 0.0, "given": True}

    def touch(slot):
        time.sleep(touches["delay"])
        return touches["given"]

    piv = VirtualPiv(serial=10200011, touch=touch)
    cards(piv)
    proxy = proxies.setup(cluster, tmp_path / "yk", "--touch-policy", "always")
    client = LocalClient(proxy)
    touches["delay"] = 1.5
    assert client.get("/version")[0] == 200
    assert "WARNING: touch your YubiKey (YubiKey serial 10200011" in proxy.stderr()
    touches.update(delay=2.0, given=False)  # the card's wait runs out
    results: list[tuple[int, bytes]] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.get("/version")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [status for status, _ in results] == [
        503,
        503,
    ]  # both answered, one by one
    assert json.loads(results[0][1])["message"] == (
        "the YubiKey refused to sign with slot 9a: the PIN was not verified or the key "
        "was not touched in time"
    )
    touches.update(delay=0.0, given=True)
    assert client.get("/version")[0] == 200


def test_sigterm_lets_an_open_request_finish(proxied, cluster):
    client = LocalClient(proxied)
    conn = client.connection()
    conn.request("GET", "/slow?seconds=2")
    wait_until(
        lambda: any(r["path"].startswith("/slow") for r in cluster.api.requests),
        20,
        "the request to reach the API server",
    )
    proxied.process.send_signal(signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 200
    response.read()
    assert proxied.process.wait(20) == 0


@pytest.mark.fault
def test_card_reset_by_another_program_is_recovered(proxied_rig, rig):
    from smartcard import scard

    state = proxied_rig
    assert state.client.get("/version")[0] == 200
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    hresult, handle, _ = scard.SCardConnect(
        context, rig.reader(), scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
    )
    hresult, _ = scard.SCardReconnect(
        handle,
        scard.SCARD_SHARE_SHARED,
        scard.SCARD_PROTOCOL_T1,
        scard.SCARD_RESET_CARD,
    )
    assert hresult == 0
    scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    statuses = [state.client.get("/version")[0] for _ in range(3)]
    FAULT_FIGURES.append(
        f"card reset by another program: {statuses.count(200)}/3 ok after"
    )
    assert statuses == [200, 200, 200]


def test_reuse_while_present_one_signature_per_local_connection(
    cards, proxies, cluster, tmp_path, capsys
):
    piv = VirtualPiv(serial=10300012)
    card = cards(piv)
    proxy = proxies.setup(cluster, tmp_path / "yk", "--reuse-while-present")
    client = LocalClient(proxy)
    signed = piv.sign_count
    conn = client.connection()  # one local connection, as one kubectl run keeps
    for _ in range(4):
        conn.request("GET", "/version")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    assert (piv.sign_count - signed, cluster.api.handshakes) == (1, 1)
    done = kubectl(proxy, "get", "pods")
    assert done.returncode == 0, done.stderr
    per_kubectl = piv.sign_count - signed - 1
    FAULT_FIGURES.append(
        f"--reuse-while-present: 4 requests on one local connection, 1 "
        f"signature; kubectl get pods: {per_kubectl} signatures"
    )
    # The card goes away: the next request on the kept connection fails at once.
    card.remove()
    conn.request("GET", "/version")
    response = conn.getresponse()
    assert response.status == 503
    assert json.loads(response.read())["message"] == (
        f"YubiKey not present in reader '{YUBIKEY_READER} 00 00' - insert it"
    )
    conn.close()


# -- Presence: pooled connections bound to the card, streams that end with it ----------


def card_proxy(
    cards, proxies, cluster, workdir: Path, *proxy_extra: str, serial=12000000, **piv
):
    """A fresh card in the first reader, setup, and a proxy with ``proxy_extra``."""
    card = VirtualPiv(serial=serial, **piv)
    inserted = cards(card)
    proxy = proxies.setup(cluster, workdir, proxy_extra=proxy_extra)
    return card, inserted, proxy


def certificate_reads(piv: VirtualPiv) -> int:
    """GET DATA commands for slot 9a's certificate object in the card's log."""
    wanted = bytes.fromhex("5c035fc105")
    return sum(1 for a in piv.apdu_log if a[1] == 0xCB and wanted in a)


def open_streams(proxy: ProxyProcess, cluster: Cluster) -> dict:
    """kubectl get -w, logs -f and exec -i, each seen streaming."""
    cluster.api.add_pod("box", namespace="team-a")
    cluster.api.append_log("box", "hello", namespace="team-a")
    base = ["kubectl", "--kubeconfig", str(proxy.client_config)]
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streams = {
        "watch": subprocess.Popen(
            base + ["get", "pods", "-w", "--no-headers", "-o", "name"], **pipes
        ),
        "logs": subprocess.Popen(base + ["logs", "-f", "box"], **pipes),
        "exec": subprocess.Popen(base + ["exec", "-i", "box", "--", "cat"], **pipes),
    }
    assert streams["watch"].stdout.readline() == b"pod/box\n"  # the list, then:
    wait_until(
        lambda: any("watch=" in r["path"] for r in cluster.api.requests),
        20,
        "the watch request",
    )
    assert streams["logs"].stdout.readline() == b"hello\n"
    streams["exec"].stdin.write(b"ping\n")
    streams["exec"].stdin.flush()
    assert streams["exec"].stdout.readline() == b"ping\n"
    return streams


def stop_all(streams: dict) -> None:
    for process in streams.values():
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_pool_reuses_across_kubectl_runs_with_exact_signatures(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(
        cards, proxies, cluster, tmp_path / "yk", "--reuse-while-present"
    )
    signed, reads = card.sign_count, certificate_reads(card)
    for _ in range(3):  # three kubectl processes, each its own local connections
        done = kubectl(proxy, "get", "--raw", "/version")
        assert done.returncode == 0, done.stderr
    # One handshake, one signature for all of them; the certificate was read
    # at start only.
    assert (card.sign_count - signed, cluster.api.handshakes) == (1, 1)
    assert certificate_reads(card) == reads
    # Two requests at once: the one kept connection, and a new one.
    client = LocalClient(proxy)
    slow = threading.Thread(target=client.get, args=("/slow?seconds=1",))
    slow.start()
    wait_until(
        lambda: any(r["path"].startswith("/slow") for r in cluster.api.requests),
        20,
        "the slow request to arrive",
    )
    assert client.get("/version")[0] == 200
    slow.join()
    assert (card.sign_count - signed, cluster.api.handshakes) == (2, 2)
    # kubectl get pods may open several connections at once (discovery); run
    # again, it finds them all kept: no signature.
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert kubectl(proxy, *cache, "get", "pods").returncode == 0
    counts = (card.sign_count, cluster.api.handshakes)
    done = kubectl(proxy, *cache, "get", "pods", "-o", "name")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert (card.sign_count, cluster.api.handshakes) == counts
    # An upgrade gets a connection of its own, which is never kept.
    cluster.api.add_pod("box", namespace="team-a")
    for expected in (1, 2):
        done = kubectl(proxy, "exec", "-i", "box", "--", "cat", input="hi\n")
        assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
        assert card.sign_count - counts[0] == expected
    assert kubectl(proxy, "get", "--raw", "/version").returncode == 0
    assert card.sign_count - counts[0] == 2
    FAULT_FIGURES.append(
        f"pool: {len(cluster.api.requests)} requests of 9 kubectl runs and a "
        f"client, {card.sign_count - signed} signatures"
    )


@pytest.mark.parametrize("mode", ["fresh", "pool"])
def test_card_pulled_ends_watch_logs_and_exec(
    cards, proxies, cluster, tmp_path, capsys, mode
):
    extra = ("--reuse-while-present",) if mode == "pool" else ()
    card, inserted, proxy = card_proxy(cards, proxies, cluster, tmp_path / "yk", *extra)
    streams = open_streams(proxy, cluster)
    try:
        pulled = time.monotonic()
        inserted.remove(wait=False)  # the card is pulled; nothing waits for pcscd
        hangups = cluster.api.wait_hangups(3)
        codes = {name: process.wait(30) for name, process in streams.items()}
        ended = max(t for _, t in hangups) - pulled
        FAULT_FIGURES.append(
            f"card pulled ({mode}): watch, logs -f and exec upstream connections "
            f"closed {ended * 1000:.0f} ms after the pull"
        )
        assert sorted(path.split("?")[0].rsplit("/", 1)[-1] for path, _ in hangups) == [
            "exec",
            "log",
            "pods",
        ]
        errors = {n: p.stderr.read().decode() for n, p in streams.items()}
        # kubectl takes a watch that ends as a watch that ended; the others say so.
        assert codes == {"watch": 0, "logs": 1, "exec": 1}, (codes, errors)
        assert (errors["watch"], errors["logs"]) == ("", "error: unexpected EOF\n")
        assert errors["exec"].endswith(
            "error: error reading from error stream: next reader: websocket: close "
            "1006 (abnormal closure): unexpected EOF\n"
        ), errors["exec"]
        relayed = len(cluster.api.requests)
        status, body = LocalClient(proxy).get("/version")
        assert (status, json.loads(body)["message"]) == (
            503,
            f"YubiKey not present in reader '{YUBIKEY_READER} 00 00' - insert it",
        )
        assert len(cluster.api.requests) == relayed
        assert "the YubiKey left its reader: closed " in proxy.stderr()
    finally:
        stop_all(streams)


def test_keep_streams_on_removal_lets_them_run(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(
        cards, proxies, cluster, tmp_path / "yk", "--keep-streams-on-removal"
    )
    streams = open_streams(proxy, cluster)
    try:
        inserted.remove()
        cluster.api.append_log("box", "after", namespace="team-a")
        assert streams["logs"].stdout.readline() == b"after\n"
        streams["exec"].stdin.write(b"still here\n")
        streams["exec"].stdin.flush()
        assert streams["exec"].stdout.readline() == b"still here\n"
        cluster.api.add_pod("later", namespace="team-a")
        assert streams["watch"].stdout.readline() == b"pod/later\n"
        assert LocalClient(proxy).get("/version")[0] == 503
    finally:
        stop_all(streams)


@pytest.mark.parametrize("stream", ["watch", "logs", "exec"])
def test_client_killed_mid_stream_closes_the_upstream(
    cards, proxies, cluster, tmp_path, capsys, stream
):
    card, inserted, proxy = card_proxy(cards, proxies, cluster, tmp_path / "yk")
    streams = open_streams(proxy, cluster)
    try:
        killed = time.monotonic()
        streams[stream].kill()
        path, seen = cluster.api.wait_hangups(1)[0]
        FAULT_FIGURES.append(
            f"kubectl {stream} killed: upstream closed {(seen - killed) * 1000:.0f} ms later"
        )
        expected = {"watch": "/pods?", "logs": "/log?", "exec": "/exec?"}[stream]
        assert expected in path, path
        # The other two streams go on.
        assert all(p.poll() is None for n, p in streams.items() if n != stream)
    finally:
        stop_all(streams)


def test_card_pulled_and_the_next_request_at_once_says_not_present(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(cards, proxies, cluster, tmp_path / "yk")
    client = LocalClient(proxy)
    messages = []
    for _ in range(3):
        assert client.get("/version")[0] == 200
        inserted.remove()  # and at once, no waiting for pcscd
        status, body = client.get("/version")
        messages.append((status, json.loads(body)["message"]))
        inserted = cards(card)
    assert (
        messages
        == [
            (
                503,
                f"YubiKey not present in reader '{YUBIKEY_READER} 00 00' - insert it",
            )
        ]
        * 3
    )


def test_card_swapped_for_another_in_the_same_reader(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(
        cards,
        proxies,
        cluster,
        tmp_path / "yk",
        "--reuse-while-present",
        serial=12000001,
    )
    client = LocalClient(proxy)
    assert [client.get("/version")[0] for _ in range(2)] == [200, 200]
    inserted.remove()
    other = VirtualPiv(serial=12000002)
    inserted = cards(other)
    relayed, handshakes = len(cluster.api.requests), cluster.api.handshakes
    status, body = client.get("/version")
    assert (status, json.loads(body)["message"]) == (
        503,
        f"the YubiKey in reader '{YUBIKEY_READER} 00 00' is serial 12000002, not "
        "serial 12000001 that holds the key: insert that one",
    )
    assert (len(cluster.api.requests), cluster.api.handshakes) == (
        relayed,
        handshakes,
    )
    assert (card.sign_count - 1, other.sign_count) == (1, 0)


def test_stale_pooled_connection_is_replaced_not_a_502(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(
        cards, proxies, cluster, tmp_path / "yk", "--reuse-while-present"
    )
    client = LocalClient(proxy)
    assert client.get("/version")[0] == 200
    # The server timed the idle connection out (its FIN has arrived).
    cluster.api.close_connections()
    wait_until(lambda: not cluster.api._conns, 10, "the server to close")
    assert client.get("/version")[0] == 200
    assert (card.sign_count - 1, cluster.api.handshakes) == (2, 2)
    # The server closes it as the request arrives: sent once more, fresh.
    cluster.api.drop_next = 1
    assert client.get("/version")[0] == 200
    assert (card.sign_count - 1, cluster.api.handshakes) == (3, 3)
    assert [r["path"] for r in cluster.api.requests[-2:]] == ["/version"] * 2
    # A body is not sent twice: a 502 that says so.
    cluster.api.drop_next = 1
    conn = client.connection()
    conn.request("POST", "/api/v1/namespaces/team-a/pods", body=b"{}")
    response = conn.getresponse()
    assert response.status == 502
    assert json.loads(response.read())["message"].startswith(
        f"the API server at 127.0.0.1:{cluster.api.port} failed during the request"
    )
    conn.close()
    assert (card.sign_count - 1, cluster.api.handshakes) == (3, 3)
    assert "GET /version: retried, the kept connection was stale" in proxy.stderr()
    # A chunked body is read whole before it goes upstream: it can be sent again.
    path = "/api/v1/namespaces/team-a/pods"

    def post_chunked() -> tuple[int, bytes]:
        conn = client.connection()
        conn.request("POST", path, body=iter([b"{", b"}"]), encode_chunked=True)
        response = conn.getresponse()
        answer = (response.status, response.read())
        conn.close()
        return answer

    expected = post_chunked()  # on a fresh connection (the last one was cut)
    posted = [r["path"] for r in cluster.api.requests].count(path)
    cluster.api.drop_next = 1
    assert post_chunked() == expected
    # The dropped request reached the server (as above), then its copy did.
    assert [r["path"] for r in cluster.api.requests].count(path) == posted + 2
    assert (card.sign_count - 1, cluster.api.handshakes) == (5, 5)
    assert f"POST {path}: retried, the kept connection was stale" in proxy.stderr()


def test_idle_pooled_connections_close_after_reuse_idle(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(
        cards,
        proxies,
        cluster,
        tmp_path / "yk",
        "--reuse-while-present",
        "--reuse-idle",
        "0.5",
    )
    assert LocalClient(proxy).get("/version")[0] == 200
    wait_until(lambda: not cluster.api._conns, 20, "the idle connection to close")
    assert LocalClient(proxy).get("/version")[0] == 200
    assert (card.sign_count - 1, cluster.api.handshakes) == (2, 2)


def replace_certificate(cluster: Cluster, card: VirtualPiv, days: int) -> bytes:
    """A new certificate for the slot's key, written as renew does; its DER."""
    cert = make_cert(
        card.slot_key(0x9A),
        cluster.ident.ca_key,
        "CN=system:admin,O=system:masters",
        cluster.ident.ca_cert.subject.rfc4514_string(),
        days=days,
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    with contextlib.closing(yk.open_card()) as yubikey, yubikey.session() as piv:
        piv.authenticate(DEFAULT_MGMT_KEY)
        piv.put_certificate(yk.parse_slot("9a"), der)
    return der


def test_certificate_read_once_then_on_sighup_or_after_the_refresh_interval(
    cards, proxies, cluster, tmp_path, capsys
):
    card, inserted, proxy = card_proxy(cards, proxies, cluster, tmp_path / "yk")
    client = LocalClient(proxy)
    reads = certificate_reads(card)
    assert [client.get("/version")[0] for _ in range(5)] == [200] * 5
    assert certificate_reads(card) == reads  # read at start, not per request
    second = replace_certificate(cluster, card, 100)
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloading" in proxy.stderr(), 20, "the reload")
    assert client.get("/version")[0] == 200
    assert cluster.api.requests[-1]["client_certificate"] == second
    assert certificate_reads(card) == reads + 1
    proxy.stop()
    # Renewed under a running proxy: used within --certificate-refresh.
    proxy = proxies(tmp_path / "yk", "--certificate-refresh", "1")
    client = LocalClient(proxy)
    assert client.get("/version")[0] == 200
    third = replace_certificate(cluster, card, 200)
    wait_until(
        lambda: (
            client.get("/version")[0] == 200
            and cluster.api.requests[-1]["client_certificate"] == third
        ),
        20,
        "the renewed certificate in use",
    )
    assert "now using the certificate in slot 9a" in proxy.stderr()


def test_touch_always_in_pool_mode_one_touch_per_new_connection(
    cards, proxies, cluster, tmp_path, capsys
):
    touches = []
    card = VirtualPiv(serial=12000003, touch=lambda slot: touches.append(slot) or True)
    inserted = cards(card)
    proxy = proxies.setup(
        cluster,
        tmp_path / "yk",
        "--touch-policy",
        "always",
        proxy_extra=("--reuse-while-present",),
    )
    before = len(touches)  # setup's proof
    for _ in range(3):
        assert kubectl(proxy, "get", "--raw", "/version").returncode == 0
    assert (len(touches) - before, cluster.api.handshakes) == (1, 1)
    inserted.remove()  # a pull ends the pool: the next one is touched again
    inserted = cards(card)
    assert kubectl(proxy, "get", "--raw", "/version").returncode == 0
    assert (len(touches) - before, cluster.api.handshakes) == (2, 2)
    assert card.sign_count - 1 == 2


# =============================================================================
# 6. enroll and renew: keys born on the card, certificates from the cluster's CSR API,
# RBAC
# =============================================================================


@pytest.fixture
def csr_cluster(tmp_path):
    """A test API server with the CSR API, signing with the client CA."""
    cluster = start_cluster(tmp_path)
    csr_install(cluster.api, cluster.ident.ca_cert, cluster.ident.ca_key)
    yield cluster
    cluster.api.stop()


def enroll_args(cluster: Cluster, out: Path, *extra: str) -> list[str]:
    return [
        "enroll",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--output-dir",
        str(out),
        "--user",
        "alice",
        "--group",
        "dev",
        *extra,
    ]


def slot_certificate(piv: VirtualPiv, slot: int = 0x9A) -> x509.Certificate:
    return x509.load_der_x509_certificate(
        yk.parse_tlvs(piv.certificate_object(slot))[0x70]
    )


def test_enroll_with_approval_then_kubectl_as_the_new_user(
    card57, proxies, csr_cluster, tmp_path, capsys
):
    code, stdout, stderr = run_cli(
        *enroll_args(csr_cluster, tmp_path / "yk", "--approve", "--expiration", "2h"),
        capsys=capsys,
    )
    assert (code, stderr) == (0, "")
    cert = slot_certificate(card57)
    assert cert.subject.rfc4514_string() == "CN=alice,O=dev"
    assert cert.issuer == csr_cluster.ident.ca_cert.subject
    assert card57.slot_info(0x9A).origin == 0x01  # generated on the card
    assert yk.same_public_key(cert.public_key(), card57.slot_key(0x9A).public_key())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.total_seconds() - 7200) < 120
    assert stdout.startswith(
        "Enrolled CN=alice,O=dev: an EC P-256 key generated on YubiKey serial 31000001"
    )
    (request,) = csr_cluster.api.csrs.values()
    assert request["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client"
    assert request["spec"]["usages"] == ["client auth"]
    assert request["spec"]["expirationSeconds"] == 7200
    pkcs10 = x509.load_pem_x509_csr(base64.b64decode(request["spec"]["request"]))
    assert pkcs10.is_signature_valid  # signed by the card: proof of possession
    assert yk.same_public_key(pkcs10.public_key(), cert.public_key())
    code, stdout, _ = run_cli("status", "--json", capsys=capsys)
    assert (
        json.loads(stdout)["cards"][0]["slots"][0]["key"]["origin"]
        == "generated on card"
    )
    proxy = proxies(tmp_path / "yk")
    done = kubectl(proxy, "get", "--raw", "/version")
    assert done.returncode == 0, done.stderr
    assert csr_cluster.api.requests[-1]["client_subject"] == "CN=alice,O=dev"


def test_enroll_waits_for_an_outside_approval(card57, csr_cluster, tmp_path, capsys):
    codes = []
    worker = threading.Thread(
        target=lambda: codes.append(
            yk.main(enroll_args(csr_cluster, tmp_path / "yk", "--timeout", "60"))
        )
    )
    worker.start()
    try:
        pending = csr_wait(csr_cluster.api, timeout=30)
        name = pending["metadata"]["name"]
        assert name.startswith("yubikey-alice-31000001-")
        done = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(csr_cluster.kubeconfig),
                "certificate",
                "approve",
                name,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    finally:
        worker.join(90)
    assert codes == [0]
    assert f"kubectl certificate approve {name}" in capsys.readouterr().err
    assert slot_certificate(card57).subject.rfc4514_string() == "CN=alice,O=dev"


def test_enroll_denied_timed_out_and_mismatched(card57, csr_cluster, tmp_path, capsys):
    worker_codes = []
    worker = threading.Thread(
        target=lambda: worker_codes.append(
            yk.main(enroll_args(csr_cluster, tmp_path / "a", "--timeout", "60"))
        )
    )
    worker.start()
    name = csr_wait(csr_cluster.api, timeout=30)["metadata"]["name"]
    csr_deny(csr_cluster.api, name, "not on my watch")
    worker.join(60)
    assert worker_codes == [1]
    assert capsys.readouterr().err.endswith(
        f"yubikey-kube-proxy: error: the cluster denied certificate request {name}: "
        "not on my watch\n"
    )
    # Nobody approves: a clear failure after the timeout.
    code, _, stderr = run_cli(
        *enroll_args(csr_cluster, tmp_path / "b", "--force", "--timeout", "1"),
        capsys=capsys,
    )
    assert code == 1
    assert re.search(
        r"error: no certificate for request yubikey-alice-31000001-[0-9a-f-]+ after "
        r"1 s: approve it \(kubectl certificate approve yubikey-alice-31000001-"
        r"[0-9a-f-]+\) and run the command again\n$",
        stderr,
    ), stderr
    # A certificate for another key is refused, and never stored.
    other = make_identity()
    csr_cluster.api.csr_issue_override = lambda obj, request: pem(other.cert)
    code, _, stderr = run_cli(
        *enroll_args(csr_cluster, tmp_path / "c", "--force", "--approve"), capsys=capsys
    )
    assert (code, stderr) == (
        1,
        (
            "yubikey-kube-proxy: error: the certificate the cluster issued does not carry the "
            "key on the card: refusing it; check the cluster's signer and try again\n"
        ),
    )
    assert card57.certificate_object(0x9A) is None


def test_enroll_refuses_system_masters(card57, csr_cluster, tmp_path, capsys):
    code, _, stderr = run_cli(
        *enroll_args(csr_cluster, tmp_path, "--group", "system:masters"), capsys=capsys
    )
    assert (code, stderr) == (
        1,
        (
            "yubikey-kube-proxy: error: Kubernetes refuses client certificates for group "
            "system:masters from the CSR API: enroll without it and grant rights with "
            "--bind-clusterrole cluster-admin\n"
        ),
    )
    assert card57.slot_key(0x9A) is None and csr_cluster.api.csrs == {}


def test_renew_through_the_running_proxy_and_as_a_no_op(
    card57, proxies, csr_cluster, tmp_path, capsys
):
    workdir = tmp_path / "yk"
    assert (
        yk.main(
            enroll_args(
                csr_cluster, workdir, "--approve", "--expiration", "1h", "--allow-renew"
            )
        )
        == 0
    )
    # On a real cluster alice may approve only when an admin made her an approver.
    grant_as_admin(csr_cluster, "alice", "csr-approver", APPROVER_RULES)
    first = slot_certificate(card57)
    capsys.readouterr()
    proxy = proxies(workdir, "--certificate-refresh", "1")
    code, stdout, _ = run_cli(
        "renew",
        "--kubeconfig",
        str(proxy.client_config),
        "--proxy-config",
        str(workdir / "proxy.yml"),
        "--if-expiring-within",
        "30m",
        capsys=capsys,
    )
    assert code == 0
    assert re.fullmatch(
        r"The certificate in slot 9a is valid until \S+ \S+ UTC "
        r"\((59|60) minutes left\): nothing to do.\n",
        stdout,
    ), stdout
    assert len(csr_cluster.api.csrs) == 1  # nothing requested
    code, stdout, stderr = run_cli(
        "renew",
        "--kubeconfig",
        str(proxy.client_config),
        "--proxy-config",
        str(workdir / "proxy.yml"),
        "--if-expiring-within",
        "2h",
        "--approve",
        "--expiration",
        "3h",
        capsys=capsys,
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith(
        "Renewed the certificate in slot 9a (CN=alice,O=dev): valid until "
    )
    second = slot_certificate(card57)
    assert second.serial_number != first.serial_number
    assert yk.same_public_key(second.public_key(), first.public_key())
    assert second.not_valid_after_utc > first.not_valid_after_utc
    # The renewal itself went through the proxy, with the old certificate.
    creates = [r for r in csr_cluster.api.requests if r["method"] == "POST"]
    assert creates[-1]["client_certificate"] == first.public_bytes(
        serialization.Encoding.DER
    )
    # No restart: within --certificate-refresh, requests present the new one.
    wait_until(
        lambda: (
            kubectl(proxy, "get", "--raw", "/version").returncode == 0
            and csr_cluster.api.requests[-1]["client_certificate"]
            == second.public_bytes(serialization.Encoding.DER)
        ),
        30,
        "the renewed certificate in use",
    )
    assert "now using the certificate in slot 9a: CN=alice,O=dev" in proxy.stderr()


def test_parse_duration():
    assert [yk.parse_duration(t) for t in ("90m", "720h", "30d", "1h30m", "45s")] == [
        5400,
        2592000,
        2592000,
        5400,
        45,
    ]
    for bad in ("", "10", "1x", "h1", "1h 30m"):
        with pytest.raises(argparse.ArgumentTypeError):
            yk.parse_duration(bad)


def test_yubico_piv_tool_attests_the_enrolled_key_as_generated(
    card54, csr_cluster, tmp_path, capsys
):
    assert yk.main(enroll_args(csr_cluster, tmp_path / "yk", "--approve")) == 0
    done = piv_tool("-a", "attest", "-s", "9a")
    assert done.returncode == 0, done.stderr
    attestation = x509.load_pem_x509_certificate(done.stdout.encode())
    assert yk.same_public_key(
        attestation.public_key(), slot_certificate(card54).public_key()
    )
    # An imported key cannot be attested: the independent tool says so too.
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    assert yk.main(setup_args(source, tmp_path / "imported", "--slot", "9c")) == 0
    done = piv_tool("-a", "attest", "-s", "9c")
    assert done.returncode != 0


@pytest.mark.parametrize(
    "algorithm, name",
    [("p384", "EC P-384"), ("rsa2048", "RSA-2048"), ("ed25519", "Ed25519")],
)
def test_enroll_other_algorithms(
    card57, csr_cluster, tmp_path, capsys, algorithm, name
):
    code, stdout, stderr = run_cli(
        *enroll_args(
            csr_cluster, tmp_path / "yk", "--approve", "--algorithm", algorithm
        ),
        capsys=capsys,
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith(f"Enrolled CN=alice,O=dev: an {name} key generated on ")
    (request,) = csr_cluster.api.csrs.values()
    pkcs10 = x509.load_pem_x509_csr(base64.b64decode(request["spec"]["request"]))
    assert pkcs10.is_signature_valid
    assert yk.same_public_key(
        slot_certificate(card57).public_key(), card57.slot_key(0x9A).public_key()
    )


def test_enroll_reports_a_shortened_lifetime(card57, csr_cluster, tmp_path, capsys):
    code, _, stderr = run_cli(
        *enroll_args(csr_cluster, tmp_path / "yk", "--approve", "--expiration", "400d"),
        capsys=capsys,
    )
    assert code == 0
    until = slot_certificate(card57).not_valid_after_utc
    assert stderr == (
        "The cluster granted 365.0 days instead of the 400.0 requested (valid until "
        f"{until:%Y-%m-%d %H:%M} UTC).\n"
    )


@pytest.mark.parametrize("versions", [("1.2",), ("1.3",)])
@pytest.mark.parametrize("cipher", ["aes128gcm", "aes256gcm", "chacha20-poly1305"])
def test_fast_aead_carries_exact_bytes_in_every_suite(
    card57, clusters, tmp_path, capsys, versions, cipher
):
    """tlslite's record layer with FastAead under it: the bytes must be exactly
    what the server sent, in every suite and version."""
    cluster = clusters(tmp_path, tls_versions=versions)
    assert (
        yk.main(
            [
                "setup",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--output-dir",
                str(tmp_path / "yk"),
            ]
        )
        == 0
    )
    args = yk.ProxyOptions.from_args(
        yk.build_parser().parse_args(
            ["proxy", "--kubeconfig", str(tmp_path / "yk" / "proxy.yml")]
        )
    )
    card = yk.open_card()
    try:
        upstream = yk.build_upstream(yk.proxy_settings(args), card, args)
        upstream.settings.cipherNames = [cipher]
        for path, size in (
            ("/bytes?n=3000000", 3_000_000),
            ("/chunked?n=1000000", 1_000_000),
        ):
            link = http.client.HTTPConnection("127.0.0.1")
            link.sock = upstream.connect()
            try:
                link.request("GET", path)
                response = link.getresponse()
                body = response.read()
                assert link.sock.conn.getCipherName() == cipher
                assert body == expected_bytes(size)
            finally:
                link.sock.release()
    finally:
        card.close()


def test_enroll_binds_a_cluster_role(card57, csr_cluster, tmp_path, capsys):
    code, _, stderr = run_cli(
        *enroll_args(
            csr_cluster, tmp_path / "yk", "--approve", "--bind-clusterrole", "view"
        ),
        capsys=capsys,
    )
    assert (code, stderr) == (0, "")
    binding, renewal = csr_cluster.api.cluster_role_bindings
    assert binding["metadata"]["name"] == "yubikey-alice"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "view",
    }
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}
    ]
    # With a binding, renewal is allowed by default (see the RBAC section).
    assert renewal["metadata"]["name"] == "yubikey-renew-alice"
    assert list(csr_cluster.api.cluster_roles) == ["yubikey-renew-alice"]


def test_enroll_with_a_name_merged_then_renewed_through_the_merged_context(
    card57, proxies, csr_cluster, tmp_path, capsys, monkeypatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    config = home / ".kube" / "config"
    port = free_port_pair()
    code, stdout, stderr = run_cli(
        "enroll", "--kubeconfig", str(csr_cluster.kubeconfig), "--user", "alice",
        "--group", "dev", "--approve", "--name", "dev-alice", "--port", str(port),
        "--merge", "--use-context", "--allow-renew", capsys=capsys,
    )  # fmt: skip
    assert (code, stderr) == (0, "")
    # On a real cluster alice may approve only when an admin made her an approver.
    grant_as_admin(csr_cluster, "alice", "csr-approver", APPROVER_RULES)
    folder = home / ".kube" / "yubikey" / "dev-alice"
    assert stdout.endswith(
        f"Wrote {folder / 'proxy.yml'} and {folder / 'client.yml'}; next: "
        f"yubikey-kube-proxy proxy --kubeconfig {folder / 'proxy.yml'}\n"
        f"Merged context, cluster and user 'dev-alice' into {config} (current-context "
        f"is now 'dev-alice'; a file that was there is kept as {config}.bak); "
        "'yubikey-kube-proxy unmerge dev-alice' removes them.\n"
    )
    merged = read_yaml(config)
    assert (entry_names(merged), merged["current-context"]) == (
        [["dev-alice"]] * 3,
        "dev-alice",
    )
    assert not (home / ".kube" / "config.bak").exists()  # there was no file before
    first = slot_certificate(card57)
    proxy = proxies(folder, "--listen", f"127.0.0.1:{port}")
    assert whoami(str(config)) == "alice"
    # renew finds the proxy.yml that the merged context names.
    code, stdout, stderr = run_cli(
        "renew", "--approve", "--expiration", "3h", capsys=capsys
    )
    assert (code, stderr) == (0, ""), stdout
    assert len(csr_cluster.api.csrs) == 2
    assert slot_certificate(card57).serial_number != first.serial_number
    assert whoami(str(config)) == "alice"  # the running proxy uses the new one
    proxy.stop()
    code, _, stderr = run_cli("unmerge", "dev-alice", capsys=capsys)
    assert (code, stderr) == (0, "")
    assert read_yaml(config) == {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [],
        "contexts": [],
        "users": [],
    }


# -- enroll and renew against a real cluster's RBAC; a failed enroll puts the slot -----
#    back (MOVE/DELETE KEY on firmware 5.7); a card whose signatures do not verify


RENEWAL_RULES = [
    {
        "apiGroups": ["certificates.k8s.io"],
        "resources": ["certificatesigningrequests"],
        "verbs": ["create", "get", "watch"],
    }
]
APPROVER_RULES = [
    {
        "apiGroups": ["certificates.k8s.io"],
        "resources": ["certificatesigningrequests/approval"],
        "verbs": ["update"],
    },
    {
        "apiGroups": ["certificates.k8s.io"],
        "resources": ["signers"],
        "resourceNames": ["kubernetes.io/kube-apiserver-client"],
        "verbs": ["approve"],
    },
]
APPROVE_REFUSED = (
    "yubikey-kube-proxy: error: this kubeconfig's user may not approve certificate "
    "requests (it lacks update on certificatesigningrequests/approval and approve "
    "on signers/kubernetes.io/kube-apiserver-client in API group "
    "certificates.k8s.io): leave out --approve and let an administrator run "
    "kubectl certificate approve, since whoever may approve can mint a certificate "
    "for any user\n"
)
CREATE_REFUSED = (
    "yubikey-kube-proxy: error: the cluster refused: user alice may not create "
    "certificatesigningrequests (API group certificates.k8s.io); an administrator "
    "grants it with: kubectl create clusterrole yubikey-renew-alice "
    "--verb=create,get,watch --resource=certificatesigningrequests.certificates.k8s.io"
    " && kubectl create clusterrolebinding yubikey-renew-alice "
    "--clusterrole=yubikey-renew-alice --user=alice\n"
)


def admin_kubectl(
    cluster: Cluster,
    *args: str,
    input: str | None = None,  # noqa: A002 - subprocess.run's name
) -> subprocess.CompletedProcess:
    """The test plays the cluster's admin (system:masters) with the real kubectl."""
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def grant_as_admin(cluster: Cluster, user: str, role: str, rules: list) -> None:
    """A ClusterRole with RULES and a binding of it for USER, made by the admin."""
    subject = {"apiGroup": RBAC_GROUP, "kind": "User", "name": user}
    manifest = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": f"{RBAC_GROUP}/v1",
                "kind": "ClusterRole",
                "metadata": {"name": role},
                "rules": rules,
            },
            {
                "apiVersion": f"{RBAC_GROUP}/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{role}-{user}"},
                "roleRef": {
                    "apiGroup": RBAC_GROUP,
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [subject],
            },
        ],
    }
    done = admin_kubectl(
        cluster, "create", "--validate=false", "-f", "-", input=json.dumps(manifest)
    )
    assert done.returncode == 0, done.stderr


def renew_through(proxy: ProxyProcess, *extra: str) -> list[str]:
    return [
        "renew",
        "--kubeconfig",
        str(proxy.client_config),
        "--proxy-config",
        str(proxy.workdir / "proxy.yml"),
        *extra,
    ]


def alice_requests(api) -> list:
    return [
        (r.method, r.path) for r in api.requests if r.client_subject == "CN=alice,O=dev"
    ]


def approval_attempts(api) -> list:
    return [r for r in api.requests if r.path.split("?")[0].endswith("/approval")]


def enrolled_alice(csr_cluster, tmp_path: Path, *extra: str) -> Path:
    """The admin enrols alice (group dev, ClusterRole view): not an admin."""
    workdir = tmp_path / "yk"
    args = enroll_args(
        csr_cluster, workdir, "--approve", "--bind-clusterrole", "view", *extra
    )
    assert yk.main(args) == 0
    return workdir


def test_enroll_a_non_admin_then_renew_through_its_own_proxy_approved_outside(
    card57, proxies, csr_cluster, tmp_path, capsys
):
    api = csr_cluster.api
    workdir = enrolled_alice(csr_cluster, tmp_path)
    assert api.cluster_roles["yubikey-renew-alice"]["rules"] == RENEWAL_RULES
    assert [
        (b["metadata"]["name"], b["roleRef"]["name"]) for b in api.cluster_role_bindings
    ] == [
        ("yubikey-alice", "view"),
        ("yubikey-renew-alice", "yubikey-renew-alice"),
    ]
    first = slot_certificate(card57)
    capsys.readouterr()
    proxy = proxies(workdir)
    codes: list = []
    worker = threading.Thread(
        target=lambda: codes.append(yk.main(renew_through(proxy, "--timeout", "60")))
    )
    try:
        worker.start()
        pending = csr_wait(api, lambda o: o["spec"]["username"] == "alice", 60)
        name = pending["metadata"]["name"]
        assert pending["spec"]["groups"] == ["dev", "system:authenticated"]
        done = admin_kubectl(csr_cluster, "certificate", "approve", name)
        assert done.returncode == 0, done.stderr
        worker.join(90)
        out, err = capsys.readouterr()
        assert codes == [0], (err, proxy.stderr(), alice_requests(api))
        assert err.startswith(
            "Waiting up to 60 s for an administrator to run: kubectl certificate "
            f"approve {name}\n"
        )
        assert out.startswith(
            "Renewed the certificate in slot 9a (CN=alice,O=dev): valid until "
        )
        second = slot_certificate(card57)
        assert second.serial_number != first.serial_number
        assert yk.same_public_key(second.public_key(), first.public_key())
        done = kubectl(proxy, "get", "--raw", "/version")
        assert done.returncode == 0, done.stderr
    finally:
        worker.join(90)
    # alice did only what the renewal role allows, and never tried to approve.
    alices = [entry for entry in api.authorization_log if entry[0] == "alice"]
    assert "create" in {verb for _, verb, *_ in alices}
    assert {verb for _, verb, *_ in alices} <= {"create", "get", "watch"}
    assert {r.client_subject for r in approval_attempts(api)} == {
        "CN=system:admin,O=system:masters"
    }


def test_renew_with_an_admin_kubeconfig(card57, csr_cluster, tmp_path, capsys):
    workdir = enrolled_alice(csr_cluster, tmp_path, "--no-allow-renew")
    assert csr_cluster.api.cluster_roles == {}
    first = slot_certificate(card57)
    capsys.readouterr()
    admin = str(csr_cluster.kubeconfig)
    code, out, err = run_cli(
        "renew",
        "--kubeconfig",
        admin,
        "--proxy-config",
        str(workdir / "proxy.yml"),
        "--approve",
        capsys=capsys,
    )
    assert (code, err) == (0, "")
    assert out.startswith("Renewed the certificate in slot 9a (CN=alice,O=dev): ")
    second = slot_certificate(card57)
    assert second.serial_number != first.serial_number
    assert second.subject == first.subject
    assert yk.same_public_key(second.public_key(), card57.slot_key(0x9A).public_key())
    # Requested and approved by the admin; the card signed the request itself.
    request = csr_get(csr_cluster.api, max(csr_cluster.api.csrs))
    assert request["spec"]["username"] == "system:admin"
    pkcs10 = x509.load_pem_x509_csr(base64.b64decode(request["spec"]["request"]))
    assert pkcs10.is_signature_valid and pkcs10.subject == first.subject
    # Without a proxy.yml: the slot and the card by name.
    code, out, err = run_cli(
        "renew",
        "--kubeconfig",
        admin,
        "--slot",
        "9a",
        "--serial",
        "31000001",
        "--approve",
        capsys=capsys,
    )
    assert (code, err) == (0, "")
    assert slot_certificate(card57).serial_number != second.serial_number


def test_renew_refused_when_the_renewal_binding_is_missing(
    card57, proxies, csr_cluster, tmp_path, capsys, monkeypatch
):
    api = csr_cluster.api
    workdir = enrolled_alice(csr_cluster, tmp_path, "--no-allow-renew")
    capsys.readouterr()
    proxy = proxies(workdir)
    code, out, err = run_cli(*renew_through(proxy), capsys=capsys)
    assert (code, out, err) == (1, "", CREATE_REFUSED)
    assert len(api.csrs) == 1  # only the enrolment's
    # The command in the message is what an admin runs; then renewal works.
    grant = CREATE_REFUSED.split("grants it with: ")[1].strip()
    for command in grant.split(" && "):
        done = admin_kubectl(csr_cluster, *command.split()[1:])
        assert done.returncode == 0, done.stderr
    assert api.cluster_roles["yubikey-renew-alice"]["rules"] == RENEWAL_RULES
    # Renewal now waits, saying so, until the approval and the certificate.
    monkeypatch.setattr(yk, "CSR_PROGRESS_SECONDS", 0.2)
    codes: list = []
    worker = threading.Thread(
        target=lambda: codes.append(yk.main(renew_through(proxy, "--timeout", "60")))
    )
    worker.start()
    pending = csr_wait(api, lambda o: o["spec"]["username"] == "alice", 60)
    name = pending["metadata"]["name"]
    wait_until(
        lambda: any(
            "watch=true" in r.path and r.client_subject == "CN=alice,O=dev"
            for r in list(api.requests)
        ),
        30,
        "renew to watch its request",
    )
    seen: list = []
    wait_until(
        lambda: (
            seen.append(capsys.readouterr().err) or "still waiting" in "".join(seen)
        ),
        30,
        "a progress line",
    )
    csr_approve(api, name)
    worker.join(90)
    assert codes == [0]
    err = "".join(seen) + capsys.readouterr().err
    assert re.fullmatch(
        f"Waiting up to 60 s for an administrator to run: kubectl certificate "
        f"approve {name}\n(still waiting for {name} \\(\\d+ s left\\)\\.\\.\\.\\n)+"
        f"{name} is approved; waiting for the cluster to issue its "
        "certificate\\.\\.\\.\\n(still waiting for .*\\n)*",
        err,
    ), err


def test_approve_without_the_rights_is_never_attempted(
    card57, proxies, csr_cluster, tmp_path, capsys
):
    api = csr_cluster.api
    workdir = enrolled_alice(csr_cluster, tmp_path)
    capsys.readouterr()
    proxy = proxies(workdir)
    code, out, err = run_cli(*renew_through(proxy, "--approve"), capsys=capsys)
    proxy.stop()
    assert (code, out, err) == (1, "", APPROVE_REFUSED)
    # The access reviews said no first; nothing was requested or approved.
    reviews = [
        (u, a.get("resource"), a.get("name"), ok) for u, a, ok in api.access_reviews
    ]
    signer = "kubernetes.io/kube-apiserver-client"
    assert reviews[3:] == [
        ("alice", "certificatesigningrequests", None, False),
        ("alice", "signers", signer, False),
        ("alice", "signers", "kubernetes.io/*", False),
    ]
    assert {(u, ok) for u, *_, ok in reviews[:3]} == {("system:admin", True)}
    assert len(api.csrs) == 1
    assert [r.client_subject for r in approval_attempts(api)] == [
        "CN=system:admin,O=system:masters"  # the enrolment's, by the admin
    ]


def test_enroll_refused_rbac_names_the_permission_and_restores_the_slot(
    card57, proxies, csr_cluster, tmp_path, capsys
):
    """alice (allowed to renew, not to bind roles) enrols bob in slot 9c through her
    proxy: the binding is refused after the certificate was issued; the slot is
    left as it was."""
    workdir = enrolled_alice(csr_cluster, tmp_path)
    capsys.readouterr()
    proxy = proxies(workdir)
    codes: list = []
    args = [
        "enroll",
        "--kubeconfig",
        str(proxy.client_config),
        "--output-dir",
        str(tmp_path / "bob"),
        "--user",
        "bob",
        "--slot",
        "9c",
        "--bind-clusterrole",
        "view",
        "--timeout",
        "60",
    ]
    worker = threading.Thread(target=lambda: codes.append(yk.main(args)))
    try:
        worker.start()
        pending = csr_wait(
            csr_cluster.api, lambda o: o["spec"]["username"] == "alice", 60
        )
        csr_approve(csr_cluster.api, pending["metadata"]["name"])
        worker.join(90)
    finally:
        worker.join(90)
    assert codes == [1]
    err = capsys.readouterr().err
    assert err.endswith(
        "yubikey-kube-proxy: error: the cluster refused: user alice may not create "
        "clusterrolebindings (API group rbac.authorization.k8s.io); an administrator "
        "grants it with: kubectl create clusterrole yubikey-create-clusterrolebindings-"
        "alice --verb=create --resource=clusterrolebindings.rbac.authorization.k8s.io "
        "&& kubectl create clusterrolebinding yubikey-create-clusterrolebindings-alice "
        "--clusterrole=yubikey-create-clusterrolebindings-alice --user=alice\n"
    )
    assert card57.slot_info(0x9C) is None and card57.certificate_object(0x9C) is None
    assert not (tmp_path / "bob" / "proxy.yml").exists()
    # The commands in the message are ones the admin can run as they stand.
    for command in err.split("grants it with: ")[1].strip().split(" && "):
        done = admin_kubectl(csr_cluster, *command.split()[1:])
        assert done.returncode == 0, done.stderr
    assert csr_cluster.api.cluster_roles["yubikey-create-clusterrolebindings-alice"][
        "rules"
    ] == [
        {
            "verbs": ["create"],
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterrolebindings"],
        }
    ]


def occupied_slot(piv, tmp_path: Path) -> tuple:
    """Slot 9a holding an imported key and its certificate (by setup)."""
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    assert yk.main(setup_args(source, tmp_path / "imported", "--force")) == 0
    return piv.slot_info(0x9A), piv.certificate_object(0x9A)


def retired_keys(piv) -> list:
    return [slot for slot in RETIRED_SLOTS if piv.slot_info(slot) is not None]


def test_failed_enroll_on_firmware_57_leaves_the_slot_as_it_was(
    card57, csr_cluster, tmp_path, capsys
):
    # An empty slot: the generated key is deleted again.
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "a", "--timeout", "1"), capsys=capsys
    )
    assert code == 1 and err.endswith("and run the command again\n"), err
    assert card57.slot_info(0x9A) is None and retired_keys(card57) == []
    # An occupied slot with --force: the new key waits in a retired slot and is
    # deleted; the old key and certificate never moved.
    before = occupied_slot(card57, tmp_path)
    capsys.readouterr()
    worker_codes: list = []
    worker = threading.Thread(
        target=lambda: worker_codes.append(
            yk.main(
                enroll_args(csr_cluster, tmp_path / "b", "--force", "--timeout", "60")
            )
        )
    )
    earlier = set(csr_cluster.api.csrs)
    worker.start()
    pending = csr_wait(
        csr_cluster.api, lambda o: o["metadata"]["name"] not in earlier, 30
    )
    assert retired_keys(card57) == [0x95]  # where the new key waits
    assert card57.slot_info(0x9A) is before[0]
    csr_deny(csr_cluster.api, pending["metadata"]["name"], "no")
    worker.join(60)
    assert worker_codes == [1]
    assert capsys.readouterr().err.endswith(
        f"certificate request {pending['metadata']['name']}: no\n"
    )
    assert (card57.slot_info(0x9A), card57.certificate_object(0x9A)) == before
    assert retired_keys(card57) == []
    # Success with --force: the new key replaces the old one in 9a.
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "c", "--force", "--approve"), capsys=capsys
    )
    assert (code, err) == (0, "")
    assert card57.slot_info(0x9A).origin == ORIGIN_GENERATED
    assert yk.same_public_key(
        slot_certificate(card57).public_key(), card57.slot_key(0x9A).public_key()
    )
    assert retired_keys(card57) == []


def test_failed_enroll_on_firmware_54_says_what_is_left(
    card54, csr_cluster, tmp_path, capsys
):
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "a", "--timeout", "1"), capsys=capsys
    )
    assert code == 1
    assert err.endswith(
        "and run the command again; slot 9a of the YubiKey now holds the EC P-256 key "
        "generated for this request and no certificate, as this YubiKey cannot "
        "delete keys (firmware 5.7 can): run enroll again with --force, or choose "
        "another --slot\n"
    ), err
    assert card54.slot_info(0x9A).origin == ORIGIN_GENERATED
    assert card54.certificate_object(0x9A) is None
    imported, certificate = occupied_slot(card54, tmp_path)
    capsys.readouterr()
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "b", "--force", "--timeout", "1"),
        capsys=capsys,
    )
    assert code == 1
    assert err.endswith(
        "; slot 9a of the YubiKey now holds the EC P-256 key generated for this "
        "request and the certificate for CN=system:admin,O=system:masters it held "
        "before, which does not belong to that key, as this YubiKey cannot delete "
        "keys (firmware 5.7 can): run enroll again with --force, or choose another "
        "--slot\n"
    ), err
    assert card54.slot_info(0x9A) is not imported
    assert card54.certificate_object(0x9A) == certificate


def test_a_card_whose_signatures_do_not_verify_is_blamed(
    card57, csr_cluster, tmp_path, capsys
):
    workdir = enrolled_alice(csr_cluster, tmp_path)
    enrolled = card57.certificate_object(0x9A)
    card57.bad_signatures = True
    code, _, err = run_cli(
        "renew",
        "--kubeconfig",
        str(csr_cluster.kubeconfig),
        "--proxy-config",
        str(workdir / "proxy.yml"),
        "--approve",
        capsys=capsys,
    )
    assert (code, err) == (
        1,
        "yubikey-kube-proxy: error: the YubiKey's signature on the certificate "
        "request does not verify with the public key of slot 9a: the card answered "
        "wrongly; run the command again, and use another YubiKey if it happens again\n",
    )
    assert card57.certificate_object(0x9A) == enrolled
    source = write_kubeconfig(tmp_path / "k3s.yaml", make_identity())
    code, _, err = run_cli(
        *setup_args(source, tmp_path / "s", "--slot", "9d"), capsys=capsys
    )
    assert (code, err) == (
        1,
        "yubikey-kube-proxy: error: the YubiKey's signature with the key just "
        "imported into slot 9d does not verify: the card did not store or use the "
        "key correctly; run setup again with --force, and use another YubiKey if it "
        "happens again\n",
    )
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "e", "--slot", "9c", "--approve"),
        capsys=capsys,
    )
    assert (code, err) == (
        1,
        "yubikey-kube-proxy: error: the YubiKey's signature on the certificate "
        "request does not verify with the public key of slot 9c: the card answered "
        "wrongly; run the command again, and use another YubiKey if it happens again\n",
    )
    assert card57.slot_info(0x9C) is None and len(csr_cluster.api.csrs) == 1


def test_virtual_card_move_and_delete_key():
    """Yubico's MOVE KEY / DELETE KEY (INS F6) as firmware 5.7 answers it."""

    def sw(piv, apdu: str) -> str:
        return piv.process(bytes.fromhex(apdu))[-2:].hex()

    old = VirtualPiv(version=(5, 4, 3), mgmt_algorithm=ALG_3DES)
    assert sw(old, "00F6FF9A") == "6d00"  # not before 5.7
    piv = VirtualPiv()
    piv._slots[0x9A] = KeySlot(new_key("p256"), ALG_ECCP256, 1, 1, ORIGIN_GENERATED)
    key = piv.slot_info(0x9A)
    assert sw(piv, "00F6829A") == "6982"  # management key first
    piv.mgmt_authenticated = True
    assert sw(piv, "00F6F99A") == "6a86"  # never into the attestation slot
    assert sw(piv, "00F69A9C") == "6a88"  # nothing to move
    piv._slots[0x9C] = key
    assert sw(piv, "00F69C9A") == "6985"  # the destination must be empty
    del piv._slots[0x9C]
    assert sw(piv, "00F6829A") == "9000"
    assert piv.slot_info(0x82) is key and piv.slot_info(0x9A) is None
    assert sw(piv, "00F6FF82") == "9000"
    assert piv.slot_info(0x82) is None


def test_enroll_again_keeps_its_own_roles_and_refuses_other_ones(
    card57, csr_cluster, tmp_path, capsys
):
    enrolled_alice(csr_cluster, tmp_path)
    before = slot_certificate(card57)
    # The same roles exist already: accepted as they are.
    code, _, err = run_cli(
        *enroll_args(
            csr_cluster,
            tmp_path / "again",
            "--approve",
            "--force",
            "--bind-clusterrole",
            "view",
        ),
        capsys=capsys,
    )
    assert (code, err) == (0, "")
    assert len(csr_cluster.api.cluster_role_bindings) == 2
    second = slot_certificate(card57)
    assert second.serial_number != before.serial_number
    # A binding of that name to another role: refused, and the slot is as it was.
    code, _, err = run_cli(
        *enroll_args(
            csr_cluster,
            tmp_path / "edit",
            "--approve",
            "--force",
            "--bind-clusterrole",
            "edit",
        ),
        capsys=capsys,
    )
    assert (code, err) == (
        1,
        "yubikey-kube-proxy: error: a ClusterRoleBinding named yubikey-alice already "
        "exists with other content: compare it (kubectl get clusterrolebinding "
        "yubikey-alice -o yaml), delete it if it is stale, and run enroll again\n",
    )
    assert slot_certificate(card57) == second
    assert yk.same_public_key(second.public_key(), card57.slot_key(0x9A).public_key())
    assert retired_keys(card57) == []


def test_enroll_with_a_wrong_management_key_changes_nothing(
    card57, csr_cluster, tmp_path, capsys, monkeypatch
):
    before = occupied_slot(card57, tmp_path)
    capsys.readouterr()
    monkeypatch.setenv("YKP_MANAGEMENT_KEY", "00" * 24)
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "e", "--force"), capsys=capsys
    )
    assert (code, err) == (
        1,
        "yubikey-kube-proxy: error: the YubiKey rejected the management key: pass "
        "the card's key with --management-key-file PATH or YKP_MANAGEMENT_KEY (the "
        "factory key is the default)\n",
    )
    assert (card57.slot_info(0x9A), card57.certificate_object(0x9A)) == before
    assert retired_keys(card57) == [] and csr_cluster.api.csrs == {}


def test_failed_enroll_on_firmware_57_without_a_free_retired_slot_says_what_is_left(
    card57, csr_cluster, tmp_path, capsys
):
    occupied_slot(card57, tmp_path)
    for slot in RETIRED_SLOTS:  # another program's keys, one in every retired slot
        card57._slots[slot] = KeySlot(new_key("p256"), ALG_ECCP256, 1, 1, 1)
    capsys.readouterr()
    code, _, err = run_cli(
        *enroll_args(csr_cluster, tmp_path / "e", "--force", "--timeout", "1"),
        capsys=capsys,
    )
    assert code == 1
    assert err.endswith(
        "; slot 9a of the YubiKey now holds the EC P-256 key generated for this "
        "request and the certificate for CN=system:admin,O=system:masters it held "
        "before, which does not belong to that key, as no retired slot was free to "
        "keep the old key in: run enroll again with --force, or choose another "
        "--slot\n"
    ), err
    assert card57.slot_info(0x9A).origin == ORIGIN_GENERATED
    assert len(retired_keys(card57)) == 20


# =============================================================================
# 7. Command line: arguments, dependencies, the systemd units, the shell, other
# platforms, touch prompts
# =============================================================================


def test_version_and_help_work_without_pyscard():
    blocker = (
        "import sys; sys.modules['smartcard'] = None; sys.argv[0] = 'x'; "
        "import yk_kube_proxy as m; raise SystemExit(m.main(sys.argv[1:]))"
    )
    for argv, expected in (
        (["--version"], f"yubikey-kube-proxy {yk.__version__}\n"),
        (["--help"], "usage: yubikey-kube-proxy"),
        (["setup", "--help"], "usage: yubikey-kube-proxy setup"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", blocker, *argv],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected)
    done = subprocess.run(
        [sys.executable, "-c", blocker, "status"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("yubikey-kube-proxy: error: cannot import pyscard")


def test_bad_arguments_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        yk.main(["setup", "--management-key", "zz"])
    assert exit_info.value.code == 2
    assert "the management key must be hexadecimal" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        yk.main(["setup", "--slot", "9f"])
    assert "unknown PIV slot '9f'" in capsys.readouterr().err


def test_command_line_values_are_one_line_or_a_usage_error(rig, tmp_path, capsys):
    source = str(write_kubeconfig(tmp_path / "k3s.yaml", make_identity()))
    (tmp_path / "a-file").write_text("x")
    proxy = ["proxy", "--kubeconfig", source, "--plain-http"]
    for argv, message in (
        (
            ["setup", "--kubeconfig", source, "--output-dir", f"{tmp_path}/o\x00"],
            f"cannot create the output folder '{tmp_path}/o\\x00': the path contains a "
            "NUL byte; choose another --output-dir",
        ),
        (
            ["setup", "--kubeconfig", source, "--output-dir", str(tmp_path / "a-file")],
            f"cannot create the output folder '{tmp_path / 'a-file'}': File exists; "
            "choose another --output-dir",
        ),
        (
            [*proxy, "--listen", "127.0.0.1:\u00b2"],
            "--listen '127.0.0.1:\u00b2' is not HOST:PORT, e.g. 127.0.0.1:8080",
        ),
        (
            [*proxy, "--listen", "[::1]:99999"],
            "--listen '[::1]:99999' is not HOST:PORT, e.g. 127.0.0.1:8080",
        ),
        (
            ["setup", "--kubeconfig", source, "--context", "\x00"],
            f"context '\\x00' not found in {source} (contexts: default): pass "
            "--context NAME",
        ),
    ):
        assert run_cli(*argv, capsys=capsys) == (1, "", f"{ERROR}{message}\n")
    for argv, message in (
        (
            [*proxy, "--handshake-timeout", "nan"],
            "argument --handshake-timeout: 'nan' is not a number of seconds between 0 "
            "and 86400",
        ),
        (
            [*proxy, "--handshake-timeout", "-1"],
            "argument --handshake-timeout: '-1' is not a number of seconds between 0 "
            "and 86400",
        ),
        (
            ["status", "--serial", "\u00b2"],
            "argument --serial: invalid serial_arg value",
        ),
        (["status", "--slot", "9a\x00"], "argument --slot: unknown PIV slot '9a\\x00'"),
    ):
        with pytest.raises(SystemExit) as usage:
            yk.main(argv)
        stderr = capsys.readouterr().err
        assert (usage.value.code, stderr.splitlines()[0][:6]) == (2, "usage:")
        assert f"{argv[0]}: error: {message}" in stderr.splitlines()[-1]


def test_installed_entry_points(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "yk_kube_proxy", "--version"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"yubikey-kube-proxy {yk.__version__}\n",
    )
    script = Path(sys.executable).parent / "yubikey-kube-proxy"
    if not script.exists() and not os.environ.get("CI"):
        pytest.skip("the package is not installed in this Python (pip install -e .)")
    done = subprocess.run(
        [str(script), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"yubikey-kube-proxy {yk.__version__}\n",
    )


# -- dependencies --------------------------------------------------------------------


def test_missing_and_old_dependencies_are_named_with_the_install_command(
    capsys, monkeypatch
):
    found = {"tlslite-ng": "0.8.1", "cryptography": "38.0.4", "PyYAML": "6.0.1"}
    monkeypatch.setattr(yk, "installed_version", found.get)
    monkeypatch.setattr(sys, "prefix", "/venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    code, _, stderr = run_cli("status", capsys=capsys)
    assert (code, stderr) == (
        1,
        f"{ERROR}cannot import tlslite-ng==0.8.2 (found 0.8.1), cryptography>=45 "
        f"(found 38.0.4): install with: {sys.executable} -m pip install "
        "'tlslite-ng==0.8.2' 'cryptography>=45'\n",
    )
    monkeypatch.setattr(sys, "base_prefix", "/venv")  # no venv: make one
    monkeypatch.setattr(sys, "argv", ["yk_kube_proxy.py"])
    code, _, stderr = run_cli("status", capsys=capsys)
    venv = "~/.local/share/yubikey-kube-proxy/venv"
    assert (code, stderr) == (
        1,
        f"{ERROR}cannot import tlslite-ng==0.8.2 (found 0.8.1), cryptography>=45 "
        f"(found 38.0.4): install with: python3 -m venv {venv} && {venv}/bin/pip "
        "install 'pyscard>=2.0' 'tlslite-ng==0.8.2' 'PyYAML>=5.4' 'cryptography>=45', "
        f"then run {venv}/bin/python yk_kube_proxy.py (pyscard builds with gcc, swig, "
        "libpcsclite-dev and python3-dev: see the README)\n",
    )
    blocker = (
        "import sys; sys.modules['smartcard'] = sys.modules['tlslite'] = None; "
        "sys.argv[0] = 'x'; import yk_kube_proxy as m; "
        "raise SystemExit(m.main(sys.argv[1:]))"
    )
    for argv, code, out in (
        (["--version"], 0, f"yubikey-kube-proxy {yk.__version__}\n"),
        (["proxy", "--help"], 0, "usage: yubikey-kube-proxy proxy"),
        (["setup"], 1, ""),
    ):
        done = subprocess.run(
            [sys.executable, "-c", blocker, *argv],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout[: len(out)]) == (code, out)
    assert done.stderr == (
        f"{ERROR}cannot import pyscard (not installed), tlslite-ng (not installed): "
        f"install with: {sys.executable} -m pip install 'pyscard>=2.0' "
        "'tlslite-ng==0.8.2'\n"
    )


# -- The systemd user unit and the shell -----------------------------------------------


def test_systemd_unit_verifies(tmp_path):
    unit = (HERE / "yubikey-kube-proxy.service").read_text()
    directives = [line.strip() for line in unit.splitlines()]
    for expected in (
        "ExecStart=%h/.local/bin/yubikey-kube-proxy proxy --kubeconfig "
        "%h/.kube/yubikey/default/proxy.yml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ):
        assert expected in directives
    assert "pcscd.socket" in next(d for d in directives if d.startswith("After="))
    home, runtime = tmp_path / "home", tmp_path / "run"
    (home / ".local" / "bin").mkdir(parents=True)
    runtime.mkdir(mode=0o700)
    program = home / ".local" / "bin" / "yubikey-kube-proxy"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    shutil.copy(HERE / "yubikey-kube-proxy.service", tmp_path)
    done = subprocess.run(
        [
            "systemd-analyze",
            "--user",
            "verify",
            str(tmp_path / "yubikey-kube-proxy.service"),
        ],
        env={**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_shell_runs_a_command_through_the_card_and_passes_its_exit_code(
    card57, cluster, tmp_path, capsys
):
    assert (
        yk.main(
            [
                "setup",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    script = (
        "kubectl get --raw /version --request-timeout 30s > "
        f'{tmp_path / "out.json"} && test -n "$YUBIKEY_KUBE_PROXY_SHELL" && exit 7'
    )
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "yk_kube_proxy.py"),
            "shell",
            "--kubeconfig",
            str(tmp_path / "proxy.yml"),
            "--",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 7, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["gitVersion"] == "v1.32.0"
    assert "through the YubiKey; exit the shell to stop" in done.stderr
    nested = subprocess.run(
        [
            sys.executable,
            str(HERE / "yk_kube_proxy.py"),
            "shell",
            "--kubeconfig",
            str(tmp_path / "proxy.yml"),
        ],
        env={
            **os.environ,
            "YUBIKEY_KUBE_PROXY_SHELL": "1",
            "KUBECONFIG": "/x/client.yml",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (nested.returncode, nested.stderr) == (
        1,
        (
            "yubikey-kube-proxy: error: this is already a yubikey-kube-proxy shell "
            "(KUBECONFIG=/x/client.yml): exit it first\n"
        ),
    )


def test_template_unit_verifies_and_runs_the_instance_named_proxy(tmp_path):
    unit = (HERE / "yubikey-kube-proxy@.service").read_text()
    directives = [line.strip() for line in unit.splitlines()]
    single = (HERE / "yubikey-kube-proxy.service").read_text()
    expected = (
        "ExecStart=%h/.local/bin/yubikey-kube-proxy proxy --kubeconfig "
        "%h/.kube/yubikey/%i/proxy.yml"
    )
    assert expected in directives

    # The same hardening as the single unit: only ExecStart, the comments and the
    # description differ.
    def body(text: str) -> list[str]:
        return [
            line
            for line in text.splitlines()
            if not line.startswith(("#", "ExecStart=", "Description="))
        ]

    assert body(unit) == body(single)
    home, runtime = tmp_path / "home", tmp_path / "run"
    (home / ".local" / "bin").mkdir(parents=True)
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    shutil.copy(HERE / "yubikey-kube-proxy@.service", tmp_path)
    shutil.copy(
        HERE / "yubikey-kube-proxy@.service",
        tmp_path / "yubikey-kube-proxy@dev.service",
    )

    def verify(name: str) -> tuple[int, str]:
        done = subprocess.run(
            ["systemd-analyze", "--user", "verify", str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.returncode, done.stderr

    program = home / ".local" / "bin" / "yubikey-kube-proxy"
    assert verify("yubikey-kube-proxy@dev.service") == (
        1,
        f"yubikey-kube-proxy@dev.service: Command {program} is not executable: "
        "No such file or directory\n",
    )  # verify really checks the instance
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert verify("yubikey-kube-proxy@.service") == (0, "")
    assert verify("yubikey-kube-proxy@dev.service") == (0, "")


@pytest.mark.parametrize(
    "platform, environment, shell",
    [
        ("linux", {"SHELL": "/bin/zsh", "COMSPEC": "x"}, "/bin/zsh"),
        ("linux", {}, "/bin/sh"),
        ("darwin", {"SHELL": "/bin/zsh"}, "/bin/zsh"),
        (
            "win32",
            {"SHELL": "/bin/zsh", "COMSPEC": "C:\\Windows\\cmd.exe"},
            "C:\\Windows\\cmd.exe",
        ),
        ("win32", {}, "cmd.exe"),
    ],
)
def test_shell_starts_the_platforms_shell(monkeypatch, platform, environment, shell):
    monkeypatch.setattr(yk, "host_platform", lambda: platform)
    for name in ("SHELL", "COMSPEC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert yk.default_shell() == shell


# -- other platforms, faked at the boundary (host_platform, missing os/signal names) --


@pytest.mark.parametrize(
    "platform, error, message",
    [
        (
            "linux",
            yk.CardError,
            "cannot reach the PC/SC daemon (pcscd): start it with 'sudo systemctl start "
            "pcscd.socket' (or install the pcscd package)",
        ),
        (
            "darwin",
            yk.TransientCardError,
            "the macOS smart card service is not available: plug the YubiKey in (macOS "
            "starts the service when a reader appears) and try again",
        ),
        (
            "win32",
            yk.CardError,
            "the Windows Smart Card service is not running: insert the YubiKey, or start "
            "the 'Smart Card' service (services.msc) and try again",
        ),
    ],
)
def test_pcsc_service_advice_fits_the_platform(monkeypatch, platform, error, message):
    monkeypatch.setattr(yk, "host_platform", lambda: platform)
    got = yk.pcsc_error(yk.SCARD_E_NO_SERVICE)
    assert (type(got), str(got)) == (error, message)


@pytest.mark.parametrize(
    "platform, service",
    [
        ("linux", "pcscd"),
        ("darwin", "the macOS smart card service"),
        ("win32", "the Windows Smart Card service"),
    ],
)
def test_pcsc_restart_and_raw_errors_name_the_platforms_service(
    monkeypatch, platform, service
):
    monkeypatch.setattr(yk, "host_platform", lambda: platform)
    restarted = yk.pcsc_error(yk.SCARD_E_SERVICE_STOPPED)
    assert (type(restarted), str(restarted)) == (
        yk.TransientCardError,
        f"{service} restarted (0x8010001E): try again",
    )
    raw = str(yk.pcsc_error(0x80100016, "R 00 00"))
    assert raw.startswith("PC/SC error 0x80100016 in reader 'R 00 00': ")
    assert raw.endswith(f"; reinsert the YubiKey, and if it persists restart {service}")


def test_no_service_mid_session_is_retried_once_on_macos_only(card57, monkeypatch):
    card = yk.open_card()
    real = yk.PcscTransport.transmit
    failures = {"left": 0, "raised": 0}

    def flaky(self, apdu):
        if failures["left"]:
            failures["left"] -= 1
            failures["raised"] += 1
            raise yk.pcsc_error(yk.SCARD_E_NO_SERVICE, self.reader)
        return real(self, apdu)

    monkeypatch.setattr(yk.PcscTransport, "transmit", flaky)
    try:
        for platform, fail, outcome in (
            ("darwin", 1, 31000001),  # spurious on macOS: one retry and it works
            ("darwin", 5, yk.TransientCardError),  # still failing: only one retry
            ("linux", 1, yk.CardError),  # pcscd gone: said at once
        ):
            monkeypatch.setattr(yk, "host_platform", lambda platform=platform: platform)
            failures.update(left=fail, raised=0)
            if isinstance(outcome, int):
                assert card.run(lambda piv: piv.get_serial()) == outcome
            else:
                with pytest.raises(yk.CardError) as caught:
                    card.run(lambda piv: piv.get_serial())
                assert type(caught.value) is outcome
            assert failures["raised"] == min(fail, 2 if platform == "darwin" else 1)
    finally:
        card.close()


def test_signals_without_sighup_as_on_windows(monkeypatch):
    class StubServer:
        def serve_forever(self):
            self.during = {
                s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)
            }

        def server_close(self):
            pass

        def wait_idle(self, timeout):
            return True

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.delattr(signal, "SIGHUP")
    server = StubServer()
    yk.serve_until_signal(server, None, None)
    assert all(server.during[s] is not before[s] for s in before)  # ours while serving
    assert {s: signal.getsignal(s) for s in before} == before  # given back


@pytest.mark.parametrize(
    "platform, hint, mode_warning",
    [
        (
            "linux",
            "reload the proxy with kill -HUP or 'systemctl --user reload "
            "yubikey-kube-proxy', or restart it",
            True,
        ),
        ("darwin", "reload the proxy with kill -HUP, or restart it", True),
        ("win32", "restart the proxy", False),
    ],
)
def test_pin_advice_and_file_modes_fit_the_platform(
    tmp_path, capsys, monkeypatch, platform, hint, mode_warning
):
    monkeypatch.setattr(yk, "host_platform", lambda: platform)
    yk.configure_logging(0)
    pins = tmp_path / "pin"
    pins.write_text("654321\n")
    pins.chmod(0o644)

    class StubPiv:
        wrong = False

        def attested_policies(self, slot):
            return None  # a card that cannot attest

        def verify_pin(self, pin):
            assert pin == "654321"
            if self.wrong:
                raise yk.PinError("wrong PIN: the YubiKey has 2 tries left", 2)

    piv = StubPiv()
    card = types.SimpleNamespace(info=None, run=lambda operation: operation(piv))
    settings = types.SimpleNamespace(slot=yk.SLOTS["9a"])
    args = types.SimpleNamespace(pin_file=str(pins), notify=False)
    signer = yk.card_signer(card, settings, args, make_identity("p256").cert, None)
    piv.wrong = True
    with pytest.raises(yk.PinError):
        yk.ensure_pin(piv, yk.PinPolicy.ALWAYS, signer.pins)
    with pytest.raises(yk.PinError) as caught:  # what the next requests are told
        signer.pins.get()
    assert str(caught.value) == (
        "wrong PIN: the YubiKey has 2 tries left (the proxy will not send it again: "
        f"fix the PIN or the PIN file, then {hint})"
    )
    warning = (
        f"yubikey-kube-proxy: WARNING: the PIN file {pins} is readable by others: "
        "chmod 600 it\n"
    )
    assert capsys.readouterr().err == (warning if mode_warning else "")


def test_local_tls_without_memfd_uses_a_private_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    pki = yk.make_local_pki()
    monkeypatch.delattr(os, "memfd_create")  # macOS and Windows have none
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    server_context = yk.LocalTls(pki.server_cert, pki.server_key, pki.ca_cert).context()
    assert list(temporary.iterdir()) == []  # the key did not stay on disk
    client_context = ssl.create_default_context(cadata=pki.ca_cert.decode())
    bundle = tmp_path / "client.pem"
    bundle.write_bytes(pki.client_cert + pki.client_key)
    client_context.load_cert_chain(bundle)
    left, right = socket.socketpair()
    answers = []

    def serve():
        with server_context.wrap_socket(left, server_side=True) as tls:
            answers.append(tls.getpeercert()["subject"])
            tls.sendall(b"hello")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_context.wrap_socket(right, server_hostname="localhost") as tls:
        assert tls.recv(5) == b"hello"
    thread.join(10)
    assert answers and answers[0]


def fake_programs(folder: Path, *names: str) -> Path:
    """Programs that record their arguments (NUL-separated) in folder/NAME.calls."""
    folder.mkdir(exist_ok=True)
    for name in names:
        program = folder / name
        program.write_text(
            f"#!/bin/sh\nprintf '%s\\0' \"${{0##*/}}\" \"$@\" >> '{folder / name}.calls'\n"
        )
        program.chmod(0o755)
    return folder


def recorded_calls(folder: Path, name: str) -> list[str]:
    path = folder / f"{name}.calls"
    return path.read_text().split("\0")[:-1] if path.exists() else []


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_notifications_fit_the_platform(tmp_path, capsys, monkeypatch, platform):
    monkeypatch.setattr(yk, "host_platform", lambda: platform)
    yk.configure_logging(0)
    tools = fake_programs(tmp_path / "bin", "notify-send", "osascript")
    monkeypatch.setenv("PATH", str(tools))
    info = yk.CardInfo("Reader 00 00", 123, (5, 7, 1))
    card = types.SimpleNamespace(info=info, reader="Reader 00 00")
    signer = yk.CardSigner(
        card,
        yk.SLOTS["9a"],
        yk.KeyAlgorithm.ECCP256,
        yk.PinPolicy.NEVER,
        yk.PinSource(),
        yk.TouchPolicy.ALWAYS,
        notify=True,
    )
    yk.check_notify(True)
    signer.remind()
    message = f"touch your YubiKey ({info.describe()}) to approve a kubectl request"
    expected = {
        "linux": (["notify-send", "-u", "critical", "yubikey-kube-proxy", message], []),
        "darwin": (
            [],
            [
                "osascript",
                "-e",
                "on run argv\ndisplay notification (item 1 of argv) with title "
                '"yubikey-kube-proxy"\nend run',
                message,
            ],
        ),
        "win32": ([], []),
    }[platform]
    assert (
        recorded_calls(tools, "notify-send"),
        recorded_calls(tools, "osascript"),
    ) == expected
    start = (
        "yubikey-kube-proxy: WARNING: --notify: Windows notifications are not "
        "supported, so touch prompts only go to this log: fix that or drop --notify\n"
        if platform == "win32"
        else ""
    )
    assert capsys.readouterr().err == (
        f"{start}yubikey-kube-proxy: WARNING: {message}\n"
    )
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    yk.check_notify(True)
    yk.check_notify(False)
    reason = {
        "linux": "notify-send was not found (Debian and Ubuntu: install libnotify-bin)",
        "darwin": "osascript was not found",
        "win32": "Windows notifications are not supported",
    }[platform]
    assert capsys.readouterr().err == (
        f"yubikey-kube-proxy: WARNING: --notify: {reason}, so touch prompts only go "
        "to this log: fix that or drop --notify\n"
    )


# -- touch prompts reach the person; the command line --------------------------------


def test_shell_prints_the_touch_prompt_on_its_terminal_and_notifies(
    cards, cluster, tmp_path, capsys
):
    import shlex

    prompted = threading.Event()
    waiting = {"on": False}

    def touch(slot):
        return prompted.wait(60) if waiting["on"] else True

    piv = VirtualPiv(serial=11100003, touch=touch)
    cards(piv)
    out = tmp_path / "yk"
    assert (
        run_cli(
            *setup_args(cluster.kubeconfig, out, "--touch-policy", "always"),
            capsys=capsys,
        )[0]
        == 0
    )
    waiting["on"] = True
    tools = fake_programs(tmp_path / "bin", "notify-send")
    command = shlex.join(
        [
            sys.executable, str(HERE / "yk_kube_proxy.py"), "shell", "--notify",
            "--kubeconfig", str(out / "proxy.yml"), "--", "kubectl", "get",
            "--raw", "/version", "--request-timeout", "60s",
        ]
    )  # fmt: skip
    err = tmp_path / "shell.err"
    terminal = subprocess.Popen(  # a pseudo-terminal, as a person's
        ["script", "-qefc", f"{command} 2>{shlex.quote(str(err))}", "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"},
    )
    shown = bytearray()

    def read():
        while chunk := os.read(terminal.stdout.fileno(), 65536):
            shown.extend(chunk)
            if b"to approve a kubectl request" in shown:
                prompted.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert terminal.wait(120) == 0, (bytes(shown), err.read_text())
    reader.join(10)
    terminal.stdin.close()
    message = (
        "touch your YubiKey (YubiKey serial 11100003 (firmware 5.7.1) in reader "
        f"'{YUBIKEY_READER} 00 00') to approve a kubectl request"
    )
    text = shown.decode(errors="replace")
    assert f"yubikey-kube-proxy: {message}\r\n" in text
    assert '"gitVersion":"v1.32.0"' in text
    assert "touch your YubiKey" not in err.read_text()  # the terminal, not the log
    assert recorded_calls(tools, "notify-send") == [
        "notify-send",
        "-u",
        "critical",
        "yubikey-kube-proxy",
        message,
    ]


def test_proxy_says_at_start_when_notify_cannot_notify(
    card57, proxies, cluster, tmp_path, capsys
):
    assert (
        run_cli(*setup_args(cluster.kubeconfig, tmp_path / "yk"), capsys=capsys)[0] == 0
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    proxy = proxies(tmp_path / "yk", "--notify", env={**os.environ, "PATH": str(empty)})
    assert proxy.stderr().startswith(
        "yubikey-kube-proxy: WARNING: --notify: notify-send was not found (Debian "
        "and Ubuntu: install libnotify-bin), so touch prompts only go to this log: "
        "fix that or drop --notify\n"
    )


def test_verbose_before_or_after_the_command(tmp_path, capsys):
    import logging

    missing = tmp_path / "none.yml"
    error = (
        f"yubikey-kube-proxy: error: {missing} does not exist: pass the merged file "
        "with --kubeconfig\n"
    )
    for argv, verbose in (
        (["unmerge", "x", "--kubeconfig", str(missing)], False),
        (["-v", "unmerge", "x", "--kubeconfig", str(missing)], True),
        (["unmerge", "x", "--kubeconfig", str(missing), "-v"], True),
    ):
        code, _, stderr = run_cli(*argv, capsys=capsys)
        assert code == 1 and stderr.endswith(error)
        assert ("Traceback" in stderr) == verbose
        assert yk.log.level == (logging.INFO if verbose else logging.WARNING)
    run_cli("-v", "unmerge", "x", "--kubeconfig", str(missing), "-v", capsys=capsys)
    assert yk.log.level == logging.DEBUG  # the two add up
    yk.configure_logging(0)


def test_shell_finds_client_yml_beside_kubeconfig_env(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "yk", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("KUBECONFIG", str(home / "proxy.yml"))
    args = types.SimpleNamespace(kubeconfig=None, client_config=None)
    with pytest.raises(yk.ConfigError) as missing:
        yk.shell_client_config(args, 40000, tmp_path)
    assert str(missing.value) == (
        f"cannot read kubeconfig {home / 'client.yml'}: No such file or directory; "
        "pass the client.yml that setup wrote with --client-config"
    )
    (home / "client.yml").write_text(
        "clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:8080\n"
    )
    written = yk.shell_client_config(args, 40000, tmp_path)
    assert written.read_text() == (
        "clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:40000\n"
    )


def test_ruff_and_mypy_are_clean(tmp_path):
    """The rule set pinned in pyproject.toml, on both files; mypy on the module."""
    ruff = [sys.executable, "-m", "ruff"]
    checks = {
        "ruff check": ruff + ["check", "--no-cache", "yk_kube_proxy.py", __file__],
        "ruff format": ruff
        + ["format", "--check", "--no-cache", "yk_kube_proxy.py", __file__],
        "mypy": [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
    }
    outputs = {
        name: subprocess.run(
            argv, cwd=HERE, capture_output=True, text=True, check=False
        ).stdout
        for name, argv in checks.items()
    }
    assert outputs == {
        "ruff check": "All checks passed!\n",
        "ruff format": "2 files already formatted\n",
        "mypy": "Success: no issues found in 1 source file\n",
    }


# =============================================================================
# 8. Benchmark (python -m pytest -m bench -s): figures side by side, no assertions on
# time
# =============================================================================


BENCH_RUNS = 30
BENCH_KINDS = {"p256": ALG_ECCP256, "rsa2048": ALG_RSA2048}


def real_card(piv: VirtualPiv, on: bool = True) -> None:
    """Make the virtual card as slow as a YubiKey 5 (REAL_CARD_TIMINGS), or instant."""
    piv.apdu_delay = REAL_CARD_TIMINGS["apdu_delay"] if on else 0.0
    piv.verify_delay = REAL_CARD_TIMINGS["verify_delay"] if on else 0.0
    piv.sign_delays = dict(REAL_CARD_TIMINGS["sign_delays"]) if on else {}


def versus(measured: float, limit: float, unit: str, higher: bool = False) -> str:
    """``measured`` next to its target, and whether it was met."""
    met = measured >= limit if higher else measured <= limit
    sign = ">=" if higher else "<="
    return f"target {sign} {limit:.4g}{unit}: {'met' if met else 'MISSED'}"


class DirectClient:
    """The baseline: stdlib ssl straight to the API server, the key on disk."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.context = ssl.create_default_context(
            cadata=pem(cluster.server_ca).decode()
        )
        bundle = workdir / "direct-client.pem"
        bundle.write_bytes(pem(cluster.ident.cert) + pem(cluster.ident.key))
        self.context.load_cert_chain(bundle)
        self.port = cluster.api.port

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=120
        )

    get = LocalClient.get


def timings(action, runs: int = BENCH_RUNS) -> list[float]:
    result = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        result.append(time.perf_counter() - started)
    return result


def med(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def download(client, size: int) -> float:
    """MB/s of one download of ``size`` bytes, read in 64 KB pieces."""
    conn = client.connection()
    started = time.perf_counter()
    conn.request("GET", f"/bytes?n={size}")
    response = conn.getresponse()
    received = 0
    while data := response.read(65536):
        received += len(data)
    elapsed = time.perf_counter() - started
    conn.close()
    assert received == size
    return size / elapsed / 1e6


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def parallel(client, clients: int = 8, each: int = 10) -> tuple[float, list[float]]:
    latencies: list[float] = []

    def worker() -> None:
        latencies.extend(timings(lambda: client.get("/version"), each))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * each / (time.perf_counter() - started), latencies


def kubectl_wall(config: Path, cache: Path | None, runs: int = 5) -> list[float]:
    def run() -> None:
        cache_dir = cache or Path(tempfile_dir())
        done = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(config),
                "--cache-dir",
                str(cache_dir),
                "get",
                "pods",
            ],
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    return timings(run, runs)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="kubectl-cache-")


@pytest.mark.bench
def test_benchmark(rig, tmp_path):
    rows: list[str] = []
    for kind in BENCH_KINDS:
        rows += bench_latency(rig, tmp_path / kind, kind)
    rows += bench_transfer_kubectl_memory(rig, tmp_path / "more")
    rows += bench_presence(rig, tmp_path / "presence")
    sign_ms = {k: v * 1000 for k, v in REAL_CARD_TIMINGS["sign_delays"].items()}
    print(
        "\n".join(
            [
                "",
                "=" * 78,
                "yubikey-kube-proxy benchmark (median / p90 of "
                f"{BENCH_RUNS} runs unless noted)",
                f"real card: {REAL_CARD_TIMINGS['apdu_delay'] * 1000:.1f} ms per APDU, "
                f"VERIFY {REAL_CARD_TIMINGS['verify_delay'] * 1000:.0f} ms, P-256 "
                f"{sign_ms[ALG_ECCP256]:.0f} ms, P-384 {sign_ms[ALG_ECCP384]:.0f} ms, "
                f"RSA-2048 {sign_ms[ALG_RSA2048]:.0f} ms",
                f"machine: {os.cpu_count()} cores, load average "
                + " ".join(f"{x:.1f}" for x in os.getloadavg()),
                "=" * 78,
                *rows,
            ]
        )
    )


def bench_latency(rig, workdir: Path, kind: str) -> list[str]:
    workdir.mkdir()
    piv = VirtualPiv(serial=20000000 + len(kind))
    inserted = rig.insert(piv)
    cluster = start_cluster(workdir, kind=kind)
    proxy = setup_and_proxy(cluster, workdir / "yk")
    try:
        direct, local = DirectClient(cluster, workdir), LocalClient(proxy)
        a = timings(lambda: direct.get("/version"))
        b = timings(lambda: local.get("/version"))
        real_card(piv)
        c = timings(lambda: local.get("/version"))
        real_card(piv, False)
        rps_fast, lat_fast = parallel(local)
        real_card(piv)
        rps_slow, lat_slow = parallel(local)
        real_card(piv, False)
        card_s = REAL_CARD_TIMINGS["sign_delays"][BENCH_KINDS[kind]]
        card_ms, ceiling = card_s * 1000, 1 / card_s
        own = (med(b) - med(a)) * 1000
        return [
            f"-- {kind}: one request per fresh connection (GET /version), fresh mode",
            f"  (a) direct, key on disk, stdlib ssl  {med(a) * 1000:7.2f} / "
            f"{p90(a) * 1000:7.2f} ms",
            f"  (b) proxy, instant card              {med(b) * 1000:7.2f} / "
            f"{p90(b) * 1000:7.2f} ms",
            f"  (c) proxy, real card, {card_ms:3.0f} ms         {med(c) * 1000:7.2f} / "
            f"{p90(c) * 1000:7.2f} ms",
            f"  proxy's own cost (b)-(a)             {own:7.2f} ms  "
            + versus(own, 4, " ms"),
            f"  what a user feels (c)/((a)+card)     "
            f"{med(c) / (med(a) + card_s):7.2f} x",
            f"  8 clients x 10 requests, instant card {rps_fast:6.1f} req/s, p90 "
            f"{p90(lat_fast) * 1000:.1f} ms",
            f"  8 clients x 10 requests, real card   {rps_slow:6.1f} req/s "
            f"({rps_slow / ceiling:.0%} of the card's {ceiling:.1f}/s), p90 "
            f"{p90(lat_slow) * 1000:.1f} ms",
        ]
    finally:
        proxy.stop()
        cluster.api.stop()
        rig.remove(inserted)


def bench_transfer_kubectl_memory(rig, workdir: Path) -> list[str]:
    workdir.mkdir()
    piv = VirtualPiv(serial=20000099)
    inserted = rig.insert(piv)
    cluster = start_cluster(workdir)
    proxy = setup_and_proxy(cluster, workdir / "yk")
    reuse = ProxyProcess(workdir / "yk", "--reuse-while-present")
    try:
        rows = ["-- throughput (median of 3 downloads), fresh mode"]
        direct, local = DirectClient(cluster, workdir), LocalClient(proxy)
        idle = (local.get("/version"), peak_rss_mb(proxy.process.pid))[1]
        for size in (20_000_000, 200_000_000):
            d = med([download(direct, size) for _ in range(3)])
            p = med([download(local, size) for _ in range(3)])
            rows.append(
                f"  {size // 1_000_000:3d} MB: direct {d:7.1f} MB/s, proxy {p:7.1f} "
                f"MB/s ({p / d:.0%} of direct)  " + versus(p / d, 0.6, "", True)
            )
        rows.append(
            f"-- proxy peak RSS: idle {idle:.1f} MB, after the 200 MB downloads "
            f"{peak_rss_mb(proxy.process.pid):.1f} MB"
        )
        rows += bench_kubectl(cluster, piv, proxy, reuse, workdir)
        return rows
    finally:
        reuse.stop()
        proxy.stop()
        cluster.api.stop()
        rig.remove(inserted)


def bench_kubectl(cluster, piv, proxy, reuse, workdir: Path) -> list[str]:
    rows = [
        "-- kubectl get pods wall time (median / p90 of 5; cold = empty discovery cache)"
    ]
    warm = workdir / "warm-cache"
    direct: dict[str, float] = {}
    for temperature, cache in (("cold", None), ("warm", warm / "direct")):
        if cache:
            kubectl_wall(cluster.kubeconfig, cache, 1)
        walls = kubectl_wall(cluster.kubeconfig, cache)
        direct[temperature] = med(walls)
        rows.append(
            f"  direct, key on disk           {temperature} {med(walls) * 1000:6.0f} / "
            f"{p90(walls) * 1000:6.0f} ms"
        )
    real_card(piv)
    one_signature = REAL_CARD_TIMINGS["sign_delays"][ALG_ECCP256]
    limits = {
        "cold": (direct["cold"] + one_signature) * 1.15,
        "warm": direct["warm"] * 1.2,
    }
    for label, process in (("fresh mode", proxy), ("pool mode", reuse)):
        for temperature, cache in (("cold", None), ("warm", warm / label[:5])):
            if cache:
                kubectl_wall(process.client_config, cache, 1)
            before = piv.sign_count
            walls = kubectl_wall(process.client_config, cache)
            signatures = (piv.sign_count - before) / len(walls)
            target = (
                "  " + versus(med(walls) * 1000, limits[temperature] * 1000, " ms")
                if label == "pool mode"
                else ""
            )
            rows.append(
                f"  real card, {label:18s} {temperature} {med(walls) * 1000:6.0f} / "
                f"{p90(walls) * 1000:6.0f} ms, {signatures:3.1f} signatures per "
                f"command{target}"
            )
    real_card(piv, False)
    return rows


def bench_presence(rig, workdir: Path) -> list[str]:
    """A k9s-like load in pool mode, then a pull with three streams open."""
    workdir.mkdir()
    piv = VirtualPiv(serial=20000100, **REAL_CARD_TIMINGS)
    inserted = rig.insert(piv)
    cluster = start_cluster(workdir)
    proxy = setup_and_proxy(
        cluster, workdir / "yk", proxy_extra=["--reuse-while-present"]
    )
    try:
        rows = bench_k9s_like(cluster, piv, proxy, workdir)
        streams = open_streams(proxy, cluster)
        try:
            seen = len(cluster.api.hangups)  # the k9s-like watches' ends
            pulled = time.monotonic()
            inserted.remove()
            hangups = cluster.api.wait_hangups(seen + 3)[seen:]
            closed = max(t for _, t in hangups) - pulled
            started = time.perf_counter()
            status, _ = LocalClient(proxy).get("/version")
            refused = time.perf_counter() - started
        finally:
            stop_all(streams)
        assert status == 503
        return rows + [
            "-- the card pulled with a watch, a logs -f and an exec -i open (pool mode)",
            f"  all three upstream connections closed {closed * 1000:6.0f} ms after the "
            "pull  " + versus(closed * 1000, 1000, " ms"),
            f"  the next request refused (503)        {refused * 1000:6.1f} ms  "
            + versus(refused * 1000, 100, " ms"),
        ]
    finally:
        proxy.stop()
        cluster.api.stop()
        if inserted.inserted:
            rig.remove(inserted)


def bench_k9s_like(cluster, piv, proxy, workdir: Path) -> list[str]:
    """3 watches and a list every 2 s for 30 s; each list side by side with a
    direct one (key on disk) run just before it."""
    cache = workdir / "cache"
    for config, name in (
        (cluster.kubeconfig, "direct"),
        (proxy.client_config, "proxy"),
    ):
        kubectl_wall(config, cache / name, 1)
    base = ["kubectl", "--kubeconfig", str(proxy.client_config), "get", "pods"]
    before, opened = piv.sign_count, len(cluster.api.requests)
    watches = [
        subprocess.Popen(base + ["-w", "-A"], stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    ratios = []
    try:
        wait_until(
            lambda: (
                sum("watch=" in r["path"] for r in cluster.api.requests[opened:]) == 3
            ),
            60,
            "the three watches",
        )
        ends = time.monotonic() + 30
        while time.monotonic() < ends:
            tick = time.monotonic()
            direct = kubectl_wall(cluster.kubeconfig, cache / "direct", 1)[0]
            ratios.append(
                kubectl_wall(proxy.client_config, cache / "proxy", 1)[0] / direct
            )
            time.sleep(max(0.0, 2 - (time.monotonic() - tick)))  # the load's rhythm
    finally:
        for watch in watches:
            watch.kill()
            watch.wait(10)
    signatures = piv.sign_count - before
    return [
        "-- k9s-like: 3 watches + kubectl get pods every 2 s for 30 s (pool mode, real card)",
        f"  card signatures                       {signatures:6d}  "
        + versus(signatures, 5, ""),
        f"  {len(ratios)} lists vs direct lists run just before: median "
        f"{med(ratios):4.2f} x, p90 {p90(ratios):4.2f} x, worst {max(ratios):4.2f} x  "
        + versus(max(ratios), 1.2, " x"),
    ]
