#!/usr/bin/env python3
"""Time to first token of /api/rag/query on a running aitier: ingests the RAG dev set
(tests/fixtures/ragdev) into a collection, then asks a dozen of its answerable questions with
top_k 5 and prints each prompt's size and time to the first answer delta, then p50 and max.

    benches/rag_ttft.py [URL]     (default http://127.0.0.1:8000)
"""
import glob
import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
HERE = os.path.dirname(os.path.abspath(__file__))
DEV = os.path.join(HERE, "..", "tests", "fixtures", "ragdev")


def post(path, body):
    return urllib.request.Request(URL + path, data=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"})


def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


for path in sorted(glob.glob(os.path.join(DEV, "docs", "*"))):
    title = os.path.basename(path).rsplit(".", 1)[0]
    urllib.request.urlopen(post("/api/rag/documents", {
        "collection": "ttft", "title": title, "content": open(path).read()})).read()
questions = [json.loads(line) for line in open(os.path.join(DEV, "questions.jsonl"))]
questions = [q for q in questions if q.get("title")][::7][:12]
rows = []
for q in questions:
    started, first, prompt = time.time(), None, None
    try:
        body = {"question": q["question"], "collection": "ttft", "top_k": 5, "max_tokens": 8}
        with urllib.request.urlopen(post("/api/rag/query", body), timeout=120) as answer:
            for line in answer:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("type") == "delta" and first is None:
                    first = time.time() - started
                if event.get("type") == "done":
                    prompt = event.get("usage", {}).get("prompt_tokens")
    except urllib.error.HTTPError as e:
        rows.append(f"{e.code}")
        continue
    rows.append(f"{prompt}t:{first:.2f}s")
    q["ttft"] = first
ttfts = sorted(q["ttft"] for q in questions if q.get("ttft"))
print(f"CPU: {cpu()}")
print(" ".join(rows))
print(f"TTFT p50 {ttfts[len(ttfts) // 2]:.2f} s, max {ttfts[-1]:.2f} s ({len(ttfts)} answers)")
