"""Citations and licenses of a source store, or of every source of a pool, from their dataset cards.

Each source carries a card (``name``, ``license``, ``citation``, ``description``, and for NWB
imports ``doi``); a pool keeps its sources' cards in its source table, so citing a pool of 10^4
sources reads the pool alone. Citations are de-duplicated by their text; each lists the sources
and licenses it covers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Citation:
    """One citation text (None: the sources give none) and the sources and licenses it covers."""

    text: str | None
    sources: tuple[str, ...]
    licenses: tuple[str, ...]
    title: str | None = None
    doi: tuple[str, ...] = ()


def collect(cards: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Citation]:
    """De-duplicated citations of ``(source name, card)`` pairs, in first-appearance order; the
    sources without a citation come last, as one entry with ``text=None``."""
    grouped: dict[str | None, dict[str, Any]] = {}
    for name, card in cards:
        card = card or {}
        text = card.get("citation") or None
        text = text.strip() if isinstance(text, str) else (None if text is None else str(text))
        entry = grouped.setdefault(text, {"sources": [], "licenses": [], "title": card.get("name"), "doi": []})
        entry["sources"].append(name)
        license_ = card.get("license") or "unknown"
        if license_ not in entry["licenses"]:
            entry["licenses"].append(str(license_))
        for doi in _dois(card):
            if doi not in entry["doi"]:
                entry["doi"].append(doi)
    ordered = [t for t in grouped if t is not None] + ([None] if None in grouped else [])
    return [Citation(t, tuple(grouped[t]["sources"]), tuple(grouped[t]["licenses"]), grouped[t]["title"],
                     tuple(grouped[t]["doi"])) for t in ordered]


DOI_PREFIX = re.compile(r"^\s*(?:doi:\s*|https?://(?:dx\.)?doi\.org/)", re.IGNORECASE)
"""What precedes a bare DOI in a card (NWB's related_publications write ``doi:10.1234/...``)."""


DOI = re.compile(r"10\.\d{4,9}/\S+")
"""A bare DOI: the directory indicator ``10.``, the registrant code, ``/`` and the suffix."""


def is_doi(text: str) -> bool:
    """Whether ``text`` is one DOI (bare, ``doi:...`` or a doi.org URL), not free text citing one."""
    return DOI.fullmatch(DOI_PREFIX.sub("", text).strip()) is not None


def _dois(card: dict[str, Any]) -> list[str]:
    """The card's DOIs, bare (``10.1234/x``: what BibTeX's doi field and resolvers expect)."""
    doi = card.get("doi")
    if isinstance(doi, str):
        doi = [doi]
    return [DOI_PREFIX.sub("", str(d)).strip() for d in doi] if isinstance(doi, (list, tuple)) else []


def licenses(cards: Sequence[tuple[str, dict[str, Any] | None]]) -> dict[str, list[str]]:
    """Sources by license (``"unknown"`` where the card gives none)."""
    out: dict[str, list[str]] = {}
    for name, card in cards:
        out.setdefault(str((card or {}).get("license") or "unknown"), []).append(name)
    return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def licenses_line(by_license: dict[str, list[str]]) -> str:
    """``CC0-1.0 (2 sources), CC-BY-4.0 (1 source)``."""
    return ", ".join(f"{lic} ({_count(len(names), 'source')})" for lic, names in by_license.items())


def _names(sources: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")


def as_text(cites: Sequence[Citation], by_license: dict[str, list[str]]) -> str:
    n_sources = sum(len(v) for v in by_license.values())
    cited = [c for c in cites if c.text is not None]
    lines = [f"{_count(n_sources, 'source')}, {_count(len(cited), 'citation')}; "
             f"licenses: {licenses_line(by_license)}"]
    if len(by_license) > 1:
        lines.append("the sources carry different licenses: honour each for the sources it covers")
    for i, c in enumerate(cited, 1):
        lines.append(f"[{i}] {c.text}")
        if c.doi:
            lines.append(f"    doi: {', '.join(c.doi)}")
        lines.append(f"    license: {', '.join(c.licenses)}; sources: {_names(c.sources)}")
    for c in cites:
        if c.text is None:
            lines.append(f"no citation given by: {_names(c.sources)} (license: {', '.join(c.licenses)})")
    return "\n".join(lines)


def _bib_escape(text: str) -> str:
    return text.replace("{", r"\{").replace("}", r"\}")


def _key(title: str | None, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", title or "source").strip("_") or "source"
    return f"deepstrf_{stem}_{i}"


def as_bibtex(cites: Sequence[Citation]) -> str:
    """One BibTeX entry per citation (a citation already in BibTeX is given as it is)."""
    entries = []
    for i, c in enumerate(cites, 1):
        if c.text is None:
            continue
        if c.text.lstrip().startswith("@"):
            entries.append(c.text)
            continue
        fields = [("title", c.title or c.sources[0]), ("note", c.text),
                  ("howpublished", f"License: {', '.join(c.licenses)}")]
        fields += [("doi", c.doi[0])] if c.doi else []
        body = ",\n".join(f"  {k} = {{{_bib_escape(str(v))}}}" for k, v in fields)
        entries.append(f"@misc{{{_key(c.title, i)},\n{body}\n}}")
    return "\n\n".join(entries)
