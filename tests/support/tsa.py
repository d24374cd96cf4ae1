"""A real RFC 3161 time-stamping authority on loopback: `openssl ts -reply` behind a small
HTTP server, with a key and certificate of its own (or a CA's) made in a temporary directory."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[ca_ext]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
[tsa_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, nonRepudiation
extendedKeyUsage = critical, timeStamping
[tsa]
default_tsa = tsa_config
[tsa_config]
dir = {dir}
serial = $dir/serial
signer_cert = $dir/tsa.crt
certs = $dir/tsa.crt
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = no
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def _openssl(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, input=stdin, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {done.stderr.decode(errors='replace')}")
    return done.stdout


def make_tsa_identity(directory: Path, name: str = "Test TSA") -> None:
    """A CA (ca.crt) and a TSA certificate it issued (tsa.crt, tsa.key: EKU timeStamping,
    critical), and the openssl configuration (openssl.cnf) `openssl ts -reply` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(dir=directory, name=name))
    (directory / "serial").write_text("01\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30",
             "-config", str(config), "-extensions", "ca_ext", "-subj", f"/CN={name} CA",
             cwd=directory)  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", "tsa.key", "-out", "tsa.csr",
             "-config", str(config), "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", "2", "-days", "30", "-out", "tsa.crt",
             "-extfile", str(config), "-extensions", "tsa_ext", cwd=directory)  # fmt: skip


class LoopbackTsa:
    """Answers POSTed timestamp queries with `openssl ts -reply`. ``mode``: "ok", "down"
    (503, as an outage), or "garbage" (200 with bytes that are no TimeStampResp)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.mode = "ok"
        self.answered = 0
        self.requests = threading.Event()  # set at every request, whatever the answer
        tsa = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                query = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                tsa.requests.set()
                if tsa.mode == "down":
                    self.send_error(503, "TSA down for the test")
                    return
                if tsa.mode == "garbage":
                    body = b"this is no TimeStampResp"
                else:
                    body = _openssl("ts", "-reply", "-config", str(tsa.dir / "openssl.cnf"),
                                    "-queryfile", "/dev/stdin", "-section", "tsa_config",
                                    cwd=tsa.dir, stdin=query)  # fmt: skip
                    tsa.answered += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/tsa"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
