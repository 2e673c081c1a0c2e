"""keystore: seals the OpenAI key of a queued run, so that it survives a server restart
without ever being written in clear.

Not run directly: the server's run queue makes one `KeyStore(path)` at start-up. The
first start writes a random Fernet key to `path` (MIP_KEY_FILE, owner-only, like the
password file); every sealed value in the journal needs that file to be opened again.
This file owns the key file and the sealing; it never writes a journal row or logs a
value.
"""

import hashlib
import hmac
import os
import tempfile

from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken


class KeyStoreError(Exception):
    """The key file is unreadable or malformed, or a sealed value does not open with it."""


class KeyStore:
    """Seals and opens short secrets with the Fernet key kept in `path`."""

    def __init__(self, path: str):
        key = read_or_make_key(path)
        self._fernet = Fernet(key)
        self._key = key

    def derived_key(self, purpose: str) -> bytes:
        """A key of its own for `purpose` (e.g. an HMAC), made from the key file: one file to
        keep, and a value that leaks under one purpose says nothing of the others."""
        return hmac.new(self._key, purpose.encode(), hashlib.sha256).digest()

    def seal(self, secret: str) -> str:
        """The secret encrypted and authenticated, as ASCII text for the journal."""
        return self._fernet.encrypt(secret.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        """The secret back; raises KeyStoreError if it was not sealed with this key file."""
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            # said in a run's log, which the API serves: no path
            raise KeyStoreError("the run's OpenAI key does not open with the key file "
                                "(MIP_KEY_FILE was replaced?)") from None


def read_or_make_key(path: str) -> bytes:
    """The Fernet key kept in `path`, made once (owner-only) when the file does not exist.
    Raises KeyStoreError naming the file when it cannot be read or holds no valid key."""
    try:
        if not os.path.exists(path):
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            # written whole under another name, then linked in place: a second server
            # starting at once never reads a half-written key, and link() fails rather than
            # replace a key that won the race
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".keystore-")
            try:
                with os.fdopen(fd, "wb") as f:  # mkstemp makes it owner-only (0600)
                    f.write(Fernet.generate_key() + b"\n")
                os.link(temp, path)
            finally:
                os.remove(temp)
        with open(path, "rb") as f:
            key = f.read().strip()
    except FileExistsError:
        return read_or_make_key(path)
    except OSError as e:
        raise KeyStoreError(f"MIP_KEY_FILE {path}: {e.strerror}") from None
    try:
        Fernet(key)
    except ValueError:
        raise KeyStoreError(f"MIP_KEY_FILE {path} does not hold a Fernet key (32 url-safe "
                            "base64-encoded bytes); delete it to make a new one") from None
    return key
