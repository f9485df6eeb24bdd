"""A small OpenAI-compatible `/v1/completions` server for `tpt think` tests, run as its own process:
`python completions_server.py LOG PORT_FILE [SLOW_WORD]`.

Its answer is a function of the prompt, so reruns can be compared. Every answered request is
appended to LOG as the document marker (`mark<N>`) found in the prompt, so a test can count how
often each document was generated. A prompt containing SLOW_WORD is answered after 120 s only.
"""

import hashlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(prompt: str) -> str:
    steps = 1 + int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 5
    return "so " + " ".join(["step"] * steps)


def main() -> None:
    log_path, port_path = sys.argv[1], sys.argv[2]
    slow = sys.argv[3] if len(sys.argv) > 3 else ""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["prompt"]
            if slow and slow in prompt:
                time.sleep(120)
            text = answer(prompt)
            payload = json.dumps(
                {
                    "choices": [{"text": text, "finish_reason": "stop"}],
                    "usage": {"completion_tokens": len(text.split())},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            marker = re.search(r"mark\d+", prompt)
            with lock, open(log_path, "a") as f:
                f.write((marker.group(0) if marker else "?") + "\n")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    with open(port_path + ".part", "w") as f:
        f.write(str(httpd.server_address[1]))
    import os

    os.replace(port_path + ".part", port_path)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
