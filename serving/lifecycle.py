"""Starting and stopping the embedded server's process: TLS material, binding the gRPC port,
and turning SIGTERM / SIGINT into a graceful stop.

Why a module of its own: these are the operating-system facing steps of `ModelServer.start()`
and `wait_for_signal()` (reading PEM files, binding sockets, installing signal handlers), each
with an error message or a subtlety of its own. Kept apart from the request logic in
`serving/server.py`, they can be read (and their pitfalls documented) in one place. This
module knows nothing of models or of the other serving modules.
"""

from __future__ import annotations

import signal
import ssl
import time

import grpc


def _read_pem(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise OSError(f"{flag} {path}: cannot read the PEM file ({error.strerror})") from None


def grpc_credentials(ssl_cert: str, ssl_key: str,
                     client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials from the PEM files of `--ssl-cert` and `--ssl-key`; with `client_ca`
    (`--ssl-client-ca`, TF Serving's ssl_config `custom_ca` + `client_verify`), clients must
    present a certificate that CA signed (mutual TLS).

    Read before any model is loaded, so that an unreadable file fails the start at once, with
    the flag and path named, instead of after the (slow) first load.
    """
    pair = (_read_pem("--ssl-key", ssl_key), _read_pem("--ssl-cert", ssl_cert))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read_pem("--ssl-client-ca", client_ca),
        require_client_auth=True)


def rest_ssl_context(ssl_cert: str | None, ssl_key: str | None,
                     client_ca: str | None = None) -> ssl.SSLContext | None:
    """The REST listener's TLS context for the same PEM files as gRPC's (None: plain HTTP),
    requiring a client certificate signed by `client_ca` when given."""
    if ssl_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ssl_cert, ssl_key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bind_grpc(server: grpc.Server, address: str,
              credentials: grpc.ServerCredentials | None) -> int:
    """Binds `server` to host:port (TLS only when `credentials`); returns the bound port.

    grpcio reports a port it cannot bind as a RuntimeError; it becomes an OSError naming the
    address, which the command line reports as a one-line error like any other bind failure.
    """
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot bind {address}: {error}") from None


class StopSignals:
    """Records SIGTERM and SIGINT so that the main thread can stop the server gracefully.

    `catch()` installs the handlers; `wait()` blocks until one of the signals has come. Signals
    that come between the two are kept, not lost: call `catch()` before announcing the server,
    so that a signal sent as soon as the "serving ..." line is read drains the server instead
    of killing it (the default action).

    The handler only appends to a list, and must not do more. Python runs a handler in the
    main thread between two bytecodes, possibly while that thread holds the lock the handler
    would take: `Event.set()` in a handler that interrupts the main thread's own `Event.wait()`
    (which holds the Event's condition lock for a few bytecodes on each wake-up) blocks
    forever, so the process answers nothing more and never exits.
    """

    def __init__(self) -> None:
        self._received: list[int] | None = None  # None until catch()

    def catch(self) -> None:
        """Installs the handlers (call from the main thread); a second call does nothing."""
        if self._received is not None:
            return
        received: list[int] = []

        def on_signal(signum, frame):
            received.append(signum)  # lock-free (see the class docstring)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        self._received = received

    def wait(self) -> int:
        """Blocks until SIGTERM or SIGINT (catching them first if needed); returns the first."""
        self.catch()
        while not self._received:
            time.sleep(0.1)  # a lock-free handler cannot wake a wait; 0.1 s is the latency
        return self._received[0]
