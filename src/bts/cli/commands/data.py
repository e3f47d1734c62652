"""`bts data`: obtain and cache the built-in domain corpora, then print what they hold.

    bts data                          # all built-in domains, cached under ~/.cache/bts/corpora
    bts data code math --cache-dir /tmp/corpora --refresh
    bts data --write-fixtures src/bts/fixtures    # regenerate the committed test slices from the caches
"""

from __future__ import annotations

import time

from bts.data import corpora
from bts.errors import BTSError

HELP = "Download and cache the built-in domain corpora (code, prose, math, legal) and print a summary table."


def add_arguments(parser) -> None:
    parser.add_argument("domains", nargs="*", default=list(corpora.BUILTIN_DOMAINS), metavar="DOMAIN", help=f"built-in domains to prepare (default: all of "
                                               f"{', '.join(corpora.BUILTIN_DOMAINS)})")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $BTS_CORPORA_CACHE or "
                                                          "~/.cache/bts/corpora)")
    parser.add_argument("--refresh", action="store_true", help="rebuild the caches even if they exist")
    parser.add_argument("--write-fixtures", metavar="DIR", default=None,
                        help="also write a small slice of each domain to DIR/<domain>/ (the committed fixtures)")


def run(args) -> int:
    for name in args.domains:
        if name not in corpora.BUILTIN_DOMAINS:
            raise BTSError(f"bts data: '{name}' is not a built-in domain ({', '.join(corpora.BUILTIN_DOMAINS)}).")
    rows = []
    for name in args.domains:
        start = time.perf_counter()
        prov = corpora.prepare_builtin(name, args.cache_dir, refresh=args.refresh)
        rows.append((name, prov, time.perf_counter() - start))
        if args.write_fixtures:
            docs = corpora.load_domain(name, {"source": "builtin", "max_chars": 0}, args.cache_dir)
            corpora.write_fixture(name, corpora.fixture_slice(docs), args.write_fixtures, prov)
    header = ("domain", "documents", "groups", "chars", "seconds", "cold prep s", "license", "source")
    table = [header] + [(n, str(p["documents"]), str(p["groups"]), f"{p['chars']:,}", f"{s:.1f}", str(p.get("prepare_seconds", "?")),
                         p["license"],
                         f"{p['source']} {p['version']}") for n, p, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0
