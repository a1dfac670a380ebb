"""For tests only: a real SMTP server (aiosmtpd, STARTTLS required, AUTH PLAIN/LOGIN required)
and a real HTTPS receiver (http.server) on loopback, each on a port the kernel picks. Prints
one JSON object per line: {"ready": ...} with both ports, then one per e-mail or request
received. Started by stillpoint_notify::testing::Receiver; ends when its stdin closes."""

import argparse
import asyncio
import email
import email.policy
import http.server
import json
import ssl
import sys
import threading
import logging

from aiosmtpd.smtp import SMTP, AuthResult

# aiosmtpd logs a warning about its own use of a deprecated field on every AUTH.
logging.getLogger("mail.log").setLevel(logging.ERROR)

lock = threading.Lock()


def say(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--fail-first", type=int, default=0,
                   help="answer the first N webhook requests 503")
    args = p.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    # The HTTPS receiver, on a thread of its own.
    failures = {"left": args.fail_first}

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode("utf-8", "replace")
            auth = self.headers.get("Authorization")
            if auth != "Bearer " + args.token:
                status = 401
            elif failures["left"] > 0:
                failures["left"] -= 1
                status = 503
            else:
                status = 200
            say({"hook": {"path": self.path, "authorization": auth,
                          "content_type": self.headers.get("Content-Type"),
                          "body": body, "status": status}})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
            body = msg.get_body(preferencelist=("plain",))
            say({"mail": {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "tls": session.ssl is not None,
                "login": login(session.auth_data),
                "from": str(msg["From"]),
                "to": str(msg["To"]),
                "subject": str(msg["Subject"]),
                "body": body.get_content().replace("\r\n", "\n") if body is not None else "",
            }})
            return "250 OK"

    def login(auth_data):
        if isinstance(auth_data, bytes):
            return auth_data.decode()
        return auth_data.login.decode() if hasattr(auth_data, "login") else None

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login.decode() == args.user
              and auth_data.password.decode() == args.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login)

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), hostname="stillpoint-test-smtp", tls_context=ctx,
                         require_starttls=True, authenticator=authenticator,
                         auth_require_tls=True, auth_required=True),
            host="127.0.0.1", port=0)
        smtp_port = server.sockets[0].getsockname()[1]
        say({"ready": {"smtp": smtp_port, "http": httpd.server_address[1]}})
        # Ends when the test's end of stdin closes (the test dropped its Receiver).
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
