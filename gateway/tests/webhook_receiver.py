"""A webhook receiver for gateway/tests/webhooks.rs: an app backend as the gateway meets it.

Every request is checked with PyPI's `standardwebhooks` (an implementation independent of the
gateway's): a request whose signature, id or timestamp does not verify is refused (400) and
counted. The first attempt of every FAIL_EVERY-th new event is answered 500, and the same
`webhook-id` is then expected again (at-least-once delivery). Accepted events are kept in
arrival order; GET /events returns them with the counters.

    python webhook_receiver.py PORT SECRET [FAIL_EVERY]
    python webhook_receiver.py --check      (exit 0 if standardwebhooks can be imported)
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if len(sys.argv) > 1 and sys.argv[1] == "--check":
    import standardwebhooks  # noqa: F401

    sys.exit(0)

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PORT = int(sys.argv[1])
SECRET = sys.argv[2]
FAIL_EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else 3

verifier = Webhook(SECRET)
lock = threading.Lock()
state = {
    "events": [],  # accepted bodies, in arrival order
    "bad_signatures": 0,
    "failed_ids": [],  # answered 500 on their first attempt
    "redelivered": [],  # ids of those that came again and were accepted
    "duplicates": 0,  # an id accepted before, delivered again
    "attempts": 0,
    "seen": 0,  # distinct ids seen
}
known = set()
accepted = set()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with lock:
            body = json.dumps(state).encode()
        self.answer(200, body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with lock:
            state["attempts"] += 1
            try:
                verifier.verify(data, headers)
            except WebhookVerificationError as e:
                state["bad_signatures"] += 1
                print(f"bad signature: {e} {headers}", file=sys.stderr, flush=True)
                return self.answer(400)
            event = json.loads(data)
            wid = headers["webhook-id"]
            if event.get("id") != wid:
                state["bad_signatures"] += 1
                return self.answer(400)
            if wid not in known:
                known.add(wid)
                state["seen"] += 1
                if (state["seen"] - 1) % FAIL_EVERY == 0:
                    state["failed_ids"].append(wid)
                    return self.answer(500)
            if wid in accepted:
                state["duplicates"] += 1
                return self.answer(204)
            accepted.add(wid)
            if wid in state["failed_ids"]:
                state["redelivered"].append(wid)
            state["events"].append(event)
        self.answer(204)


ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print(f"listening on {PORT}", flush=True)
server.serve_forever()
