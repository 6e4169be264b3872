#!/usr/bin/env python3
"""Labels texts with a served classifier's probabilities (soft labels for `aitier classifier train
--teacher-data`): reads IN.csv (a `text` column), asks URL/api/classify/NAME/batch 32 texts at a
time, writes OUT.csv with `text`, the other input columns and one column per label.

    label.py URL NAME IN.csv OUT.csv
"""
import csv, json, sys, time, urllib.request

url, name, src, out = sys.argv[1:5]
with open(src, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
labels, done, started = None, [], time.time()
for start in range(0, len(rows), 32):
    chunk = rows[start : start + 32]
    body = json.dumps({"texts": [r["text"] for r in chunk]}).encode()
    req = urllib.request.Request(f"{url}/api/classify/{name}/batch", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        results = json.load(resp)["results"]
    for row, result in zip(chunk, results):
        labels = labels or sorted(result["scores"])
        done.append({**row, **{l: f"{result['scores'][l]:.6f}" for l in labels}})
    if (start // 32) % 50 == 0:
        print(f"{len(done)}/{len(rows)} in {time.time() - started:.0f} s", flush=True)
with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + labels)
    w.writeheader()
    w.writerows(done)
print(f"{out}: {len(done)} texts in {time.time() - started:.0f} s")
