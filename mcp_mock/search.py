"""Offline web search: BM25 ranking over the bundled corpus, and opening a document by id."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl"
MAX_QUERY_CHARS = 200
MAX_RESULTS = 10
# Okapi BM25 constants as in Robertson & Zaragoza, "The Probabilistic Relevance Framework" (2009).
K1, B = 1.2, 0.75
TITLE_WEIGHT = 3  # a title match says more about a page than a passing mention in its text


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words."""
    return re.findall(r"[a-z0-9]+", text.lower())


class Corpus:
    """The documents with a BM25 index built once at load."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = {doc["id"]: doc for doc in docs}
        self.terms = {
            doc["id"]: Counter(tokenize(doc["title"]) * TITLE_WEIGHT + tokenize(doc["text"])) for doc in docs
        }
        self.lengths = {doc_id: sum(terms.values()) for doc_id, terms in self.terms.items()}
        self.avg_length = sum(self.lengths.values()) / max(len(docs), 1)
        df = Counter(term for terms in self.terms.values() for term in terms)
        n = len(docs)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def score(self, doc_id: str, query: list[str]) -> float:
        """BM25 score of one document for the query terms."""
        terms, norm = self.terms[doc_id], K1 * (1 - B + B * self.lengths[doc_id] / self.avg_length)
        return sum(
            self.idf.get(t, 0.0) * terms[t] * (K1 + 1) / (terms[t] + norm) for t in query if t in terms
        )

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The k best (doc_id, score) pairs; ties break by id so results never vary."""
        words = tokenize(query)
        scored = [(doc_id, self.score(doc_id, words)) for doc_id in self.docs]
        ranked = sorted((pair for pair in scored if pair[1] > 0), key=lambda p: (-p[1], p[0]))
        return ranked[:k]


@lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The bundled corpus, read once per process (it is never written)."""
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    return Corpus([json.loads(line) for line in lines if line.strip()])


def snippet(text: str) -> str:
    """The first sentence of a text."""
    return text.split(". ")[0].rstrip(".") + "."


def web_search(query: str, k: int) -> str:
    """Ranked results, one per line: 'rank. id | title | first sentence'."""
    if not query.strip():
        raise ToolError("query is empty; search for a few words, for example 'Korvel Lighthouse'")
    if len(query) > MAX_QUERY_CHARS:
        raise ToolError(f"query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_RESULTS:
        raise ToolError(f"k must be from 1 to {MAX_RESULTS}, got {k}")
    corpus = load_corpus()
    hits = corpus.search(query, k)
    if not hits:
        return f"no results for {query!r}"
    lines = []
    for rank, (doc_id, _) in enumerate(hits, start=1):
        doc = corpus.docs[doc_id]
        lines.append(f"{rank}. {doc_id} | {doc['title']} | {snippet(doc['text'])}")
    return "\n".join(lines)


def open_document(doc_id: str) -> str:
    """The full document: 'id: title' then its text."""
    doc = load_corpus().docs.get(doc_id.strip())
    if doc is None:
        raise ToolError(f"document id {doc_id!r} not found; ids look like 'doc-012'")
    return f"{doc['id']}: {doc['title']}\n{doc['text']}"
