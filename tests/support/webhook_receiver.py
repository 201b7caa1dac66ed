"""A webhook receiver for postbox's tests: verifies every request's Standard Webhooks
signature with the reference Python library (`standardwebhooks`, from PyPI: an implementation
independent of postbox's), records each request as a JSON line, and answers as told.

usage: webhook_receiver.py SECRET LOG_FILE
Prints `port N` on its first line of stdout, then serves on 127.0.0.1:N until killed.

POST /hook          a webhook: verified, recorded, answered per the mode
PUT  /_mode         body: ok | 500 | 410 | slow (2xx after 300 ms) | hang (no answer for 30 s)
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET, LOG = sys.argv[1], sys.argv[2]
HOOK = Webhook(SECRET)
STATE = {"mode": "ok"}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        n = int(self.headers.get("Content-Length", "0"))
        STATE["mode"] = self.rfile.read(n).decode().strip()
        self.answer(200, b"mode set")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        mode = STATE["mode"]
        rec = {
            "id": self.headers.get("webhook-id"),
            "timestamp": self.headers.get("webhook-timestamp"),
            "mode": mode,
            "at": time.time(),
        }
        try:
            payload = HOOK.verify(body, dict(self.headers.items()))
            rec.update(verified=True, type=payload["type"], email_id=payload["data"].get("email_id"),
                       payload=payload)
        except (WebhookVerificationError, ValueError, KeyError) as e:
            rec.update(verified=False, error=str(e))
        with LOCK:
            with open(LOG, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if not rec["verified"]:
            self.answer(400, b"bad signature")
        elif mode == "500":
            self.answer(500, b"receiver down\x00 on cue")
        elif mode == "410":
            self.answer(410, b"gone")
        elif mode == "hang":
            time.sleep(30)
            self.answer(200)
        else:
            if mode == "slow":
                time.sleep(0.3)
            self.answer(204)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that went away mid-answer (postbox killed on purpose): not news.
        pass


server = Server(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
server.serve_forever()
