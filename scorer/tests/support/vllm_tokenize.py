#!/usr/bin/env python3
"""Stands in for vLLM pods' `POST /tokenize` in scorer/tests/tokenize.rs.

Tokenizes with the Python `tokenizers` package (what vLLM's fast tokenizer
runs) and renders chat templates with jinja2 the way transformers'
`apply_chat_template` does, reusing scripts/tokens_reference.py's model
loading and rendering (the same reference the tokens parity test checks the
Rust code against). Request and response bodies follow vLLM's
`TokenizeCompletionRequest` / `TokenizeChatRequest` / `TokenizeResponse`.

Usage: vllm_tokenize.py --model NAME=PATH ... --bind IP ... [--slow NAME]
Serves every --bind address on a free port (loopback only) and prints one
line `READY ip:port ip:port ...`. `GET /stats` answers {"requests": n} (POSTs
to /tokenize so far). A model named by --slow answers after 0.5 s.
"""

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "scripts"))
from tokens_reference import Model, make_env, render  # noqa: E402

MAX_MODEL_LEN = 131072


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--slow", action="append", default=[])
    args = parser.parse_args()
    models = {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        models[name] = Model(path)
    env = make_env()
    lock = threading.Lock()
    stats = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/stats":
                with lock:
                    self.reply(200, dict(stats))
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            req = json.loads(self.rfile.read(length))
            if self.path != "/tokenize":
                self.reply(404, {"error": "not found"})
                return
            with lock:
                stats["requests"] += 1
            name = req.get("model")
            model = models.get(name)
            if model is None:
                self.reply(404, {"error": {"message": f"The model `{name}` does not exist.", "code": 404}})
                return
            if name in args.slow:
                time.sleep(0.5)
            if "messages" in req:
                text = render(env, model, {
                    "messages": req["messages"],
                    "add_generation_prompt": req.get("add_generation_prompt", True),
                    "kwargs": req.get("chat_template_kwargs") or {},
                })
                ids = model.tok.encode(text, add_special_tokens=req.get("add_special_tokens", False)).ids
            else:
                ids = model.tok.encode(req["prompt"], add_special_tokens=req.get("add_special_tokens", True)).ids
            self.reply(200, {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids})

    addrs = []
    for ip in args.bind:
        if not ip.startswith("127."):
            sys.exit(f"refusing non-loopback address {ip}")
        server = ThreadingHTTPServer((ip, 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        addrs.append(f"{ip}:{server.server_address[1]}")
    print("READY " + " ".join(addrs), flush=True)
    # Runs until the test kills it or closes stdin.
    sys.stdin.read()


if __name__ == "__main__":
    main()
