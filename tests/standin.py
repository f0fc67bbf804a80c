"""A small OpenAI-compatible stand-in server on 127.0.0.1, so the real HTTP client paths (alignkit's judge,
AlpacaEval's `openai` client) are exercised end to end. It answers per `mode` and records every request."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWERS = {"rating": "Helpful and correct. Rating: [[7]]", "garbage": "I like turtles"}


class OpenAIStandIn:
    """`mode`: rating | garbage | error (HTTP 500) | slow (1 s, then a rating) | notjson | text (answers `text`)
    | reply (answers `reply(request body)`)."""

    def __init__(self):
        self.mode, self.text, self.reply, self.requests = "rating", "", None, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if server.mode == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                if server.mode == "slow":
                    time.sleep(1.0)
                content = (server.text if server.mode == "text" else server.reply(body) if server.mode == "reply"
                           else ANSWERS.get(server.mode, ""))
                payload = {"id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                           "model": body.get("model", "stand-in"),
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(payload if server.mode != "notjson" else "<html>oops</html>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
