"""The report's Modularity sections (modularity/results.json, written by the modularity stage), with sentences
computed from the numbers, and the sentence under the gate table."""

from __future__ import annotations

from bts.report.tables import markdown_table


def _names(items) -> str:
    return ", ".join(items) if items else "none"


def _largest_change(changes: dict) -> str:
    """'raised … by at most +x (removing a, on b)' from {(removed, domain): change}, whatever its sign."""
    (removed, domain), worst = max(changes.items(), key=lambda kv: kv[1])
    if worst > 0:
        return f"raised another domain's loss by at most {worst:+.4f} (removing {removed}, on {domain})"
    return f"lowered every other domain's loss (the smallest drop: {worst:+.4f}, removing {removed}, on {domain})"


def gate_sentence(gates: dict) -> str:
    """Which expert leads on each domain's text at the last E→H stitch, and how much the hub keeps."""
    matched, missed, hub = [], [], []
    for domain, layers in gates.items():
        layer, weights = list(layers.items())[-1]
        hub.append(weights["hub"])
        if domain not in weights:
            continue
        top = max((m for m in weights if m != "hub"), key=lambda m: weights[m])
        (matched if top == domain else missed).append(domain if top == domain else f"{domain}: {top}")
    total = len(matched) + len(missed)
    text = (f"At the last E→H stitch ({layer}) the domain's own expert carries the most weight among the experts on "
            f"{len(matched)} of {total} domains")
    text += f" (exceptions, domain: leading expert — {_names(missed)})." if missed else "."
    return text + f" The hub keeps {sum(hub) / len(hub):.0%} of the mass on average."


def modularity_sections(m: dict, gates_section: list | None = None) -> list[tuple[str, str]]:
    """The Modularity part of the report: tables (a) adding, (b) removing, (c) the removed domain, the gates per
    domain and at domain switches, and sparse inference, each with sentences computed from the numbers."""
    domains = [d for d in m["seed"] if d != "avg"]
    cols = [*domains, "avg"]
    header = ["model", *cols]
    steps = m["full_stitch_steps"]

    def row(label, losses):
        return [label, *(f"{losses[d]:.4f}" for d in cols)]

    intro = (f"Measured by the modularity stage (docs/modularity.md) on {m['settings'].get('heldout_tokens') or 'all'}"
             f" held-out tokens per domain; losses in nats/token, lower is better.")
    sections = []
    add = m["add"]
    e, k = add["expert"], add["steps"]
    rows = [row("seed", m["seed"]), row(f"stitched from scratch, all experts ({steps} steps)", m["full"]),
            row(f"stitched without {e} ({steps} steps)", add["without"]),
            row(f"+ {e}, new slots only ({k} steps)", add["added_new"]),
            row(f"+ {e}, all stitch parameters ({k} steps)", add["added_all"])]
    gap = add["without"][e] - m["full"][e]
    text = (f"Adding {e} with {k} steps ({k / steps:.0%} of the {steps} stitch steps): its own loss went from "
            f"{add['without'][e]:.4f} without it to {add['added_new'][e]:.4f} (new slots only) and "
            f"{add['added_all'][e]:.4f} (all stitch parameters), against {m['full'][e]:.4f} stitched from scratch")
    if gap > 0:
        shares = [(add["without"][e] - add[f"added_{mode}"][e]) / gap for mode in ("new", "all")]
        text += f": {shares[0]:.0%} and {shares[1]:.0%} of the way to it."
    else:
        text += f"; stitching from scratch with {e} was not better on {e} than without it, so there was no gap."
    moved = [max(abs(add[f"added_{mode}"][d] - add["without"][d]) for d in domains if d != e)
             for mode in ("new", "all")]
    text += (f" The other domains' loss moved by at most {moved[0]:.4f} (new slots only) and {moved[1]:.4f} (all "
             f"parameters). Average: {add['added_new']['avg']:.4f} and {add['added_all']['avg']:.4f}, against "
             f"{m['full']['avg']:.4f} from scratch. Before training, the grown model's average loss differed from the "
             f"smaller model's by {add['init_avg_loss_diff']:.1e} (an added expert starts with exactly no weight).")
    sections.append((f"Modularity (a): adding the last expert ({e}) with {k} of {steps} stitch steps",
                     intro + "\n\n" + markdown_table(header, rows) + "\n\n" + text))

    remove = m["remove"]
    r = next(iter(remove.values()))["retrain_steps"]
    rows = [row("all experts", m["full"])]
    for name, entry in remove.items():
        rows += [row(f"− {name}", entry["removed"]), row(f"− {name}, retrained {r} steps", entry["retrained"])]
    change = {key: {(n, d): entry[key][d] - m["full"][d] for n, entry in remove.items() for d in domains if d != n}
              for key in ("removed", "retrained")}
    below = {key: sum(v < 0 for v in change[key].values()) for key in change}
    text = (f"Without retraining, removing an expert {_largest_change(change['removed'])}; after {r} retraining "
            f"steps it {_largest_change(change['retrained'])}. Other-domain entries below the full model's loss: "
            f"{below['removed']} of {len(change['removed'])} without retraining, {below['retrained']} after.")
    sections.append((f"Modularity (b): removing each expert — every domain's held-out loss, without and with {r} "
                     "retraining steps", markdown_table(header, rows) + "\n\n" + text))

    own = [n for n in remove if n in m["seed"]]
    rows = [[n, f"{m['full'][n]:.4f}", f"{remove[n]['removed'][n]:.4f}", f"{remove[n]['retrained'][n]:.4f}",
             f"{m['seed'][n]:.4f}"] for n in own]
    text = ""
    if own:
        above = {key: [n for n in own if remove[n][key][n] > m["seed"][n]] for key in ("removed", "retrained")}
        rose = [n for n in own if remove[n]["removed"][n] > m["full"][n]]
        gained = [n for n in own if m["seed"][n] > m["full"][n]]
        text = (f"Removing a domain's expert raised that domain's loss (back towards the seed) on {len(rose)} of "
                f"{len(own)} domains. It ended above the seed's loss (worse than the seed) on "
                f"{_names(above['removed'])} without retraining and on {_names(above['retrained'])} after it; at or "
                f"below the seed on the others.")
        if gained:
            lost = [(remove[n]["removed"][n] - m["full"][n]) / (m["seed"][n] - m["full"][n]) for n in gained]
            text += (f" Of what the stitched model had gained over the seed on its domain, removal took back "
                     f"{sum(lost) / len(lost):.0%} on average ({min(lost):.0%} to {max(lost):.0%}).")
    sections.append(("Modularity (c): the removed expert's own domain against the seed", markdown_table(
        ["removed", "own-domain loss with it", "removed", f"removed + retrained {r} steps", "seed"], rows)
        + ("\n\n" + text if text else "")))

    sections += gates_section or []
    sw = m.get("switch")
    if sw and sw.get("pairs"):
        rows = [[pair, str(p["windows"]), f"{p['before']:.0%}", f"{p['after']:.0%}", f"{p['switched']:.0%}"]
                for pair, p in sw["pairs"].items()]
        rows.append(["mean", "", f"{sw['before']:.0%}", f"{sw['after']:.0%}", f"{sw['switched']:.0%}"])
        text = (f"Each window is {sw['half']} held-out tokens of one domain followed by {sw['half']} of another; an "
                f"expert leads a token when it has the most mixing weight among the experts at the last E→H stitch. "
                f"The first domain's expert leads {sw['before']:.0%} of the tokens before the boundary, the second "
                f"domain's expert {sw['after']:.0%} after it (chance: {sw['chance']:.0%}); the leading expert of the "
                f"two halves switched from the first domain's to the second's in {sw['switched']:.0%} of the windows.")
        segments = sw.get("heatmap_text") or []
        if segments:
            text += " On the text of the gate heatmap (gates.png): " + "; ".join(
                f"the {s['domain']} part is led mostly by {s['dominant']}"
                + (f" (own expert on {s['own_share']:.0%} of its tokens)" if s["own_share"] is not None else "")
                for s in segments) + "."
        sections.append(("Modularity: does the leading expert switch where the text changes domain?",
                         markdown_table(["text (first → second domain)", "windows", "before: first's expert leads",
                                         "after: second's expert leads", "windows that switch"], rows)
                         + "\n\n" + text))

    sparse = m.get("sparse")
    if sparse:
        n = len(m["experts"])
        rows, worst_k1, k1 = [], None, None
        for k in range(1, n + 1):
            changes = {d: e["k"][k - 1]["change_pct"] for d, e in sparse.items()}
            worst = max(changes, key=changes.get)
            chosen = "all" if k == n else "; ".join(f"{d}: {'+'.join(e['k'][k - 1]['experts'])}"
                                                     for d, e in sparse.items())
            mean = sum(changes.values()) / len(changes)
            rows.append([str(k), f"{mean:+.2f}%", f"{changes[worst]:+.2f}% ({worst})", chosen])
            if k == 1:
                k1, worst_k1 = mean, (worst, changes[worst])
        own1 = [d for d, e in sparse.items() if e["k"][0]["experts"] == [d]]
        windows = next(iter(sparse.values()))["windows"]
        text = (f"Experts are chosen per domain from the gate mass on its first held-out window "
                f"(model.top_experts), and the next {windows} windows are scored with only those experts running, "
                f"against the full model on the same windows. With the top-1 expert the loss changed by {k1:+.2f}% "
                f"on average (worst: {worst_k1[1]:+.2f}% on {worst_k1[0]}); the top-1 choice was the domain's own "
                f"expert on {len(own1)} of {len(sparse)} domains.")
        sections.append(("Modularity: sparse inference — held-out loss with only the top-k experts, against the "
                         "full model", markdown_table(["k active", "mean loss change", "worst domain",
                                                       "experts chosen, per domain"], rows) + "\n\n" + text))
    return sections
